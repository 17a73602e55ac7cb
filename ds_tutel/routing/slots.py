"""Slot arithmetic in sparse form: the position of each choice among the choices of its expert.

DeepSpeed computes a choice's slot as a cumulative sum down a dense one-hot [S, E] table; the same integers come
from one stable sort of the S * K choices by expert, which touches O(S * K) elements instead of O(S * E). An
accelerated implementation registered in ds_tutel.kernels gives the same integers (on the CPU, one counting pass
without a sort).

Shape legend: J choices (flattened in token order), G groups (experts, or experts of one choice rank).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import kernels


def count_groups(group_J: torch.Tensor, num_groups: int) -> torch.Tensor:
    """int64 [num_groups]: how many elements fall in each group; elements with group num_groups are excluded
    (group_J must lie in [0, num_groups]). A scatter-add of ones, not bincount, whose output size depends on the
    data and so makes a GPU host wait."""
    counts_G = torch.zeros(num_groups + 1, dtype=torch.int64, device=group_J.device)
    counts_G.scatter_add_(0, group_J.reshape(-1), torch.ones_like(group_J.reshape(-1), dtype=torch.int64))
    return counts_G[:num_groups]


def _ranks_in_order(group_J: torch.Tensor, order_J: torch.Tensor, num_groups: int
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ranks given order_J, a permutation that sorts group_J (clamped) and, inside a group, the wanted order."""
    counts_G = torch.cat([count_groups(group_J, num_groups), group_J.new_zeros(1)])
    start_G = torch.cumsum(counts_G, dim=0) - counts_G
    rank_J = torch.empty_like(group_J)
    rank_J[order_J] = torch.arange(group_J.numel(), device=group_J.device) - start_G[group_J[order_J]]
    return rank_J, counts_G[:num_groups]


def rank_within_groups(group_J: torch.Tensor, num_groups: int,
                       use_kernels: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rank_J, counts_G): how many earlier elements (in J order) share each element's group, and group sizes.

    Elements whose group is `num_groups` or more are excluded: they are not counted, and their rank is
    meaningless. Exact integer arithmetic, equal to cumsum(one_hot(group_J), dim=0) - 1 read at each group.
    use_kernels=False keeps the torch operators even where the compiled loop exists (same integers).
    """
    fast = kernels.find("rank_within_groups", group_J.device, group_J, num_groups) if use_kernels else None
    if fast is not None:
        return fast(group_J, num_groups)
    group_J = group_J.clamp(max=num_groups)
    return _ranks_in_order(group_J, torch.argsort(group_J, stable=True), num_groups)


def rank_by_score_within_groups(group_J: torch.Tensor, score_J: torch.Tensor, num_groups: int,
                                use_kernels: bool = True) -> torch.Tensor:
    """Rank of each element inside its group when the group is ordered by score, highest first (equal scores
    in J order, NaN above every number). Excluded elements (group >= num_groups) get meaningless ranks."""
    fast = (kernels.find("rank_by_score_within_groups", group_J.device, group_J, score_J, num_groups)
            if use_kernels else None)
    if fast is not None:
        return fast(group_J, score_J, num_groups)
    group_J = group_J.clamp(max=num_groups)
    by_score_J = torch.argsort(score_J, descending=True, stable=True)
    order_J = by_score_J[torch.argsort(group_J[by_score_J], stable=True)]
    return _ranks_in_order(group_J, order_J, num_groups)[0]


def top2_slots(choice_SK: torch.Tensor, used_S: Optional[torch.Tensor], num_experts: int,
               use_kernels: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(location_SK, counts1_E, counts2_E): DeepSpeed's top-2 slots. A first choice ranks among its expert's
    first choices, a second choice among its expert's second choices, queued behind all of that expert's first
    ones; counts are of used tokens (used_S bool [S], None: all). Unused tokens' locations are meaningless."""
    E = num_experts
    fast = kernels.find("top2_slots", choice_SK.device, choice_SK, used_S, E) if use_kernels else None
    if fast is not None:
        return fast(choice_SK, used_S, E)
    group_SK = choice_SK + torch.tensor([0, E], device=choice_SK.device)  # second choices: groups E..2E-1
    if used_S is not None:
        group_SK = torch.where(used_S.unsqueeze(1), group_SK, torch.full_like(group_SK, 2 * E))
    rank_J, counts_G = rank_within_groups(group_SK.reshape(-1), 2 * E, use_kernels=False)
    counts1_E, counts2_E = counts_G[:E], counts_G[E:]
    location_SK = rank_J.view(-1, 2)
    location_SK[:, 1] += counts1_E[choice_SK[:, 1]]
    return location_SK, counts1_E, counts2_E
