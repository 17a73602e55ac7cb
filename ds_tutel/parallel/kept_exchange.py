"""The expert-parallel exchange of exactly the kept rows: all-to-alls sized by the routing, not by the capacity.

DeepSpeed's layer (and exchange.py) sends every expert's whole capacity, filled or not: an [E, C, M] buffer out and
back, whose empty slots are zeros nobody reads. Here a rank sends the rows of its grouped plan (its kept choices,
expert after expert, so the rows for rank w are one contiguous block), each rank receives its local experts' rows
from every rank, and the experts run on exactly those rows (plus pad rows where the experts round row counts up). The outputs go back the same way, and the sender's grouped combine reads them where its gather took them from.
On the wire: the kept rows instead of E x C, in both directions and in the backward.

The row counts are the ones exchange_counts already shares before the layer dispatches (filled_WL: what every
source rank sends each local expert), so the split sizes agree on every rank without another collective.

Two forms: exchange_kept_and_compute on the torch path's grouped plan (dispatch/grouped.py; the experts get one
tensor each), and exchange_kept_rows_and_compute on the device plan (dispatch/rows.py, the GPU path: the received
rows sorted by local expert with one gather, the experts on one buffer with device offsets, no host sync here).

Shape legend: S tokens, M model dim, W ranks in the expert-parallel group, L local experts, J rows this rank sends
(its kept choices, expert after expert), R rows it receives (source rank after source rank, and within one source
its local experts in order), n_l rows local expert l receives from all ranks, p_l rows it runs on (n_l or more),
B blocks of (local expert, source rank) rows.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..dispatch import rows
from ..dispatch.grouped import GroupedPlan, RowRounding, grouped_decode, grouped_encode, with_pad_rows
from . import alltoall as comm

ExpertsFn = Callable[[Sequence[torch.Tensor]], List[torch.Tensor]]  # per local expert [p_l, M] -> [p_l, M]
# x_RM sorted by local expert, offsets_L1 on its device, rows_L on the host -> out_RM in the same order
RowExpertsFn = Callable[[torch.Tensor, torch.Tensor, List[int]], torch.Tensor]


@dataclass
class KeptLayout:
    """Who sends how many rows to whom, and where each (source rank w, local expert l) block of rows sits."""

    send_W: List[int]  # rows this rank sends to each rank
    recv_W: List[int]  # rows this rank receives from each rank
    rows_L: List[int]  # n_l: rows of local expert l, over all source ranks
    expert_rows_L: List[int]  # p_l: rows local expert l runs on (n_l, or its row bucket)
    received_LW: List[List[slice]]  # block (w, l) among the received rows (source after source)
    within_expert_WL: List[List[slice]]  # block (w, l) among local expert l's rows (source after source)
    me: int  # this rank's place in the group


def kept_layout(rows_E: Sequence[int], filled_WL: Sequence[Sequence[int]], me: int,
                round_rows: Optional[RowRounding] = None) -> KeptLayout:
    """The layout of one exchange, from this rank's kept rows per expert (rows_E, E = W * L) and the rows every
    rank sends each local expert (filled_WL[w][l]); no collective."""
    W, L = len(filled_WL), len(filled_WL[0])
    if len(rows_E) != W * L:
        raise ValueError(f"{len(rows_E)} experts' row counts, expected {W} ranks x {L} local experts")
    send_W = [sum(rows_E[w * L:(w + 1) * L]) for w in range(W)]
    recv_W = [sum(filled_L) for filled_L in filled_WL]
    rows_L = [sum(filled_WL[w][l] for w in range(W)) for l in range(L)]
    ends = list(accumulate(n for filled_L in filled_WL for n in filled_L))  # received order: (w, l)
    received_LW = [[slice(ends[w * L + l] - filled_WL[w][l], ends[w * L + l]) for w in range(W)] for l in range(L)]
    within_expert_WL = [[None] * L for _ in range(W)]
    for l in range(L):
        for w, end in enumerate(accumulate(filled_WL[w][l] for w in range(W))):
            within_expert_WL[w][l] = slice(end - filled_WL[w][l], end)
    expert_rows_L = rows_L if round_rows is None else list(round_rows(rows_L))
    return KeptLayout(send_W, recv_W, rows_L, expert_rows_L, received_LW,
                      within_expert_WL, me)


def _all_to_all_rows(x_JM: torch.Tensor, send_W: List[int], recv_W: List[int], me: int,
                     group: comm.Group) -> torch.Tensor:
    """Row block w of x_JM (send_W[w] rows) goes to rank w; returns the blocks every rank sent here, in rank
    order (comm.exchange_rows: a rank's own block stays here where it is first or last)."""
    x_JM = x_JM.contiguous()
    out_RM = x_JM.new_empty(sum(recv_W), x_JM.shape[1])
    comm.exchange_rows(out_RM, x_JM, send_W, recv_W, group, me, async_op=False)
    return out_RM


class _AllToAllRows(torch.autograd.Function):
    """_all_to_all_rows with autograd: the backward sends the gradient rows back the way they came."""

    @staticmethod
    def forward(ctx: Any, x_JM: torch.Tensor, layout: KeptLayout, group: comm.Group, reverse: bool) -> torch.Tensor:
        ctx.layout, ctx.group, ctx.reverse = layout, group, reverse
        send, recv = (layout.recv_W, layout.send_W) if reverse else (layout.send_W, layout.recv_W)
        return _all_to_all_rows(x_JM, send, recv, layout.me, group)

    @staticmethod
    def backward(ctx: Any, grad_RM: torch.Tensor):
        return _AllToAllRows.apply(grad_RM, ctx.layout, ctx.group, not ctx.reverse), None, None, None


def _rows_by_expert(recv_RM: torch.Tensor, layout: KeptLayout) -> Tuple[torch.Tensor, ...]:
    """recv_RM's rows regrouped: per local expert [p_l, M], its block from every source rank, then zero pad rows.
    Block copies (one cat per expert), not an index per row."""
    return tuple(torch.cat(with_pad_rows([recv_RM[rows] for rows in layout.received_LW[l]], p))
                 for l, p in enumerate(layout.expert_rows_L))


def _rows_by_source(parts_pM: Sequence[Optional[torch.Tensor]], layout: KeptLayout,
                    like_0M: torch.Tensor) -> torch.Tensor:
    """The inverse of _rows_by_expert: the received order back, in one cat of (source rank, local expert) blocks,
    pad rows dropped (a part may be None where autograd has no gradient for an expert that got no rows).
    like_0M: dtype, device and M of the result."""
    blocks = [part_pM[rows] for rows_L in layout.within_expert_WL
              for part_pM, rows in zip(parts_pM, rows_L) if rows.stop > rows.start]
    return torch.cat(blocks) if blocks else like_0M.new_empty(0, like_0M.shape[1])


class _ByExpert(torch.autograd.Function):
    """recv_RM -> per local expert [p_l, M] (a permutation plus zero pad rows); backward: the inverse."""

    @staticmethod
    def forward(ctx: Any, recv_RM: torch.Tensor, layout: KeptLayout):
        ctx.layout, ctx.like_0M = layout, recv_RM.new_empty(0, recv_RM.shape[1])
        return _rows_by_expert(recv_RM, layout)

    @staticmethod
    def backward(ctx: Any, *grads_pM: Optional[torch.Tensor]):
        return _rows_by_source(grads_pM, ctx.layout, ctx.like_0M), None


class _BySource(torch.autograd.Function):
    """Per local expert outputs [p_l, M] -> [R, M] in received order (pad rows dropped); backward: the inverse,
    pad rows' gradient zero."""

    @staticmethod
    def forward(ctx: Any, layout: KeptLayout, *outs_pM: torch.Tensor) -> torch.Tensor:
        ctx.layout = layout
        return _rows_by_source(outs_pM, layout, outs_pM[0][:0])

    @staticmethod
    def backward(ctx: Any, grad_RM: torch.Tensor):
        return (None, *_rows_by_expert(grad_RM, ctx.layout))


def _as_one_block(plan: GroupedPlan) -> GroupedPlan:
    """The same plan with all J rows as one block: the gather then yields one [J, M] tensor to send, and the
    combine reads one received [J, M] tensor (rows keep their order: expert after expert)."""
    J = sum(plan.rows_per_expert)
    return replace(plan, rows_per_expert=[J], expert_rows=[J], token_P=plan.token_J)


def exchange_kept_and_compute(tokens_SM: torch.Tensor, plan: GroupedPlan, filled_WL: Sequence[Sequence[int]],
                              experts: ExpertsFn, group: comm.Group,
                              round_rows: Optional[RowRounding] = None) -> torch.Tensor:
    """y_SM: gather this rank's kept rows, send each to its expert's rank, run the local experts on what every
    rank sent, send the outputs back, combine. plan: this rank's grouped plan over all E experts, without row
    rounding; filled_WL: exchange_counts' counts (the same numbers as every rank's plan); round_rows: how the
    local experts' row counts round up before they run (Experts.row_rounding; None: exact)."""
    layout = kept_layout(plan.rows_per_expert, filled_WL, dist.get_rank(group), round_rows)
    block = _as_one_block(plan)
    (send_JM,) = grouped_encode(tokens_SM, block)
    recv_RM = _AllToAllRows.apply(send_JM, layout, group, False)
    outs_pM = experts(_ByExpert.apply(recv_RM, layout))
    back_JM = _AllToAllRows.apply(_BySource.apply(layout, *outs_pM), layout, group, True)
    return grouped_decode([back_JM], block)


def expert_major_order(layout: KeptLayout) -> torch.Tensor:
    """perm_R (CPU, int64): position r of the rows sorted by local expert (source rank after source rank inside
    an expert) holds received row perm_R[r]. Built from the blocks' host sizes with vector operators."""
    blocks = [rows for rows_W in layout.received_LW for rows in rows_W]
    R = sum(layout.recv_W)
    length_B = torch.tensor([b.stop - b.start for b in blocks], dtype=torch.int64)
    received_start_B = torch.tensor([b.start for b in blocks], dtype=torch.int64)
    sorted_start_B = torch.cumsum(length_B, 0) - length_B
    shift_R = torch.repeat_interleave(received_start_B - sorted_start_B, length_B, output_size=R)
    return torch.arange(R, dtype=torch.int64) + shift_R


class _Permute(torch.autograd.Function):
    """x_RM -> x_RM[perm_R]; backward: the gradient gathered back with the inverse permutation (no scatter)."""

    @staticmethod
    def forward(ctx: Any, x_RM: torch.Tensor, perm_R: torch.Tensor, inverse_R: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse_R)
        return x_RM.index_select(0, perm_R)

    @staticmethod
    def backward(ctx: Any, grad_RM: torch.Tensor):
        (inverse_R,) = ctx.saved_tensors
        return grad_RM.index_select(0, inverse_R), None, None


def exchange_kept_rows_and_compute(tokens_SM: torch.Tensor, plan: rows.RowPlan, filled_WL: Sequence[Sequence[int]],
                                   experts: RowExpertsFn, group: comm.Group) -> torch.Tensor:
    """exchange_kept_and_compute on the device plan (the GPU path): the rows received from all ranks are sorted by
    local expert with one gather, the local experts run on that one buffer with device offsets
    (Experts.forward_rows: grouped GEMMs where it can), and the outputs go back sorted by source rank. All sizes
    come from the counts' exchange (plan.rows_E, filled_WL): no host sync here."""
    if plan.rows_E is None:
        raise ValueError("the kept exchange needs a plan with exact rows (row_plan(routing, rows_E=...))")
    layout = kept_layout(plan.rows_E, filled_WL, dist.get_rank(group))
    device = tokens_SM.device
    perm_R = expert_major_order(layout)
    inverse_R = torch.empty_like(perm_R)
    inverse_R[perm_R] = torch.arange(perm_R.shape[0], dtype=torch.int64)
    perm_R, inverse_R = perm_R.to(device, non_blocking=True), inverse_R.to(device, non_blocking=True)
    offsets_L1 = torch.tensor([0, *accumulate(layout.rows_L)], dtype=torch.int64).to(device, non_blocking=True)

    send_JM = rows.gather(tokens_SM, plan)
    recv_RM = _AllToAllRows.apply(send_JM, layout, group, False)
    out_RM = experts(_Permute.apply(recv_RM, perm_R, inverse_R), offsets_L1, layout.rows_L)
    back_JM = _AllToAllRows.apply(_Permute.apply(out_RM, inverse_R, perm_R), layout, group, True)
    return rows.combine(back_JM, plan)
