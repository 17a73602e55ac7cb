"""The router's top-1 and top-2 expert choices, and the top-1 capacity rule, as DeepSpeed's gates make them.

DeepSpeed takes argmax over each token's scores, and for the second choice argmax again after overwriting the
first choice's score with -inf. On the CPU torch's argmax along rows of E = 8..64 scores took 70-230 us per
[2048, E] table here, and the overwrite copies the table; where the compiled loops are built
(ds_tutel.cpu_kernels) one pass over the rows gives the same integers, with torch's rules: the first NaN wins,
else the first of the largest. Other devices and dtypes keep the torch operators.

Shape legend: S tokens, E experts, K choices per token.
"""
from __future__ import annotations

from typing import Any

import torch

from . import cpu_kernels


def _compiled(score_SE: torch.Tensor, use_kernels: bool) -> Any:
    if not use_kernels or score_SE.dtype != torch.float32 or score_SE.dim() != 2 or score_SE.shape[1] == 0:
        return None
    return cpu_kernels.load_for(score_SE.device)


def top1(score_SE: torch.Tensor, use_kernels: bool = True) -> torch.Tensor:
    """int64 [S]: each token's argmax over its scores."""
    kernels = _compiled(score_SE, use_kernels)
    if kernels is not None:
        return kernels.argmax_rows(score_SE.detach())
    return torch.argmax(score_SE, dim=1)


def top2(first_SE: torch.Tensor, second_SE: torch.Tensor, use_kernels: bool = True) -> torch.Tensor:
    """int64 [S, 2]: argmax of first_SE, then argmax of second_SE with the first choice's score read as -inf."""
    kernels = _compiled(first_SE, use_kernels) if second_SE.dtype == first_SE.dtype else None
    if kernels is not None:
        return kernels.top2_rows(first_SE.detach(), second_SE.detach())
    first_S = torch.argmax(first_SE, dim=1)
    second_S = torch.argmax(second_SE.scatter(1, first_S.unsqueeze(1), float("-inf")), dim=1)
    return torch.stack([first_S, second_S], dim=1)


def own_column_picks(top_CE: torch.Tensor, choice_S: torch.Tensor, wanted_S: torch.Tensor,
                     use_kernels: bool = True) -> torch.Tensor:
    """bool [S]: DeepSpeed's top-1 capacity rule. top_CE holds torch.topk's picks (token indices) down each
    expert's column of the [S, E] table; a token stays when it is wanted and among the picks of the column of
    its own choice choice_S."""
    kernels = cpu_kernels.load_for(top_CE.device) if use_kernels else None
    if kernels is not None:
        return kernels.own_column_picks(top_CE, choice_S, wanted_S)
    pick_J = top_CE.reshape(-1)
    own_J = choice_S.index_select(0, pick_J) == torch.arange(top_CE.shape[1], device=top_CE.device).repeat(
        top_CE.shape[0])
    return torch.zeros_like(wanted_S).index_fill_(0, pick_J[own_J], True) & wanted_S
