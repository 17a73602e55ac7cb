"""DeepSpeed's routing semantics, computed straight into sparse form.

`route_deepspeed` reproduces DeepSpeed's top1/top2/topk gating decision for decision (including its random
draws, so a seeded run matches), but returns per-choice (expert, slot, gate) triples instead of [S, E, C]
combine tensors.

Shape legend: S tokens, E experts, K choices per token, C capacity.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import choices, losses, noise
from .slots import count_groups, rank_by_score_within_groups, rank_within_groups, top2_slots
from .softmax import router_softmax
from .types import CapacityAgreement, Routing


def _same_capacity(capacity: int) -> int:
    return capacity


@functools.lru_cache(maxsize=256)
def deepspeed_capacity(num_tokens: int, num_experts: int, capacity_factor: float, k: int, min_capacity: int) -> int:
    """ceil(S / E * capacity_factor * k), at least min_capacity, rounded exactly as DeepSpeed rounds it (fp32).
    Cached: a pure function of its arguments, asked once per step with the same ones."""
    capacity = torch.ceil((num_tokens / num_experts) * torch.tensor(capacity_factor * k))
    return max(int(capacity), int(min_capacity))


def _used_mask(used_S: Optional[torch.Tensor], num_tokens: int, device: torch.device) -> torch.Tensor:
    """bool [S]: the tokens that take part in routing (`used_token` nonzero, or all)."""
    if used_S is None:
        return torch.ones(num_tokens, dtype=torch.bool, device=device)
    return used_S != 0


def _only_used(wanted_SE: torch.Tensor, used_S: Optional[torch.Tensor]) -> torch.Tensor:
    """Clears the choices of tokens that `used_token` marks unused (zero)."""
    if used_S is None:
        return wanted_SE
    return wanted_SE * (used_S != 0).to(wanted_SE.dtype).unsqueeze(1)


def _excluded_where_not(kept: torch.Tensor, choice: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The choice's expert where kept, else the excluded group `num_experts` (see slots.py)."""
    return torch.where(kept, choice, torch.full_like(choice, num_experts))


def _kept_slots_and_gates(probs_SE: torch.Tensor, choice_SK: torch.Tensor, kept_SK: torch.Tensor,
                          location_SK: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(locations_SK, gates_SK): a kept choice's slot and probability; a dropped one's -1 and 0."""
    gates_SK = torch.where(kept_SK, probs_SE.gather(1, choice_SK), 0.0)
    return torch.where(kept_SK, location_SK, -1), gates_SK


def _normalized(gates_SK: torch.Tensor) -> torch.Tensor:
    """Each token's kept gates divided by their sum (DeepSpeed's normalisation, eps-clamped)."""
    return gates_SK / torch.clamp(gates_SK.sum(dim=1, keepdim=True), min=torch.finfo(gates_SK.dtype).eps)


def _top1(logits_SE, probs_SE, capacity_factor, min_capacity, drop_tokens, use_rts, rsample, used_S, agree):
    S, E = probs_SE.shape
    if rsample:
        choice_S = torch.argmax(logits_SE + noise.gumbel(logits_SE.shape, logits_SE.device), dim=1)
    else:
        choice_S = choices.top1(probs_SE)
    choice_S1 = choice_S.unsqueeze(1)
    wanted_S = _used_mask(used_S, S, probs_SE.device)
    counts_E = count_groups(_excluded_where_not(wanted_S, choice_S, E), E)
    if drop_tokens:
        capacity = deepspeed_capacity(S, E, capacity_factor, 1, min_capacity)
    else:
        capacity = min(int(counts_E.max()), S)
    capacity = agree(capacity)

    # Which of an overflowing expert's tokens stay is torch.topk's choice down DeepSpeed's [S, E] table (random
    # scores with use_rts, ties otherwise), so it is made exactly as DeepSpeed makes it; the rest is sparse.
    if use_rts:
        wanted_SE = _only_used(F.one_hot(choice_S, num_classes=E), used_S)
        score_SE = wanted_SE * noise.uniform(wanted_SE.shape, probs_SE.device)
    else:
        # On the CPU, DeepSpeed's 0/1 table as uint8 rather than its int64 one-hot: the same values make the
        # same comparisons in the CPU topk, so it picks the same tokens (tested), from an eighth of the bytes.
        # Elsewhere (a GPU's radix select, untested here) DeepSpeed's own dtype.
        table_dtype = torch.uint8 if probs_SE.device.type == "cpu" else torch.int64
        score_SE = torch.zeros((S, E), dtype=table_dtype, device=probs_SE.device).scatter_(
            1, choice_S1, wanted_S.to(table_dtype).unsqueeze(1))
    top_CE = torch.topk(score_SE, k=min(capacity, S), dim=0)[1]
    kept_S = choices.own_column_picks(top_CE, choice_S, wanted_S)
    location_S, _ = rank_within_groups(_excluded_where_not(kept_S, choice_S, E), E)

    me_E = probs_SE.mean(dim=0)
    ce_E = counts_E.float() / S
    l_aux = torch.sum(me_E * ce_E) * E

    locations_SK, gates_SK = _kept_slots_and_gates(probs_SE, choice_S1, kept_S.unsqueeze(1),
                                                   location_S.unsqueeze(1))
    return choice_S1, locations_SK, gates_SK, capacity, counts_E, l_aux


def _top2(logits_SE, probs_SE, capacity_factor, min_capacity, drop_tokens, second_expert_sampling, used_S, agree):
    S, E = probs_SE.shape
    logits_SE = logits_SE.detach()
    if second_expert_sampling:
        logits_SE = logits_SE + noise.gumbel(logits_SE.shape, logits_SE.device)
    choice_SK = choices.top2(probs_SE, logits_SE)

    # First choices rank among first choices, second ones among second ones and then queue behind every first
    # choice of their expert.
    used_S = None if used_S is None else used_S != 0
    location_SK, counts1_E, counts2_E = top2_slots(choice_SK, used_S, E)

    me_E = probs_SE.mean(dim=0)
    ce_E = counts1_E.float() / S
    l_aux = torch.mean(me_E * ce_E) * E * E

    counts_E = counts1_E + counts2_E
    if drop_tokens:
        capacity = deepspeed_capacity(S, E, capacity_factor, 2, min_capacity)
    else:
        capacity = int(counts_E.max())
    capacity = agree(capacity)

    kept_SK = location_SK < capacity if used_S is None else used_S.unsqueeze(1) & (location_SK < capacity)
    locations_SK, gates_SK = _kept_slots_and_gates(probs_SE, choice_SK, kept_SK, location_SK)
    return choice_SK, locations_SK, _normalized(gates_SK), capacity, counts_E, l_aux


def _topk(probs_SE, k, capacity_factor, min_capacity, drop_tokens, used_S, agree):
    S, E = probs_SE.shape
    top_gate_SK, choice_SK = torch.topk(probs_SE.detach(), k=k, dim=1)
    wanted_SK = _used_mask(used_S, S, probs_SE.device).unsqueeze(1).expand(S, k)
    counts_E = count_groups(_excluded_where_not(wanted_SK, choice_SK, E), E)

    me_E = probs_SE.mean(dim=0)
    ce_E = counts_E.float() / S
    l_aux = torch.mean(me_E * ce_E) * E * E / k

    if drop_tokens:
        capacity = agree(deepspeed_capacity(S, E, capacity_factor, k, min_capacity))
        # Each expert keeps the `capacity` choices with the highest gate values (equal values: earlier token).
        score_rank_J = rank_by_score_within_groups(_excluded_where_not(wanted_SK, choice_SK, E).reshape(-1),
                                                   top_gate_SK.reshape(-1), E)
        kept_SK = wanted_SK & (score_rank_J.view(S, k) < capacity)
    else:
        capacity = agree(int(counts_E.max()))
        kept_SK = wanted_SK
    location_J, _ = rank_within_groups(_excluded_where_not(kept_SK, choice_SK, E).reshape(-1), E)
    locations_SK, gates_SK = _kept_slots_and_gates(probs_SE, choice_SK, kept_SK, location_J.view(S, k))
    return choice_SK, locations_SK, _normalized(gates_SK), capacity, counts_E, l_aux


def route_deepspeed(logits_SE: torch.Tensor,
                    k: int = 1,
                    capacity_factor: float = 1.0,
                    min_capacity: int = 4,
                    drop_tokens: bool = True,
                    use_rts: bool = False,
                    rsample: bool = False,
                    second_expert_sampling: bool = False,
                    used_token_S: Optional[torch.Tensor] = None,
                    agree_capacity: Optional[CapacityAgreement] = None) -> Tuple[Routing, torch.Tensor]:
    """DeepSpeed's gating decision for fp32 logits [S, E]; returns (routing, l_aux).

    k=1 keeps a random (use_rts) or topk-chosen subset of an overflowing expert's tokens, k=2 queues second
    choices behind first ones, k>2 keeps the highest-scoring choices per expert (DeepSpeed's 'probs' policy).
    `used_token_S` (nonzero = used) removes tokens from routing for every k.
    """
    agree = agree_capacity or _same_capacity
    probs_SE = router_softmax(logits_SE)
    if k == 1:
        parts = _top1(logits_SE, probs_SE, capacity_factor, min_capacity, drop_tokens, use_rts, rsample,
                      used_token_S, agree)
    elif k == 2:
        parts = _top2(logits_SE, probs_SE, capacity_factor, min_capacity, drop_tokens, second_expert_sampling,
                      used_token_S, agree)
    else:
        parts = _topk(probs_SE, k, capacity_factor, min_capacity, drop_tokens, used_token_S, agree)
    choice_SK, locations_SK, gates_SK, capacity, counts_E, l_aux = parts
    routing = Routing(indices_SK=choice_SK, locations_SK=locations_SK, gates_SK=gates_SK, capacity=int(capacity),
                      counts_E=counts_E.to(torch.int64), probs_SE=probs_SE)
    return routing, l_aux
