"""The router's CPU passes: DeepSpeed's choices and capacity rule, slot ranks, and the softmax layout for few experts.

Each function has the signature and the results of the torch path it replaces (ds_tutel.routing.choices,
ds_tutel.routing.slots, ds_tutel.routing.softmax); `register_all` adds them to the registry with the conditions
under which they apply. Why these passes exist: docs/KERNELS.md ("CPU kernels").

Shape legend: S tokens, E experts, K choices per token, C capacity, J choices (flattened in token order).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import register
from . import build

# fp32 lanes of the vector unit torch's CPU kernels were built for, by torch's name for it.
_FP32_LANES = {"AVX512": 16, "AVX2": 8}


@functools.lru_cache(maxsize=None)
def row_kernel_min_experts() -> int:
    """The fewest experts for which torch's row-wise CPU softmax is the faster layout: one vector of fp32 lanes
    (docs/KERNELS.md, "CPU kernels"). Vector units this table does not know keep the AVX-512 threshold."""
    return _FP32_LANES.get(torch.backends.cpu.get_cpu_capability(), 16)


def column_softmax(logits_SE: torch.Tensor) -> torch.Tensor:
    """softmax over experts computed down the columns of the transposed table: with fewer experts than the CPU's
    fp32 vector lanes, rows of E floats are too short for torch's row-wise vector loop. Same values up to
    rounding, forward and backward."""
    return F.softmax(logits_SE.t().contiguous(), dim=0).t().contiguous()


def _few_experts(logits_SE: torch.Tensor) -> bool:
    return logits_SE.dim() == 2 and logits_SE.shape[1] < row_kernel_min_experts()


def _built() -> bool:
    return build.load() is not None


def _fp32_table(score_SE: torch.Tensor) -> bool:
    return score_SE.dtype == torch.float32 and score_SE.dim() == 2 and score_SE.shape[1] > 0


def top1(score_SE: torch.Tensor) -> torch.Tensor:
    return build.load().argmax_rows(score_SE.detach())


def top2(first_SE: torch.Tensor, second_SE: torch.Tensor) -> torch.Tensor:
    return build.load().top2_rows(first_SE.detach(), second_SE.detach())


def own_column_picks(top_CE: torch.Tensor, choice_S: torch.Tensor, wanted_S: torch.Tensor) -> torch.Tensor:
    return build.load().own_column_picks(top_CE, choice_S, wanted_S)


def rank_within_groups(group_J: torch.Tensor, num_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return tuple(build.load().rank_within_groups(group_J, num_groups))


def rank_by_score_within_groups(group_J: torch.Tensor, score_J: torch.Tensor, num_groups: int) -> torch.Tensor:
    return build.load().rank_by_score_within_groups(group_J, score_J, num_groups)


def top2_slots(choice_SK: torch.Tensor, used_S: Optional[torch.Tensor],
               num_experts: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(build.load().top2_slots(choice_SK, used_S, num_experts))


def _int64_groups(group_J: torch.Tensor, *rest) -> bool:
    return group_J.dtype == torch.int64 and _built()


def register_all() -> None:
    register("cpu", "router_softmax", column_softmax, accepts=_few_experts)
    register("cpu", "top1", top1, accepts=lambda score_SE: _fp32_table(score_SE) and _built())
    register("cpu", "top2", top2, accepts=lambda first_SE, second_SE: (
        _fp32_table(first_SE) and second_SE.dtype == first_SE.dtype and _built()))
    register("cpu", "own_column_picks", own_column_picks, accepts=lambda *args: _built())
    register("cpu", "rank_within_groups", rank_within_groups, accepts=_int64_groups)
    register("cpu", "rank_by_score_within_groups", rank_by_score_within_groups,
             accepts=lambda group_J, score_J, num_groups: score_J.device.type == "cpu" and _int64_groups(group_J))
    register("cpu", "top2_slots", top2_slots, accepts=_int64_groups)
