"""Collectives over the expert-parallel group, as autograd-aware functions.

The process groups are the ones DeepSpeed creates (deepspeed.utils.groups); these helpers only call the
collectives on them, so they run on gloo (CPU) and NCCL (GPU) alike.

Shape legend: W ranks in the group, L local experts, C capacity, M model dim.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]


def group_size(group: Group) -> int:
    return dist.get_world_size(group=group) if dist.is_available() and dist.is_initialized() else 1


class _AllToAll(torch.autograd.Function):
    """Exchanges equal blocks along dim 0: block w of the input goes to rank w. Its own inverse."""

    @staticmethod
    def forward(ctx: Any, group: Group, x: torch.Tensor) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[None, torch.Tensor]:
        return None, _AllToAll.apply(ctx.group, grad)


def all_to_all(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Flat all-to-all of x (dim 0 divisible by the group size); identity for a group of one."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(group, x)


def agree_max(value: int, group: Group, device: torch.device) -> int:
    """The largest `value` over the group (every rank must call it)."""
    if group_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())
