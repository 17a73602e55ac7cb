"""The local experts of one MoE layer, named and marked exactly as DeepSpeed's `Experts`.

Parameter names `deepspeed_experts.{i}.*`, `allreduce=False` and `group_name='ep_size_N'` are what the DeepSpeed
engine, ZeRO and the per-expert checkpoint files key on.

Shape legend: W ranks in the expert-parallel group, L local experts, C capacity, M model dim.
"""
from __future__ import annotations

import copy

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
