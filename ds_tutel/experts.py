"""The local experts of one MoE layer, named and marked exactly as DeepSpeed's `Experts`.

Parameter names `deepspeed_experts.{i}.*`, `allreduce=False` and `group_name='ep_size_N'` are what the DeepSpeed
engine, ZeRO and the per-expert checkpoint files key on.

Shape legend: W ranks in the expert-parallel group, L local experts, C capacity, M model dim.
"""
from __future__ import annotations

import copy
from typing import List, Sequence

import torch
from torch import nn


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
        reduces expert gradients in buckets that every rank must fill alike).
        """
        outputs = []
        for x_nM, expert in zip(inputs_nM, self.deepspeed_experts):
            out_nM = expert(x_nM)
            outputs.append(out_nM[0] if isinstance(out_nM, tuple) else out_nM)
        return outputs
