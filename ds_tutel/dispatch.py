"""Sparse encode (tokens -> expert buffer) and decode (expert buffer -> tokens), torch reference path.

Both move O(S * K * M) elements: a kept choice is one row copy, a dropped choice nothing. No one-hot or
[S, E, C] combine tensor is built. Sums over a token's k choices use index_add_, which is sequential (so
deterministic) on the CPU, this path's home; on GPUs the Triton kernels (ds_tutel.backends) write each row once
and need no atomics.

Two layouts: the capacity buffer [E, C, M] that the all-to-all exchanges (encode/decode), and a grouped buffer
[J, M] of the J kept choices, expert after expert, with no empty slots (grouped_encode/grouped_decode), which
lets each expert run on exactly its tokens when no exchange is needed.

Shape legend: S tokens, M model dim, E experts, K choices per token, C capacity, N = E * C buffer rows,
J kept choices.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, List, Optional, Sequence, Tuple

import torch

from . import cpu_kernels
from .routing import Routing
from .row_buckets import bucket

# Bytes of rows the grouped combine handles per operator call (see _blocks). Measured on its forward+backward
# (2-core EPYC, S=2048, M=256-1024, E=16-64): 128 and 512 KiB within noise of each other; 4 MiB up to 1.5x
# slower at E=16, its buffers too large for the allocator to reuse without page faults.
BLOCK_BYTES = 512 << 10
# The gather's backward joins a block of experts' gradient rows with one copy, for one index_add_, only where the
# experts average fewer bytes of rows than this; above it the copy costs more than the operator calls it saves.
# Measured on its index_add_ alone (2-core EPYC, fp32, S=2048, M=256): E=16, k=2 (256 KiB per expert) 0.32 ms
# one call per expert against 0.55 ms joined; E=64, k=1 (32 KiB) 0.47 against 0.16 ms.
CALL_BYTES = 128 << 10


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the type itself when it is wider."""
    return torch.promote_types(dtype, torch.float32)


class _Encode(torch.autograd.Function):
    """buf_NM[slot of (s, k)] = x_SM[s] for every kept choice; empty slots are zero."""

    @staticmethod
    def forward(ctx: Any, x_SM: torch.Tensor, token_J: torch.Tensor, slot_J: torch.Tensor,
                num_rows: int) -> torch.Tensor:
        ctx.save_for_backward(token_J, slot_J)
        ctx.num_tokens = x_SM.shape[0]
        buf_NM = x_SM.new_zeros(num_rows, x_SM.shape[1])
        buf_NM.index_copy_(0, slot_J, x_SM.index_select(0, token_J))
        return buf_NM

    @staticmethod
    def backward(ctx: Any, grad_NM: torch.Tensor) -> Tuple[Any, ...]:
        token_J, slot_J = ctx.saved_tensors
        grad_SM = grad_NM.new_zeros(ctx.num_tokens, grad_NM.shape[1])
        grad_SM.index_add_(0, token_J, grad_NM.index_select(0, slot_J))
        return grad_SM, None, None, None


class _Decode(torch.autograd.Function):
    """y_SM[s] = sum_k gates_SK[s, k] * buf_NM[slot of (s, k)] over kept choices, accumulated in fp32."""

    @staticmethod
    def forward(ctx: Any, buf_NM: torch.Tensor, gates_SK: torch.Tensor, kept_SK: torch.Tensor,
                token_J: torch.Tensor, slot_J: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(buf_NM, gates_SK, kept_SK, token_J, slot_J)
        acc = accumulation_dtype(buf_NM.dtype)
        y_SM = buf_NM.new_zeros(kept_SK.shape[0], buf_NM.shape[1], dtype=acc)
        weighted_JM = buf_NM.index_select(0, slot_J).to(acc) * gates_SK[kept_SK].unsqueeze(1)
        y_SM.index_add_(0, token_J, weighted_JM)
        return y_SM.to(buf_NM.dtype)

    @staticmethod
    def backward(ctx: Any, grad_SM: torch.Tensor) -> Tuple[Any, ...]:
        buf_NM, gates_SK, kept_SK, token_J, slot_J = ctx.saved_tensors
        acc = accumulation_dtype(buf_NM.dtype)
        grad_JM = grad_SM.to(acc).index_select(0, token_J)
        grad_buf_NM = buf_NM.new_zeros(buf_NM.shape)
        grad_buf_NM.index_copy_(0, slot_J, (grad_JM * gates_SK[kept_SK].unsqueeze(1)).to(buf_NM.dtype))
        grad_gates_SK = torch.zeros_like(gates_SK)
        grad_gates_SK[kept_SK] = (grad_JM * buf_NM.index_select(0, slot_J).to(acc)).sum(dim=1).to(gates_SK.dtype)
        return grad_buf_NM, grad_gates_SK, None, None, None


def _kept_pairs(routing: Routing) -> Tuple[torch.Tensor, torch.Tensor]:
    """(token_J, slot_J) of the kept choices, in (token, choice) order."""
    kept_SK = routing.kept_SK
    S, K = kept_SK.shape
    token_J = torch.arange(S, device=kept_SK.device).unsqueeze(1).expand(S, K)[kept_SK]
    return token_J, routing.slots_SK()[kept_SK]


def encode(x_SM: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Scatter the kept choices of x_SM into a zero-padded expert buffer [E, C, M]."""
    token_J, slot_J = _kept_pairs(routing)
    num_rows = routing.num_experts * routing.capacity
    buf_NM = _Encode.apply(x_SM, token_J, slot_J, num_rows)
    return buf_NM.view(routing.num_experts, routing.capacity, x_SM.shape[1])


def decode(buf_ECM: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Gather each token's expert outputs from [E, C, M] and sum them weighted by its gates -> [S, M]."""
    token_J, slot_J = _kept_pairs(routing)
    buf_NM = buf_ECM.reshape(-1, buf_ECM.shape[-1])
    return _Decode.apply(buf_NM, routing.gates_SK, routing.kept_SK, token_J, slot_J)


@dataclass
class GroupedPlan:
    """Which tokens each expert gets (token_J, expert after expert), their gates, rows per expert, and the rows
    each expert runs on (expert_rows: its rows, or more where row_buckets pads them; token_P then lists the
    tokens of that padded layout, pad rows pointing at token 0 and zeroed after the gather)."""

    token_J: torch.Tensor
    gates_J: Optional[torch.Tensor]  # None in plans for the compiled loops, which read gates_SK
    rows_per_expert: List[int]
    num_tokens: int
    single_choice: bool  # at most one kept choice per token (k=1)
    expert_rows: List[int] = field(default_factory=list)
    token_P: Optional[torch.Tensor] = None
    # For the compiled CPU loops (grouped_kernels.py): each choice's row among the J (-1: dropped), the gates
    # by choice, and the compiled module; kernels None means the torch-operator path.
    row_SK: Optional[torch.Tensor] = None
    gates_SK: Optional[torch.Tensor] = None
    kernels: Any = None

    def __post_init__(self) -> None:
        if not self.expert_rows:
            self.expert_rows = list(self.rows_per_expert)
        if self.token_P is None:
            self.token_P = self.token_J


def grouped_plan(routing: Routing, bucket_rows: bool = False, use_kernels: Optional[bool] = None) -> GroupedPlan:
    """Orders the kept choices expert after expert (slot order inside an expert) without sorting.

    bucket_rows: each expert runs on its row count rounded up by row_buckets (see there for when and why).
    use_kernels: gather and combine through the compiled CPU loops (grouped_kernels.py); None: wherever the
    tokens are on the CPU and the loops are built (cpu_kernels.load), False: the torch-operator path, True:
    the loops or an error. With the loops, one compiled pass also lays out the rows.
    """
    kernels = _kernels_for(routing.gates_SK.device, use_kernels)
    if kernels is not None:
        return _compiled_plan(routing, bucket_rows, kernels)
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
    if bucket_rows:
        plan.expert_rows = [bucket(n) for n in rows]
        if plan.expert_rows != rows:
            plan.token_P = _padded_tokens(token_J, rows, plan.expert_rows)
    return plan


def _compiled_plan(routing: Routing, bucket_rows: bool, kernels: Any) -> GroupedPlan:
    """The same plan from one compiled pass over the choices, plus each choice's row (row_SK) and the gates by
    choice, which the compiled loops read instead of gates_J."""
    S, K = routing.indices_SK.shape
    row_SK, token_J, rows_E = kernels.grouped_rows(routing.indices_SK, routing.locations_SK, routing.num_experts)
    rows = rows_E.tolist()
    plan = GroupedPlan(token_J=token_J, gates_J=None, rows_per_expert=rows, num_tokens=S, single_choice=K == 1,
                       row_SK=row_SK, gates_SK=routing.gates_SK, kernels=kernels)
    if bucket_rows:
        plan.expert_rows = [bucket(n) for n in rows]
        if plan.expert_rows != rows:
            plan.token_P = kernels.padded_tokens(token_J, rows, plan.expert_rows)
    return plan


def _kernels_for(device: torch.device, use_kernels: Optional[bool]) -> Any:
    if use_kernels is False:
        return None
    kernels = cpu_kernels.load_for(device)
    if use_kernels and kernels is None:
        raise RuntimeError(f"use_kernels=True needs CPU tokens and the built CPU kernels (device {device}, "
                           f"DS_TUTEL_CPU_KERNELS={cpu_kernels.mode()})")
    return kernels


def _padded_tokens(token_J: torch.Tensor, rows: List[int], expert_rows: List[int]) -> torch.Tensor:
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
    if plan.kernels is not None:
        return grouped_kernels.compiled_gather(x_SM, plan)
    return _GatherPerExpert.apply(x_SM, plan.token_J, plan.token_P, plan.rows_per_expert, plan.expert_rows)


def grouped_decode(outs_nM: Sequence[torch.Tensor], plan: GroupedPlan) -> torch.Tensor:
    """y_SM = sum over a token's kept choices of gate * expert output, accumulated in fp32."""
    if plan.kernels is not None:
        return grouped_kernels.compiled_combine(list(outs_nM), plan)
    return _CombinePerExpert.apply(plan.token_J, plan.gates_J, plan.num_tokens, plan.single_choice,
                                   plan.rows_per_expert, *outs_nM)


from . import grouped_kernels  # noqa: E402  (it builds on this module's accumulation_dtype and gather_rows)
