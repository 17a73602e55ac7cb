"""Tutel's routing semantics: any top-k, fixed / dropless / bounded capacity, batch-prioritized routing.

Choices queue for their expert in priority order: all first choices (k = 0) of all tokens, then all second
choices, and so on; inside one k, tokens in position order, or by descending top-1 score with batch-prioritized
routing (ties keep position order). A choice whose place in its expert's queue is >= capacity is dropped
(location -1, gate 0). Gates are the top-k softmax values, optionally renormalised to sum to 1 per token
before dropping, as Tutel does.

A routing rule (rules.py) may make the choices and gates instead (`choices`): the slot assignment is the same.

Shape legend: S tokens, E experts, K choices per token, J = K * S choices in priority order.
"""
from __future__ import annotations

from typing import Optional

import torch

from .rules import Choices
from .types import CapacityAgreement, Routing
from .slots import rank_within_groups
from .softmax import router_softmax


def padded_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """Tutel's fixed capacity: k * int(|cf| * ceil(S / E))."""
    per_expert = -(-num_tokens // num_experts)
    return k * int(abs(capacity_factor) * per_expert)


def tutel_capacity(counts_E: torch.Tensor, num_tokens: int, k: int, capacity_factor: float, min_capacity: int,
                   agree: CapacityAgreement) -> int:
    """cf > 0: padded capacity (at least min_capacity); 0: dropless (largest count over the group);
    cf < 0: min(largest count over the group, |cf| x padded capacity)."""
    E = counts_E.shape[0]
    if capacity_factor > 0:
        return agree(max(padded_capacity(num_tokens, E, k, capacity_factor), min_capacity))
    largest = agree(int(counts_E.max()) if counts_E.numel() else 0)
    if capacity_factor == 0:
        return largest
    return min(largest, agree(padded_capacity(num_tokens, E, k, capacity_factor)))


def route_tutel(logits_SE: torch.Tensor,
                k: int = 1,
                capacity_factor: float = 1.0,
                min_capacity: int = 0,
                batch_prioritized_routing: bool = False,
                normalize_gate: bool = True,
                used_token_S: Optional[torch.Tensor] = None,
                agree_capacity: Optional[CapacityAgreement] = None,
                selection_scores_SE: Optional[torch.Tensor] = None,
                choices: Optional[Choices] = None) -> Routing:
    """Tutel-style routing of fp32 logits [S, E] (see the module docstring for the exact rules).

    selection_scores_SE, when given, chooses the top-k experts (noise or balancing bias added by the caller);
    the gate values always come from softmax(logits). choices, when given, are a routing rule's decision
    (rules.choose): its experts and gates are used as they are (k, normalize_gate and selection_scores_SE are
    then not read), and only the slots and the capacity are computed here.
    """
    agree = agree_capacity or (lambda c: c)
    logits_SE = logits_SE.float()
    S, E = logits_SE.shape
    if choices is not None:
        indices_SK, gates_SK, probs_SE = choices.indices_SK, choices.gates_SK, choices.scores_SE
        k = indices_SK.shape[1]
        priority_S = choices.priority_S
    else:
        probs_SE = router_softmax(logits_SE)
        if selection_scores_SE is None:
            top_SK, indices_SK = torch.topk(probs_SE, k=k, dim=1)
        else:
            indices_SK = torch.topk(selection_scores_SE, k=k, dim=1).indices
            top_SK = probs_SE.gather(1, indices_SK)
        gates_SK = top_SK
        if normalize_gate:
            gates_SK = gates_SK / torch.clamp(gates_SK.sum(dim=1, keepdim=True), min=torch.finfo(gates_SK.dtype).eps)
        priority_S = top_SK[:, 0].detach()

    used_S = None if used_token_S is None else used_token_S != 0
    # Priority order: k-major, tokens in token order (batch-prioritized: by priority); unused tokens queue at a
    # sentinel expert E. Without a reordering or a token mask, the steps that apply them are left out.
    token_order_S = torch.sort(-priority_S, stable=True).indices if batch_prioritized_routing else None
    ordered_SK = indices_SK if token_order_S is None else indices_SK[token_order_S]
    if used_S is not None:
        ordered_SK = ordered_SK.masked_fill(~(used_S if token_order_S is None else used_S[token_order_S]).unsqueeze(1), E)
    positions_KS = rank_within_groups(ordered_SK.t().reshape(-1), E)[0].view(k, S)
    if token_order_S is None:
        positions_SK = positions_KS.t()
    else:
        positions_SK = torch.empty_like(indices_SK)
        positions_SK[token_order_S] = positions_KS.t()

    counts_E = torch.bincount((indices_SK if used_S is None else indices_SK[used_S]).reshape(-1), minlength=E)
    capacity = tutel_capacity(counts_E, S, k, capacity_factor, min_capacity, agree)
    kept_SK = positions_SK < capacity
    if used_S is not None:
        kept_SK = kept_SK & used_S.unsqueeze(1)
    locations_SK = torch.where(kept_SK, positions_SK, torch.full_like(positions_SK, -1))
    gates_SK = torch.where(kept_SK, gates_SK, 0.0)  # a dropped choice weighs 0, even where its gate is NaN
    return Routing(indices_SK=indices_SK, locations_SK=locations_SK, gates_SK=gates_SK, capacity=int(capacity),
                   counts_E=counts_E, probs_SE=probs_SE)
