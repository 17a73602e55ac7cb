"""Exact-row dispatch with its plan on the device: the GPU path's grouped gather and combine, without host syncs.

The torch path's grouped plan (grouped.py) lists each expert's rows on the host, which a GPU pays for with a sync
every step. Here the plan stays on the device: each kept choice gets its row from the kept counts' running sum
(expert after expert, slot order inside an expert: grouped.py's order), and the experts get their row offsets as a
device tensor. Where the row count is not known on the host, the buffers are sized by a bound N >= J: rows J..N-1
belong to no expert, the combine never reads them, and their gradient never reaches the tokens.

Shape legend: S tokens, M model dim, E experts, K choices per token, J kept choices, N rows of the buffers (the J
kept rows, then rows of no expert), E1 = E + 1 offsets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch

from ..routing.types import Routing
from .capacity import accumulation_dtype


def kept_counts(routing: Routing) -> torch.Tensor:
    """int64 [E]: kept choices per expert, by a scatter-add into fixed bins (Routing.kept_per_expert's mask index
    and bincount would each sync a GPU)."""
    kept_SK = routing.kept_SK
    counts_E = torch.zeros(routing.num_experts, dtype=torch.int64, device=kept_SK.device)
    return counts_E.scatter_add_(0, routing.indices_SK.reshape(-1), kept_SK.reshape(-1).to(torch.int64))


@dataclass
class RowPlan:
    """Which token each row holds and which row each kept choice has, on the device.

    token_N:    int64, the token of each row (token 0 for rows of no expert).
    row_SK:     int64, each choice's row (0 where dropped: the combine masks it with kept_SK).
    kept_SK:    bool, the choices that got a slot.
    gates_SK:   the routing's gates (with autograd).
    offsets_E1: int64, expert e's rows are offsets_E1[e]:offsets_E1[e + 1]; offsets_E1[E] = J.
    rows_E:     the kept rows per expert on the host where the caller knew them (then N = J), else None.
    """

    token_N: torch.Tensor
    row_SK: torch.Tensor
    kept_SK: torch.Tensor
    gates_SK: torch.Tensor
    offsets_E1: torch.Tensor
    rows_E: Optional[List[int]]

    @property
    def num_rows(self) -> int:
        return self.token_N.shape[0]

    @property
    def exact(self) -> bool:
        """N = J: every row belongs to an expert."""
        return self.rows_E is not None


def row_bound(routing: Routing) -> int:
    """An upper bound on the kept choices known on the host: every choice, or every capacity slot."""
    S, K = routing.indices_SK.shape
    return min(S * K, routing.num_experts * routing.capacity)


def row_plan(routing: Routing, rows_E: Optional[Sequence[int]] = None,
             kept_E: Optional[torch.Tensor] = None) -> RowPlan:
    """The plan of one routing, built with device operators only (no host sync).

    rows_E: the kept rows per expert where the host already has them (the expert-parallel counts' exchange): the
    buffers then have exactly J rows; else N = row_bound(routing). kept_E: kept_counts(routing) if already made.
    """
    S, K = routing.indices_SK.shape
    device = routing.indices_SK.device
    N = sum(rows_E) if rows_E is not None else row_bound(routing)
    kept_E = kept_counts(routing) if kept_E is None else kept_E
    offsets_E1 = torch.zeros(kept_E.shape[0] + 1, dtype=torch.int64, device=device)
    torch.cumsum(kept_E, dim=0, out=offsets_E1[1:])
    kept_SK = routing.kept_SK
    # Filled slots are a prefix of each expert's buffer, so expert start + slot numbers its rows 0..n_e-1.
    row_SK = offsets_E1.index_select(0, routing.indices_SK.reshape(-1)).view(S, K) + routing.locations_SK
    # Dropped choices write their token into a scratch row N, cut off below.
    token_N1 = torch.zeros(N + 1, dtype=torch.int64, device=device)
    token_of_choice = torch.div(torch.arange(S * K, device=device), K, rounding_mode="floor")
    token_N1.scatter_(0, torch.where(kept_SK, row_SK, N).reshape(-1), token_of_choice)
    return RowPlan(token_N=token_N1[:N], row_SK=torch.where(kept_SK, row_SK, 0), kept_SK=kept_SK,
                   gates_SK=routing.gates_SK, offsets_E1=offsets_E1,
                   rows_E=None if rows_E is None else [int(n) for n in rows_E])


class _GatherRows(torch.autograd.Function):
    """x_SM -> x_NM (row n holds token_N[n]); backward adds each kept row's gradient at its token, rows of no expert
    left out (a grouped GEMM need not write their input gradient)."""

    @staticmethod
    def forward(ctx: Any, x_SM: torch.Tensor, token_N: torch.Tensor, offsets_E1: torch.Tensor,
                exact: bool) -> torch.Tensor:
        ctx.save_for_backward(token_N, offsets_E1)
        ctx.num_tokens, ctx.exact = x_SM.shape[0], exact
        return x_SM.index_select(0, token_N)

    @staticmethod
    def backward(ctx: Any, grad_NM: torch.Tensor):
        token_N, offsets_E1 = ctx.saved_tensors
        if not ctx.exact:
            kept_N1 = (torch.arange(grad_NM.shape[0], device=grad_NM.device) < offsets_E1[-1]).unsqueeze(1)
            grad_NM = torch.where(kept_N1, grad_NM, 0)
        grad_SM = grad_NM.new_zeros(ctx.num_tokens, grad_NM.shape[1])
        return grad_SM.index_add_(0, token_N, grad_NM), None, None, None


def gather(x_SM: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """x_NM: the tokens of the plan's rows, expert after expert (rows of no expert: token 0, never computed)."""
    return _GatherRows.apply(x_SM, plan.token_N, plan.offsets_E1, plan.exact)


class _CombineRows(torch.autograd.Function):
    """y_SM = sum over k of gate_SK[:, k] * out_NM[row_SK[:, k]] where kept, in fp32 (accumulation_dtype), one
    choice column at a time: its transients are [S, M], and it keeps only out_NM for the backward. Dropped choices
    are masked before any product, so neither the output nor any gradient sees what their row (or a row of no
    expert) holds. Backward: the gates' gradient from fp32 products, each kept row's gradient gate * grad rounded
    once to the outputs' dtype, zero for every other row."""

    @staticmethod
    def forward(ctx: Any, out_NM: torch.Tensor, row_SK: torch.Tensor, kept_SK: torch.Tensor,
                gates_SK: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(out_NM, row_SK, kept_SK, gates_SK)
        acc = accumulation_dtype(out_NM.dtype)
        y_SM = None
        for k in range(row_SK.shape[1]):
            term_SM = _picked(out_NM, row_SK, kept_SK, k) * gates_SK[:, k:k + 1].to(acc)
            y_SM = term_SM if y_SM is None else y_SM.add_(term_SM)
        return y_SM.to(out_NM.dtype)

    @staticmethod
    def backward(ctx: Any, grad_SM: torch.Tensor):
        out_NM, row_SK, kept_SK, gates_SK = ctx.saved_tensors
        acc = accumulation_dtype(out_NM.dtype)
        grad_acc_SM = grad_SM.to(acc)
        grad_out_NM = torch.zeros_like(out_NM) if ctx.needs_input_grad[0] else None
        grad_gates_S = []
        for k in range(row_SK.shape[1]):
            grad_gates_S.append((grad_acc_SM * _picked(out_NM, row_SK, kept_SK, k)).sum(dim=1))
            if grad_out_NM is not None:  # kept rows are distinct; a dropped choice adds zeros to row 0
                scaled_SM = torch.where(kept_SK[:, k:k + 1], grad_acc_SM * gates_SK[:, k:k + 1].to(acc), 0)
                grad_out_NM.index_add_(0, row_SK[:, k], scaled_SM.to(out_NM.dtype))
        return grad_out_NM, None, None, torch.stack(grad_gates_S, dim=1).to(gates_SK.dtype)


def _picked(out_NM: torch.Tensor, row_SK: torch.Tensor, kept_SK: torch.Tensor, k: int) -> torch.Tensor:
    """Each token's row of choice k, zero where that choice was dropped."""
    return torch.where(kept_SK[:, k:k + 1], out_NM.index_select(0, row_SK[:, k]), 0)


def combine(out_NM: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """y_SM = sum over a token's kept choices of gate * its row of out_NM, in fp32, rounded once to out_NM's dtype.
    Only kept rows are read: whatever the rows of no expert hold never reaches the output or a gradient."""
    if out_NM.shape[0] == 0:  # nothing kept: a zero row for the masked reads to point at
        out_NM = torch.cat([out_NM, out_NM.new_zeros(1, out_NM.shape[1])])
    return _CombineRows.apply(out_NM, plan.row_SK, plan.kept_SK, plan.gates_SK)
