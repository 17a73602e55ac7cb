"""Triton kernels for Tutel's gate: fused softmax + top-k + normalisation, then slots under the capacity mask.

Forward, three kernels around one host decision (the capacity):
  1. _softmax_topk_kernel      per block of tokens: fp32 softmax of the logits -> probs_SE; K rounds of argmax
                               over the probabilities, or over caller-given selection scores (ties -> the lower
                               expert, NaN above every number as in torch.topk) -> indices_SK, always in [0, E),
                               and their probabilities as gates, normalised to sum 1 when asked; the first
                               choice's probability per token for batch-prioritized routing.
  2. _expert_histogram_kernel  per (choice k, block of tokens in priority order): how many choices of the block
                               want each expert -> hist_KBE, in steps of _HIST_BLOCK_E experts (a bounded tile).
                               Its exclusive prefix sum over (k, block), k-major as
                               the queue is, gives each block its first queue place per expert; its total is
                               counts_E. The capacity is computed from counts_E by the caller, on the host,
                               because dropless and bounded modes need the largest count agreed across ranks.
  3. _assign_slots_kernel      per (k, block in priority order): a choice's queue place is its block's offset
                               plus the choices before it in the block that want the same expert; kept when
                               place < capacity -> locations_SK (-1 dropped) and the gates, 0 where dropped.
Backward, one kernel: _gate_backward_kernel per block of tokens: the capacity mask, the normalisation's
backward, the scatter of the gate gradients into their expert columns, and the softmax backward.

Priority order is token order, or for batch-prioritized routing a stable sort by descending top-1 score
(torch.sort: a library sort is the right tool for it, and it is O(S) work beside the O(S * E) gate).

Shape legend: S tokens, E experts, K choices per token, B blocks of tokens, T tokens per block,
EP / KP: E and K padded to powers of two (in the histogram kernel, E is one step of BLOCK_E experts).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import interpreting
from .dispatch import _empty

# Smallest normaliser of the top-k gates, as torch.finfo(torch.float32).eps (the torch path clamps with it).
_FP32_EPS = float(torch.finfo(torch.float32).eps)


@triton.jit
def _softmax_topk_kernel(logits_ptr, select_ptr, probs_ptr, indices_ptr, gates_ptr, score_ptr,
                         S, E, K, stride_logits, stride_select, eps,
                         NORMALIZE: tl.constexpr, HAS_SELECT: tl.constexpr, BLOCK_T: tl.constexpr, EP: tl.constexpr,
                         KP: tl.constexpr):
    tokens_T = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts_E = tl.arange(0, EP)
    choices_K = tl.arange(0, KP)
    tok_ok_T = tokens_T < S
    ok_TE = tok_ok_T[:, None] & (experts_E[None, :] < E)
    logits_TE = tl.load(logits_ptr + tokens_T[:, None] * stride_logits + experts_E[None, :], mask=ok_TE,
                        other=float("-inf")).to(tl.float32)
    # Rows past S are all -inf; give them a finite value so that no NaN is computed (they are never stored).
    logits_TE = tl.where(tok_ok_T[:, None], logits_TE, 0.0)
    shifted_TE = logits_TE - tl.max(logits_TE, axis=1)[:, None]
    exp_TE = tl.exp(shifted_TE)
    probs_TE = exp_TE / tl.sum(exp_TE, axis=1)[:, None]
    tl.store(probs_ptr + tokens_T[:, None] * E + experts_E[None, :], probs_TE, mask=ok_TE)

    # Experts are chosen by the selection scores when given (noise or bias added by the caller), else by the
    # probabilities; the gate is always the probability. Each round takes the best expert still free, the lowest
    # index among equals (also when scores are -inf, so a taken expert is never taken twice). NaN ranks above
    # every number, as in torch.topk: a NaN logit (or +inf, or a row of -inf) makes the whole row of
    # probabilities NaN, and such a row still picks K distinct experts in [0, E) (the lowest indices first).
    if HAS_SELECT:
        key_TE = tl.load(select_ptr + tokens_T[:, None] * stride_select + experts_E[None, :], mask=ok_TE,
                         other=float("-inf")).to(tl.float32)
    else:
        key_TE = probs_TE
    nan_TE = key_TE != key_TE
    free_TE = ok_TE
    top_TK = tl.zeros((BLOCK_T, KP), dtype=tl.float32)
    idx_TK = tl.zeros((BLOCK_T, KP), dtype=tl.int64)
    for k in range(K):
        free_nan_TE = free_TE & nan_TE
        any_nan_T = tl.max(free_nan_TE.to(tl.int32), axis=1) > 0
        best_T = tl.max(tl.where(free_TE & ~nan_TE, key_TE, float("-inf")), axis=1)
        is_best_TE = tl.where(any_nan_T[:, None], free_nan_TE, free_TE & ~nan_TE & (key_TE == best_T[:, None]))
        arg_T = tl.min(tl.where(is_best_TE, experts_E[None, :], EP), axis=1)
        chosen_TE = experts_E[None, :] == arg_T[:, None]
        gate_T = tl.sum(tl.where(chosen_TE, probs_TE, 0.0), axis=1)
        top_TK = tl.where(choices_K[None, :] == k, gate_T[:, None], top_TK)
        idx_TK = tl.where(choices_K[None, :] == k, arg_T[:, None].to(tl.int64), idx_TK)
        free_TE = free_TE & ~chosen_TE
    # Batch-prioritized routing orders tokens by the probability of their first choice.
    tl.store(score_ptr + tokens_T, tl.sum(tl.where(choices_K[None, :] == 0, top_TK, 0.0), axis=1), mask=tok_ok_T)
    if NORMALIZE:
        top_TK = top_TK / tl.maximum(tl.sum(top_TK, axis=1), eps)[:, None]
    ok_TK = tok_ok_T[:, None] & (choices_K[None, :] < K)
    tl.store(indices_ptr + tokens_T[:, None] * K + choices_K[None, :], idx_TK, mask=ok_TK)
    tl.store(gates_ptr + tokens_T[:, None] * K + choices_K[None, :], top_TK, mask=ok_TK)


@triton.jit
def _load_block_choices(indices_ptr, order_ptr, used_ptr, block, k, S, K,
                        HAS_ORDER: tl.constexpr, HAS_USED: tl.constexpr, BLOCK_T: tl.constexpr):
    """(tokens_T, experts_T, live_T) of choice k for the block-th block of tokens in priority order; the expert
    is -1 where the position is past S or the token is unused."""
    places_T = block.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_T = places_T < S
    if HAS_ORDER:
        tokens_T = tl.load(order_ptr + places_T, mask=in_T, other=0)
    else:
        tokens_T = places_T
    live_T = in_T
    if HAS_USED:
        live_T = live_T & (tl.load(used_ptr + tokens_T, mask=in_T, other=0) != 0)
    experts_T = tl.load(indices_ptr + tokens_T * K + k, mask=live_T, other=-1)
    experts_T = tl.where(live_T, experts_T, -1)
    return tokens_T, experts_T, live_T


@triton.jit
def _expert_histogram_kernel(indices_ptr, order_ptr, used_ptr, hist_ptr, S, E, K, num_blocks,
                             HAS_ORDER: tl.constexpr, HAS_USED: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_E: tl.constexpr):
    block = tl.program_id(0)
    k = tl.program_id(1)
    _, experts_T, _ = _load_block_choices(indices_ptr, order_ptr, used_ptr, block, k, S, K, HAS_ORDER, HAS_USED,
                                          BLOCK_T)
    row = (k * num_blocks + block).to(tl.int64)
    # A [T, BLOCK_E] comparison tile per step over the experts, whatever E is (no spill at E >= 512).
    for first in range(0, E, BLOCK_E):
        experts_E = first + tl.arange(0, BLOCK_E)
        counts_E = tl.sum((experts_T[:, None] == experts_E[None, :]).to(tl.int32), axis=0)
        tl.store(hist_ptr + row * E + experts_E, counts_E.to(tl.int64), mask=experts_E < E)


@triton.jit
def _assign_slots_kernel(indices_ptr, order_ptr, used_ptr, offsets_ptr, gates_ptr, locations_ptr, kept_gates_ptr,
                         S, E, K, num_blocks, capacity,
                         HAS_ORDER: tl.constexpr, HAS_USED: tl.constexpr, BLOCK_T: tl.constexpr):
    block = tl.program_id(0)
    k = tl.program_id(1)
    tokens_T, experts_T, live_T = _load_block_choices(indices_ptr, order_ptr, used_ptr, block, k, S, K, HAS_ORDER,
                                                      HAS_USED, BLOCK_T)
    # Place inside the block: earlier choices (j < i) of the block that want the same expert (dead ones have
    # expert -1, so they match no live choice).
    pos_T = tl.arange(0, BLOCK_T)
    same_TT = (experts_T[:, None] == experts_T[None, :]) & (pos_T[None, :] < pos_T[:, None])
    rank_T = tl.sum(same_TT.to(tl.int32), axis=1).to(tl.int64)
    row = (k * num_blocks + block).to(tl.int64)
    first_T = tl.load(offsets_ptr + row * E + experts_T, mask=live_T, other=0)
    place_T = first_T + rank_T
    kept_T = live_T & (place_T < capacity)
    in_T = (block.to(tl.int64) * BLOCK_T + pos_T) < S
    gate_T = tl.load(gates_ptr + tokens_T * K + k, mask=in_T, other=0.0)
    tl.store(locations_ptr + tokens_T * K + k, tl.where(kept_T, place_T, -1), mask=in_T)
    tl.store(kept_gates_ptr + tokens_T * K + k, tl.where(kept_T, gate_T, 0.0), mask=in_T)


@triton.jit
def _gate_backward_kernel(grad_logits_ptr, probs_ptr, indices_ptr, locations_ptr, grad_gates_ptr, grad_probs_ptr,
                          S, E, K, stride_grad_logits, eps,
                          NORMALIZE: tl.constexpr, HAS_GRAD_GATES: tl.constexpr, HAS_GRAD_PROBS: tl.constexpr,
                          BLOCK_T: tl.constexpr, EP: tl.constexpr):
    tokens_T = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts_E = tl.arange(0, EP)
    tok_ok_T = tokens_T < S
    ok_TE = tok_ok_T[:, None] & (experts_E[None, :] < E)
    probs_TE = tl.load(probs_ptr + tokens_T[:, None] * E + experts_E[None, :], mask=ok_TE, other=0.0)
    if HAS_GRAD_PROBS:
        total_TE = tl.load(grad_probs_ptr + tokens_T[:, None] * E + experts_E[None, :], mask=ok_TE, other=0.0)
    else:
        total_TE = tl.zeros((BLOCK_T, EP), dtype=tl.float32)
    if HAS_GRAD_GATES:
        # Gates were top_k / max(sum top, eps), then masked: d top_j = g_j / D - [sum >= eps] sum_i g_i top_i / D^2.
        sum_top_T = tl.zeros((BLOCK_T,), dtype=tl.float32)
        sum_g_top_T = tl.zeros((BLOCK_T,), dtype=tl.float32)
        if NORMALIZE:
            for k in range(K):
                expert_T = tl.load(indices_ptr + tokens_T * K + k, mask=tok_ok_T, other=-1)
                kept_T = tl.load(locations_ptr + tokens_T * K + k, mask=tok_ok_T, other=-1) >= 0
                g_T = tl.where(kept_T, tl.load(grad_gates_ptr + tokens_T * K + k, mask=tok_ok_T, other=0.0), 0.0)
                top_T = tl.sum(tl.where(experts_E[None, :] == expert_T[:, None], probs_TE, 0.0), axis=1)
                sum_top_T += top_T
                sum_g_top_T += g_T * top_T
        denom_T = tl.maximum(sum_top_T, eps)
        cross_T = tl.where(sum_top_T >= eps, sum_g_top_T / (denom_T * denom_T), 0.0)
        for k in range(K):
            expert_T = tl.load(indices_ptr + tokens_T * K + k, mask=tok_ok_T, other=-1)
            kept_T = tl.load(locations_ptr + tokens_T * K + k, mask=tok_ok_T, other=-1) >= 0
            g_T = tl.where(kept_T, tl.load(grad_gates_ptr + tokens_T * K + k, mask=tok_ok_T, other=0.0), 0.0)
            if NORMALIZE:
                g_T = g_T / denom_T - cross_T
            total_TE += tl.where(experts_E[None, :] == expert_T[:, None], g_T[:, None], 0.0)
    grad_TE = probs_TE * (total_TE - tl.sum(probs_TE * total_TE, axis=1)[:, None])
    tl.store(grad_logits_ptr + tokens_T[:, None] * stride_grad_logits + experts_E[None, :],
             grad_TE.to(grad_logits_ptr.dtype.element_ty), mask=ok_TE)


def _token_block(E: int) -> int:
    """Tokens per program: a [T, EP] tile of at most 4096 fp32 (2048 under the interpreter, which pays per op)."""
    budget = 2048 if interpreting() else 4096
    return max(1, min(64, budget // triton.next_power_of_2(E)))


# Tokens per block of the slot kernels: their [T, T] comparison tile does not grow with E.
_SLOT_BLOCK = 64
# Experts per step of the histogram kernel's loop: its [T, BLOCK_E] tile is bounded whatever E is.
_HIST_BLOCK_E = 64


def softmax_topk(logits_SE: torch.Tensor, k: int, normalize_gate: bool,
                 selection_scores_SE: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probs_SE fp32, indices_SK int64, gates_SK fp32 unmasked, score_S = probability of the first choice);
    no autograd. The experts are the top-k of selection_scores_SE when given, else of the probabilities."""
    S, E = logits_SE.shape
    if logits_SE.stride(1) != 1:
        logits_SE = logits_SE.contiguous()
    if selection_scores_SE is not None and selection_scores_SE.stride(1) != 1:
        selection_scores_SE = selection_scores_SE.contiguous()
    device = logits_SE.device
    probs_SE = _empty((S, E), torch.float32, device)
    indices_SK = _empty((S, k), torch.int64, device)
    gates_SK = _empty((S, k), torch.float32, device)
    score_S = _empty((S,), torch.float32, device)
    if S == 0:
        return probs_SE, indices_SK, gates_SK, score_S
    BLOCK_T = _token_block(E)
    _softmax_topk_kernel[(triton.cdiv(S, BLOCK_T),)](
        logits_SE, selection_scores_SE if selection_scores_SE is not None else logits_SE, probs_SE, indices_SK,
        gates_SK, score_S, S, E, k, logits_SE.stride(0),
        selection_scores_SE.stride(0) if selection_scores_SE is not None else 0, _FP32_EPS,
        NORMALIZE=normalize_gate, HAS_SELECT=selection_scores_SE is not None, BLOCK_T=BLOCK_T,
        EP=triton.next_power_of_2(E), KP=triton.next_power_of_2(k))
    return probs_SE, indices_SK, gates_SK, score_S


def queue_offsets(indices_SK: torch.Tensor, order_S: Optional[torch.Tensor], used_S: Optional[torch.Tensor],
                  num_experts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(offsets_KBE, counts_E): the first queue place of each (choice, priority block) per expert, and how many
    live choices want each expert (int64)."""
    S, K = indices_SK.shape
    E = num_experts
    num_blocks = triton.cdiv(S, _SLOT_BLOCK)
    hist_KBE = _empty((K, num_blocks, E), torch.int64, indices_SK.device)
    if num_blocks > 0:
        _expert_histogram_kernel[(num_blocks, K)](
            indices_SK, order_S if order_S is not None else indices_SK, used_S if used_S is not None else indices_SK,
            hist_KBE, S, E, K, num_blocks, HAS_ORDER=order_S is not None, HAS_USED=used_S is not None,
            BLOCK_T=_SLOT_BLOCK, BLOCK_E=min(_HIST_BLOCK_E, triton.next_power_of_2(E)))
    flat_JE = hist_KBE.view(K * num_blocks, E)
    offsets_KBE = (torch.cumsum(flat_JE, dim=0) - flat_JE).view(K, num_blocks, E)
    return offsets_KBE, flat_JE.sum(dim=0)


def assign_slots(indices_SK: torch.Tensor, gates_SK: torch.Tensor, order_S: Optional[torch.Tensor],
                 used_S: Optional[torch.Tensor], offsets_KBE: torch.Tensor,
                 capacity: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(locations_SK, kept_gates_SK): each choice's place in its expert's queue if < capacity, else -1; its gate, or
    0 where dropped or unused."""
    S, K = indices_SK.shape
    E = offsets_KBE.shape[2]
    num_blocks = offsets_KBE.shape[1]
    locations_SK = _empty((S, K), torch.int64, indices_SK.device)
    kept_gates_SK = _empty((S, K), torch.float32, indices_SK.device)
    if num_blocks > 0:
        _assign_slots_kernel[(num_blocks, K)](
            indices_SK, order_S if order_S is not None else indices_SK, used_S if used_S is not None else indices_SK,
            offsets_KBE, gates_SK, locations_SK, kept_gates_SK, S, E, K, num_blocks, capacity,
            HAS_ORDER=order_S is not None, HAS_USED=used_S is not None, BLOCK_T=_SLOT_BLOCK)
    return locations_SK, kept_gates_SK


class _TutelGate(torch.autograd.Function):
    """logits_SE -> (probs_SE, gates_SK, indices_SK, locations_SK, counts_E, capacity); probs and gates carry
    autograd back to the logits."""

    @staticmethod
    def forward(ctx: Any, logits_SE: torch.Tensor, k: int, normalize_gate: bool, batch_prioritized_routing: bool,
                used_S: Optional[torch.Tensor], capacity_of: Callable[[torch.Tensor], int],
                selection_scores_SE: Optional[torch.Tensor]) -> Tuple[Any, ...]:
        E = logits_SE.shape[1]
        probs_SE, indices_SK, gates_SK, score_S = softmax_topk(logits_SE, k, normalize_gate, selection_scores_SE)
        order_S = torch.sort(-score_S, stable=True).indices if batch_prioritized_routing else None
        offsets_KBE, counts_E = queue_offsets(indices_SK, order_S, used_S, E)
        capacity = int(capacity_of(counts_E))
        locations_SK, kept_gates_SK = assign_slots(indices_SK, gates_SK, order_S, used_S, offsets_KBE, capacity)
        ctx.save_for_backward(probs_SE, indices_SK, locations_SK)
        ctx.normalize_gate = normalize_gate
        ctx.logits_dtype = logits_SE.dtype
        ctx.mark_non_differentiable(indices_SK, locations_SK, counts_E)
        return probs_SE, kept_gates_SK, indices_SK, locations_SK, counts_E, capacity

    @staticmethod
    def backward(ctx: Any, grad_probs_SE: Optional[torch.Tensor], grad_gates_SK: Optional[torch.Tensor],
                 *_: Any) -> Tuple[Any, ...]:
        probs_SE, indices_SK, locations_SK = ctx.saved_tensors
        S, E = probs_SE.shape
        K = indices_SK.shape[1]
        grad_logits_SE = _empty((S, E), ctx.logits_dtype, probs_SE.device)
        if S > 0:
            BLOCK_T = _token_block(E)
            grad_gates_SK = None if grad_gates_SK is None else grad_gates_SK.to(torch.float32).contiguous()
            grad_probs_SE = None if grad_probs_SE is None else grad_probs_SE.to(torch.float32).contiguous()
            _gate_backward_kernel[(triton.cdiv(S, BLOCK_T),)](
                grad_logits_SE, probs_SE, indices_SK, locations_SK,
                grad_gates_SK if grad_gates_SK is not None else probs_SE,
                grad_probs_SE if grad_probs_SE is not None else probs_SE,
                S, E, K, grad_logits_SE.stride(0), _FP32_EPS, NORMALIZE=ctx.normalize_gate,
                HAS_GRAD_GATES=grad_gates_SK is not None, HAS_GRAD_PROBS=grad_probs_SE is not None,
                BLOCK_T=BLOCK_T, EP=triton.next_power_of_2(E))
        return grad_logits_SE, None, None, None, None, None, None


def tutel_gate(logits_SE: torch.Tensor, k: int, normalize_gate: bool, batch_prioritized_routing: bool,
               used_S: Optional[torch.Tensor],
               capacity_of: Callable[[torch.Tensor], int], selection_scores_SE: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Tutel's routing of logits_SE [S, E] on the GPU (see the module docstring).

    capacity_of maps counts_E (live choices per expert) to the capacity (it may all-reduce across ranks).
    used_S, if given, marks the tokens that take part (nonzero); the others get no slot and a zero gate.
    selection_scores_SE, if given, chooses the experts (no gradient flows into it); gates stay softmax(logits).
    Returns (probs_SE, gates_SK, indices_SK, locations_SK, counts_E, capacity); gates are 0 where dropped.
    """
    if logits_SE.dim() != 2:
        raise ValueError(f"tutel_gate: logits must be [S, E], got shape {tuple(logits_SE.shape)}")
    E = logits_SE.shape[1]
    if not 1 <= k <= E:
        raise ValueError(f"tutel_gate: k must be in [1, num_experts={E}], got {k}")
    if used_S is not None:
        used_S = used_S.reshape(-1).ne(0).to(torch.int8).contiguous()
    if selection_scores_SE is not None:
        if selection_scores_SE.shape != logits_SE.shape:
            raise ValueError(f"tutel_gate: selection scores {tuple(selection_scores_SE.shape)} must have the shape "
                             f"of the logits {tuple(logits_SE.shape)}")
        selection_scores_SE = selection_scores_SE.detach()
    return _TutelGate.apply(logits_SE, k, normalize_gate, batch_prioritized_routing, used_S, capacity_of,
                            selection_scores_SE)


__all__ = ["assign_slots", "queue_offsets", "softmax_topk", "tutel_gate"]
