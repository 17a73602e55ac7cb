"""The grouped plan, gather and combine with their backward passes in compiled CPU loops (build.py).

Same contract as ds_tutel.dispatch.grouped's torch path (_GatherPerExpert, _CombinePerExpert): outputs, the
experts' gradients and the tokens' gradients are bitwise those of the torch-operator path (a token's choices are
added in row order, as its index_add_ adds them, with the same roundings); the gates' gradient is the same dot
product summed in another order. One pass per direction instead of several, no zero-filled [S, M] or fp32 [J, M]
buffers.

Shape legend: S tokens, K choices per token, M model dim, E experts, J kept rows (expert after expert), p_e rows
expert e runs on (its n_e kept rows, then zero pad rows where row buckets round the count up).
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

from ...dispatch.capacity import accumulation_dtype
from ...dispatch.grouped import GroupedPlan, RowRounding, gather_rows
from ...routing.types import Routing
from . import build


class CompiledGather(torch.autograd.Function):
    """x_SM -> each expert's input rows; backward sums each token's rows' gradients in one compiled pass."""

    @staticmethod
    def forward(ctx: Any, x_SM: torch.Tensor, row_SK: torch.Tensor, token_P: torch.Tensor, rows: List[int],
                expert_rows: List[int], kernels: Any):
        ctx.save_for_backward(row_SK)
        ctx.rows, ctx.kernels = rows, kernels
        return gather_rows(x_SM, token_P, rows, expert_rows)

    @staticmethod
    def backward(ctx: Any, *grads_pM: torch.Tensor):
        (row_SK,) = ctx.saved_tensors
        grad_SM = ctx.kernels.gather_backward(row_SK, list(grads_pM), ctx.rows)
        return grad_SM, None, None, None, None, None


class CompiledCombine(torch.autograd.Function):
    """y_SM[s] = sum over s's kept choices of gates_SK[s, k] * its expert's output row, in one compiled pass
    (accumulated in fp32 for half types, rounded once); backward gives the gates' and outputs' gradients in
    another."""

    @staticmethod
    def forward(ctx: Any, row_SK: torch.Tensor, gates_SK: torch.Tensor, rows: List[int], expert_rows: List[int],
                kernels: Any, *outs_pM: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(row_SK, gates_SK, *outs_pM)
        ctx.rows, ctx.expert_rows, ctx.kernels = rows, expert_rows, kernels
        return kernels.combine_forward(row_SK, gates_SK, list(outs_pM), rows)

    @staticmethod
    def backward(ctx: Any, grad_SM: torch.Tensor):
        row_SK, gates_SK, *outs_pM = ctx.saved_tensors
        grad_gates_SK, *grad_outs_pM = ctx.kernels.combine_backward(row_SK, gates_SK, grad_SM, outs_pM, ctx.rows,
                                                                    ctx.expert_rows)
        return (None, grad_gates_SK, None, None, None, *grad_outs_pM)


class CompiledPlanOps:
    """What a compiled plan runs: grouped_encode and grouped_decode call these with the plan. Holds the loops
    that made the plan, so the plan runs them even where the setting (DS_TUTEL_CPU_KERNELS) changes meanwhile."""

    def __init__(self, loops: Any) -> None:
        self.loops = loops

    def gather(self, x_SM: torch.Tensor, plan: GroupedPlan) -> Tuple[torch.Tensor, ...]:
        return CompiledGather.apply(x_SM, plan.row_SK, plan.token_P, plan.rows_per_expert, plan.expert_rows,
                                    self.loops)

    def combine(self, outs_pM: List[torch.Tensor], plan: GroupedPlan) -> torch.Tensor:
        gates_SK = plan.gates_SK.to(accumulation_dtype(outs_pM[0].dtype)).contiguous()
        return CompiledCombine.apply(plan.row_SK, gates_SK, plan.rows_per_expert, plan.expert_rows, self.loops,
                                     *outs_pM)


def compiled_plan(routing: Routing, round_rows: Optional[RowRounding] = None) -> GroupedPlan:
    """grouped_plan from one compiled pass over the choices, plus each choice's row (row_SK) and the gates by
    choice, which the compiled loops read instead of gates_J."""
    loops = build.load()
    S, K = routing.indices_SK.shape
    row_SK, token_J, rows_E = loops.grouped_rows(routing.indices_SK, routing.locations_SK, routing.num_experts)
    rows = rows_E.tolist()
    plan = GroupedPlan(token_J=token_J, gates_J=None, rows_per_expert=rows, num_tokens=S, single_choice=K == 1,
                       row_SK=row_SK, gates_SK=routing.gates_SK, compiled=CompiledPlanOps(loops))
    if round_rows is not None:
        plan.expert_rows = list(round_rows(rows))
        if plan.expert_rows != rows:
            plan.token_P = loops.padded_tokens(token_J, rows, plan.expert_rows)
    return plan
