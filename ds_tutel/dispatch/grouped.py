"""The grouped (exact-row) dispatch: each expert gets exactly the rows of its kept choices, no empty slots.

grouped_plan orders the kept choices expert after expert; grouped_encode gathers each expert's input rows
[n_e, M]; grouped_decode adds gate * output back at each token, accumulated in fp32. Torch reference path; a
backend may register a compiled plan whose gather and combine run in one pass each (ds_tutel.kernels.cpu.grouped),
with the same results.

Shape legend: S tokens, M model dim, E experts, K choices per token, J kept choices (expert after expert),
p_e rows expert e runs on (its n_e kept rows, then zero pad rows where the experts round row counts up).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from .. import kernels
from ..routing.types import Routing
from .capacity import accumulation_dtype

RowRounding = Callable[[List[int]], List[int]]

# Bytes of rows the grouped combine handles per operator call (see _blocks): bounds its transient buffers while
# keeping operator calls few. The gather's backward joins a block of experts' gradient rows with one copy, for one
# index_add_, only where the experts average fewer bytes of rows than CALL_BYTES; above it the copy costs more
# than the calls it saves. Measurements: benchmarks/RESULTS.md, "Grouped combine by blocks of experts".
BLOCK_BYTES = 512 << 10
CALL_BYTES = 128 << 10


@dataclass
class GroupedPlan:
    """Which tokens each expert gets (token_J, expert after expert), their gates, rows per expert, and the rows
    each expert runs on (expert_rows: its rows, or more where the experts round row counts up; token_P then lists
    the tokens of that padded layout, pad rows pointing at token 0 and zeroed after the gather)."""

    token_J: torch.Tensor
    gates_J: Optional[torch.Tensor]  # None in compiled plans, which read gates_SK
    rows_per_expert: List[int]
    num_tokens: int
    single_choice: bool  # at most one kept choice per token (k=1)
    expert_rows: List[int] = field(default_factory=list)
    token_P: Optional[torch.Tensor] = None
    # Compiled plans (registered by a backend as "grouped_plan"): each choice's row among the J (-1: dropped), the
    # gates by choice, and the object whose gather(x_SM, plan) and combine(outs_pM, plan) run this plan.
    row_SK: Optional[torch.Tensor] = None
    gates_SK: Optional[torch.Tensor] = None
    compiled: Any = None

    def __post_init__(self) -> None:
        if not self.expert_rows:
            self.expert_rows = list(self.rows_per_expert)
        if self.token_P is None:
            self.token_P = self.token_J


def grouped_plan(routing: Routing, round_rows: Optional[RowRounding] = None,
                 use_kernels: Optional[bool] = None) -> GroupedPlan:
    """Orders the kept choices expert after expert (slot order inside an expert) without sorting.

    round_rows: the rows each expert runs on, from its kept rows (Experts.row_rounding: where a new matmul shape
    costs, counts round up to a few sizes; None: exact).
    use_kernels: None: a backend's compiled plan wherever one is registered for these tensors; False: the torch
    path; True: the compiled plan or an error.
    """
    compiled_plan = None if use_kernels is False else kernels.find("grouped_plan", routing.gates_SK.device, routing)
    if compiled_plan is not None:
        return compiled_plan(routing, round_rows)
    if use_kernels:
        raise RuntimeError(f"use_kernels=True needs a registered compiled grouped plan for these tensors (device "
                           f"{routing.gates_SK.device}); on the CPU, the built CPU kernels (DS_TUTEL_CPU_KERNELS)")
    S, K = routing.indices_SK.shape
    choice_J = routing.kept_SK.reshape(-1).nonzero().squeeze(1)  # kept choices in (token, choice) order
    expert_J = routing.indices_SK.reshape(-1).index_select(0, choice_J)
    kept_E = torch.bincount(expert_J, minlength=routing.num_experts)
    start_E = torch.cumsum(kept_E, dim=0) - kept_E
    row_J = start_E.index_select(0, expert_J) + routing.locations_SK.reshape(-1).index_select(0, choice_J)
    # row_J is a permutation of 0..J-1: invert it to list the choices in row order.
    choice_in_row_J = torch.empty_like(choice_J)
    choice_in_row_J[row_J] = choice_J
    token_J = torch.div(choice_in_row_J, K, rounding_mode="floor")
    rows = kept_E.tolist()
    plan = GroupedPlan(token_J=token_J, gates_J=routing.gates_SK.reshape(-1).index_select(0, choice_in_row_J),
                       rows_per_expert=rows, num_tokens=S, single_choice=K == 1)
    if round_rows is not None:
        plan.expert_rows = list(round_rows(rows))
        if plan.expert_rows != rows:
            plan.token_P = padded_tokens(token_J, rows, plan.expert_rows)
    return plan


def padded_tokens(token_J: torch.Tensor, rows: List[int], expert_rows: List[int]) -> torch.Tensor:
    """token_J laid out with each expert's segment grown from rows[e] to expert_rows[e] (pad entries: 0)."""
    token_P = token_J.new_zeros(sum(expert_rows))
    src = dst = 0
    for n, p in zip(rows, expert_rows):
        token_P[dst:dst + n] = token_J[src:src + n]
        src, dst = src + n, dst + p
    return token_P


def gather_rows(x_SM: torch.Tensor, token_P: torch.Tensor, rows: List[int],
                expert_rows: List[int]) -> Tuple[torch.Tensor, ...]:
    """One [p_e, M] view per expert of a single buffer of x_SM's rows at token_P, pad rows zeroed (the grouped
    gather's forward, for both paths)."""
    inputs_pM = _split_by_expert(x_SM.index_select(0, token_P), expert_rows)
    for x_pM, n, p in zip(inputs_pM, rows, expert_rows):
        if p > n:
            x_pM[n:].zero_()
    return inputs_pM


def _split_by_expert(tensor_J: torch.Tensor, rows_per_expert: List[int]) -> Tuple[torch.Tensor, ...]:
    return torch.split(tensor_J, rows_per_expert)


class _GatherPerExpert(torch.autograd.Function):
    """x_SM -> one [p_e, M] view per expert of a single gathered buffer: its n_e tokens, then p_e - n_e zero pad
    rows (none unless the plan buckets rows). Backward adds each expert's first n_e gradient rows back at its
    tokens: one index_add_ per expert, or per block of small experts (see _blocks and CALL_BYTES).

    The gathered rows live until the experts' backward; one buffer for them kept the first step's peak memory
    lower than one buffer per expert (measured, E=64), at the same speed.
    """

    @staticmethod
    def forward(ctx: Any, x_SM: torch.Tensor, token_J: torch.Tensor, token_P: torch.Tensor, rows: List[int],
                expert_rows: List[int]):
        ctx.save_for_backward(token_J)
        ctx.rows = rows
        ctx.num_tokens = x_SM.shape[0]
        return gather_rows(x_SM, token_P, rows, expert_rows)

    @staticmethod
    def backward(ctx: Any, *grads_pM: torch.Tensor):
        (token_J,) = ctx.saved_tensors
        rows = ctx.rows
        grad_SM = grads_pM[0].new_zeros(ctx.num_tokens, grads_pM[0].shape[1])
        row_bytes = grad_SM.shape[1] * grad_SM.element_size()
        start_E = list(accumulate(rows, initial=0))  # each expert's first row, then J
        for first, last in _blocks(rows, row_bytes):
            filled = [e for e in range(first, last) if rows[e]]
            # Copying small experts' rows together costs less than an operator call for each; a large expert's
            # rows go in straight from its gradient (a block of one expert, or few rows per call to save).
            if len(filled) > 1 and sum(rows[first:last]) * row_bytes <= (last - first) * CALL_BYTES:
                parts_nM = [_first_rows(grads_pM[e], rows[e]) for e in filled]
                grad_SM.index_add_(0, token_J[start_E[first]:start_E[last]], torch.cat(parts_nM))
                continue
            for e in filled:
                grad_SM.index_add_(0, token_J[start_E[e]:start_E[e + 1]], _first_rows(grads_pM[e], rows[e]))
        return grad_SM, None, None, None, None


class _CombinePerExpert(torch.autograd.Function):
    """y_SM = sum over kept choices of gate * expert output, added in fp32 at each row's token.

    Works a block of consecutive experts at a time (see _blocks): one product per expert written into the
    block's buffer, then one index_add_ per block, so the number of operator calls grows with the number of
    blocks rather than of experts. The order of the additions is fixed (expert after expert, rows in slot
    order), so results are deterministic. Products are formed in fp32 straight from half-precision outputs
    (type promotion, no converted copy). When every token has at most one kept choice (k=1), its output is that
    one product rounded once, which an fp32 accumulator would give too: half-precision outputs are then written
    in place, without an [S, M] fp32 buffer. Only the first rows[e] rows of expert e's output are read; its pad
    rows (bucketed plans) get a zero gradient.
    """

    @staticmethod
    def forward(ctx: Any, token_J: torch.Tensor, gates_J: torch.Tensor, num_tokens: int, single_choice: bool,
                rows: List[int], *outs_pM: torch.Tensor):
        ctx.save_for_backward(token_J, gates_J, *outs_pM)
        ctx.rows = rows
        dtype, M = outs_pM[0].dtype, outs_pM[0].shape[1]
        acc = accumulation_dtype(dtype)
        write_once = single_choice and acc != dtype
        y_SM = outs_pM[0].new_zeros(num_tokens, M, dtype=dtype if write_once else acc)
        gates_J1 = gates_J.to(acc).unsqueeze(1)
        start_E = list(accumulate(rows, initial=0))  # each expert's first row, then J
        for first, last in _blocks(rows, M * y_SM.element_size()):
            j0, j1 = start_E[first], start_E[last]
            weighted_bM = y_SM.new_empty(j1 - j0, M)
            for e in range(first, last):
                if rows[e]:
                    a, b = start_E[e], start_E[e + 1]
                    torch.mul(_first_rows(outs_pM[e], rows[e]), gates_J1[a:b], out=weighted_bM[a - j0:b - j0])
            if write_once:
                y_SM.index_copy_(0, token_J[j0:j1], weighted_bM)
            else:
                y_SM.index_add_(0, token_J[j0:j1], weighted_bM)
        return y_SM.to(dtype)

    @staticmethod
    def backward(ctx: Any, grad_SM: torch.Tensor):
        token_J, gates_J, *outs_pM = ctx.saved_tensors
        rows = ctx.rows
        M = grad_SM.shape[1]
        acc = accumulation_dtype(grad_SM.dtype)
        gates_J1 = gates_J.to(acc).unsqueeze(1)
        grad_gates_J = gates_J.new_empty(gates_J.shape, dtype=acc)
        grad_outs_pM: List[torch.Tensor] = []
        start_E = list(accumulate(rows, initial=0))  # each expert's first row, then J
        for first, last in _blocks(rows, M * torch.finfo(acc).bits // 8):
            j0, j1 = start_E[first], start_E[last]
            grad_bM = grad_SM.index_select(0, token_J[j0:j1]).to(acc)
            product_bM = torch.empty_like(grad_bM)
            for e in range(first, last):
                if rows[e]:
                    a, b = start_E[e] - j0, start_E[e + 1] - j0
                    torch.mul(grad_bM[a:b], _first_rows(outs_pM[e], rows[e]), out=product_bM[a:b])
            torch.sum(product_bM, dim=1, out=grad_gates_J[j0:j1])
            del product_bM
            # Scaled in fp32 and rounded once into the outputs' dtype, in one pass (fp32: in place).
            if all(outs_pM[e].shape[0] == rows[e] for e in range(first, last)):
                # No pad rows in this block: its experts' gradients are views of one buffer.
                scaled_bM = (grad_bM.mul_(gates_J1[j0:j1]) if grad_bM.dtype == grad_SM.dtype else
                             torch.mul(grad_bM, gates_J1[j0:j1], out=grad_SM.new_empty(grad_bM.shape)))
                grad_outs_pM.extend(_split_by_expert(scaled_bM, rows[first:last]))
                continue
            for e in range(first, last):
                a, b = start_E[e] - j0, start_E[e + 1] - j0
                grad_pM = grad_SM.new_empty(outs_pM[e].shape)
                torch.mul(grad_bM[a:b], gates_J1[j0 + a:j0 + b], out=grad_pM[:rows[e]])
                grad_pM[rows[e]:] = 0
                grad_outs_pM.append(grad_pM)
        return (None, grad_gates_J.to(gates_J.dtype), None, None, None, *grad_outs_pM)


def _blocks(rows: List[int], row_bytes: int) -> List[Tuple[int, int]]:
    """Consecutive expert ranges [first, last) of at most BLOCK_BYTES of rows each (an expert with more forms
    a block alone): the combine's buffers are per block, so its transient memory stays bounded whatever the
    token count, while its operator calls grow with the blocks rather than the experts."""
    blocks, first, size = [], 0, 0
    for e, n in enumerate(rows):
        if e > first and size + n * row_bytes > BLOCK_BYTES:
            blocks.append((first, e))
            first, size = e, 0
        size += n * row_bytes
    blocks.append((first, len(rows)))
    return blocks


def _first_rows(t_pM: torch.Tensor, n: int) -> torch.Tensor:
    return t_pM if t_pM.shape[0] == n else t_pM[:n]


def grouped_encode(x_SM: torch.Tensor, plan: GroupedPlan) -> Tuple[torch.Tensor, ...]:
    """Each expert's input [n_e, M]: the tokens of its kept choices, in slot order."""
    if plan.compiled is not None:
        return plan.compiled.gather(x_SM, plan)
    return _GatherPerExpert.apply(x_SM, plan.token_J, plan.token_P, plan.rows_per_expert, plan.expert_rows)


def grouped_decode(outs_nM: Sequence[torch.Tensor], plan: GroupedPlan) -> torch.Tensor:
    """y_SM = sum over a token's kept choices of gate * expert output, accumulated in fp32."""
    if plan.compiled is not None:
        return plan.compiled.combine(list(outs_nM), plan)
    return _CombinePerExpert.apply(plan.token_J, plan.gates_J, plan.num_tokens, plan.single_choice,
                                   plan.rows_per_expert, *outs_nM)


def with_pad_rows(parts_nM: List[torch.Tensor], rows: int) -> List[torch.Tensor]:
    """parts_nM (at least one, possibly empty) plus the zero pad rows that bring their rows up to `rows`."""
    pad = rows - sum(part.shape[0] for part in parts_nM)
    if pad == 0:
        return parts_nM
    like = parts_nM[0]
    return parts_nM + [like.new_zeros(pad, *like.shape[1:])]
