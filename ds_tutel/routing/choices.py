"""The router's top-1 and top-2 expert choices, and the top-1 capacity rule, as DeepSpeed's gates make them.

DeepSpeed takes argmax over each token's scores, and for the second choice argmax again after overwriting the
first choice's score with -inf. These are the torch operators; an accelerated implementation registered in
ds_tutel.kernels (on the CPU, one compiled pass over the rows) gives the same integers, with torch's rules: the
first NaN wins, else the first of the largest.

Shape legend: S tokens, E experts, K choices per token.
"""
from __future__ import annotations

import torch

from .. import kernels


def top1(score_SE: torch.Tensor, use_kernels: bool = True) -> torch.Tensor:
    """int64 [S]: each token's argmax over its scores."""
    fast = kernels.find("top1", score_SE.device, score_SE) if use_kernels else None
    if fast is not None:
        return fast(score_SE)
    return torch.argmax(score_SE, dim=1)


def top2(first_SE: torch.Tensor, second_SE: torch.Tensor, use_kernels: bool = True) -> torch.Tensor:
    """int64 [S, 2]: argmax of first_SE, then argmax of second_SE with the first choice's score read as -inf."""
    fast = kernels.find("top2", first_SE.device, first_SE, second_SE) if use_kernels else None
    if fast is not None:
        return fast(first_SE, second_SE)
    first_S = torch.argmax(first_SE, dim=1)
    second_S = torch.argmax(second_SE.scatter(1, first_S.unsqueeze(1), float("-inf")), dim=1)
    return torch.stack([first_S, second_S], dim=1)


def own_column_picks(top_CE: torch.Tensor, choice_S: torch.Tensor, wanted_S: torch.Tensor,
                     use_kernels: bool = True) -> torch.Tensor:
    """bool [S]: DeepSpeed's top-1 capacity rule. top_CE holds torch.topk's picks (token indices) down each
    expert's column of the [S, E] table; a token stays when it is wanted and among the picks of the column of
    its own choice choice_S."""
    fast = kernels.find("own_column_picks", top_CE.device, top_CE, choice_S, wanted_S) if use_kernels else None
    if fast is not None:
        return fast(top_CE, choice_S, wanted_S)
    pick_J = top_CE.reshape(-1)
    own_J = choice_S.index_select(0, pick_J) == torch.arange(top_CE.shape[1], device=top_CE.device).repeat(
        top_CE.shape[0])
    # Counting a token's own-column picks (not indexing with the boolean own_J) keeps the shapes data-independent.
    own_picks_S = torch.zeros(wanted_S.shape[0], dtype=torch.int32, device=top_CE.device)
    return (own_picks_S.index_add_(0, pick_J, own_J.to(torch.int32)) > 0) & wanted_S
