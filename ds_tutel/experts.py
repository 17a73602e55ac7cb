"""The local experts of one MoE layer, named and marked exactly as DeepSpeed's `Experts`.

Parameter names `deepspeed_experts.{i}.*`, `allreduce=False` and `group_name='ep_size_N'` are what the DeepSpeed
engine, ZeRO and the per-expert checkpoint files key on.

Shape legend: W ranks in the expert-parallel group, L local experts, C capacity, M model dim.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence

import torch
from torch import nn

from . import kernels
from .dispatch.grouped import RowRounding, with_pad_rows


def mark_expert_params(module: nn.Module, group_name: str) -> None:
    """Marks parameters as expert-parallel: reduced over the expert-data-parallel group, not the data group."""
    for param in module.parameters():
        param.allreduce = False
        param.group_name = group_name


class Experts(nn.Module):

    def __init__(self, expert: nn.Module, num_local_experts: int, group_name: str) -> None:
        super().__init__()
        self.deepspeed_experts = nn.ModuleList([copy.deepcopy(expert) for _ in range(num_local_experts)])
        self.num_local_experts = num_local_experts
        mark_expert_params(self, group_name)

    @staticmethod
    def row_rounding(device: torch.device, dtype: torch.dtype) -> Optional[RowRounding]:
        """How each expert's row count rounds up before it runs, where a matmul of a new shape costs a compile and
        resident memory (the "cpu" backend's row buckets for CPU half types through oneDNN); None: exact rows."""
        rounding = kernels.find("expert_row_rounding", device, dtype)
        return None if rounding is None else rounding(dtype)

    def forward(self, buf_WLCM: torch.Tensor) -> torch.Tensor:
        """Runs local expert l on buf_WLCM[:, l] (the slots every rank sent it)."""
        outputs = []
        for l, expert in enumerate(self.deepspeed_experts):
            out_WCM = expert(buf_WLCM[:, l])
            if isinstance(out_WCM, tuple):
                out_WCM = out_WCM[0]
            outputs.append(out_WCM)
        return torch.stack(outputs, dim=1)

    def forward_grouped(self, inputs_nM: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Runs expert l on inputs_nM[l], exactly its tokens (no empty capacity slots).

        Every expert runs, on zero rows if it got none, so each expert parameter always has a gradient (ZeRO
        reduces expert gradients in buckets that every rank must fill alike). A backend may wrap the run
        ("run_experts": on the CPU, fp32 experts run with oneDNN off, since row counts change every step).
        """
        run = kernels.find("run_experts", inputs_nM[0].device) if len(inputs_nM) else None
        return run(self._run_grouped, inputs_nM) if run is not None else self._run_grouped(inputs_nM)

    def _run_grouped(self, inputs_nM: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        outputs = []
        for x_nM, expert in zip(inputs_nM, self.deepspeed_experts):
            out_nM = expert(x_nM)
            outputs.append(out_nM[0] if isinstance(out_nM, tuple) else out_nM)
        return outputs

    def forward_filled(self, buf_WLCM: torch.Tensor, filled_WL: Sequence[Sequence[int]]) -> torch.Tensor:
        """Like forward, but each expert runs only on the filled slots: filled_WL[w][l] rows of buf_WLCM[w, l]
        (filled slots are a prefix of each buffer), plus zero pad rows where row_rounding rounds the count up.
        Outputs of empty slots are zero and never read."""
        rows_L = [sum(_rows_of(filled_WL, l)) for l in range(buf_WLCM.shape[1])]
        rounding = self.row_rounding(buf_WLCM.device, buf_WLCM.dtype)
        expert_rows_L = rows_L if rounding is None else list(rounding(rows_L))
        inputs_pM = _PackFilled.apply(buf_WLCM, filled_WL, expert_rows_L)
        return _UnpackFilled.apply(buf_WLCM.shape, filled_WL, *self.forward_grouped(inputs_pM))


def _rows_of(filled_WL: Sequence[Sequence[int]], l: int) -> List[int]:
    return [int(filled_L[l]) for filled_L in filled_WL]


class _PackFilled(torch.autograd.Function):
    """buf_WLCM -> per local expert l, the filled rows of every source rank w, stacked, then zero pad rows up
    to expert_rows_L[l]: [expert_rows_L[l], M]."""

    @staticmethod
    def forward(ctx, buf_WLCM: torch.Tensor, filled_WL: Sequence[Sequence[int]], expert_rows_L: List[int]):
        ctx.shape = buf_WLCM.shape
        ctx.filled_WL = filled_WL
        W, L = buf_WLCM.shape[:2]
        return tuple(torch.cat(with_pad_rows([buf_WLCM[w, l, :n] for w, n in enumerate(_rows_of(filled_WL, l))],
                                             expert_rows_L[l]))
                     for l in range(L))

    @staticmethod
    def backward(ctx, *grads_pM: torch.Tensor):
        grad_WLCM = grads_pM[0].new_zeros(ctx.shape)
        for l, grad_pM in enumerate(grads_pM):
            rows = _rows_of(ctx.filled_WL, l)
            for w, part_nM in enumerate(torch.split(grad_pM[:sum(rows)], rows)):
                grad_WLCM[w, l, :part_nM.shape[0]] = part_nM
        return grad_WLCM, None, None


class _UnpackFilled(torch.autograd.Function):
    """The inverse of _PackFilled: per-expert outputs (pad rows dropped) back into a zero buffer [W, L, C, M]."""

    @staticmethod
    def forward(ctx, shape: torch.Size, filled_WL: Sequence[Sequence[int]], *outs_pM: torch.Tensor):
        ctx.filled_WL = filled_WL
        ctx.expert_rows_L = [out_pM.shape[0] for out_pM in outs_pM]
        out_WLCM = outs_pM[0].new_zeros(shape)
        for l, out_pM in enumerate(outs_pM):
            rows = _rows_of(filled_WL, l)
            for w, part_nM in enumerate(torch.split(out_pM[:sum(rows)], rows)):
                out_WLCM[w, l, :part_nM.shape[0]] = part_nM
        return out_WLCM

    @staticmethod
    def backward(ctx, grad_WLCM: torch.Tensor):
        L = grad_WLCM.shape[1]
        grads = tuple(torch.cat(with_pad_rows([grad_WLCM[w, l, :n] for w, n in enumerate(_rows_of(ctx.filled_WL, l))],
                                              ctx.expert_rows_L[l]))
                      for l in range(L))
        return (None, None, *grads)
