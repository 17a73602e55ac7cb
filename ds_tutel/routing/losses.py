"""Router losses: GShard's (DeepSpeed's l_aux), Switch Transformer's, and the router z-loss.

Shape legend: S tokens, E experts, K choices per token.
"""
from __future__ import annotations

import torch

from .slots import count_groups


def gshard_loss(probs_SE: torch.Tensor, indices_SK: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's l_aux: E * sum_e mean_prob_e * frac_e, with frac from the first choice for k <= 2 and from all
    k choices (divided by k) for k > 2, as DeepSpeed's top1/top2/topk gates compute it."""
    S, E = probs_SE.shape
    K = indices_SK.shape[1]
    chosen_SK = indices_SK[:, :1] if K <= 2 else indices_SK
    frac_E = count_groups(chosen_SK, E).float() / S
    scale = E if K <= 2 else E / K
    return torch.sum(probs_SE.mean(dim=0) * frac_E) * scale


def switch_loss(probs_SE: torch.Tensor, indices_SK: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's load-balancing loss: E * sum_e mean_prob_e * (share of all choices sent to e)."""
    S, E = probs_SE.shape
    share_E = torch.bincount(indices_SK.reshape(-1), minlength=E).float() / indices_SK.numel()
    return E * torch.sum(probs_SE.mean(dim=0) * share_E)


def z_loss(logits_SE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2; keeps the logits small and stable."""
    return torch.logsumexp(logits_SE, dim=1).square().mean()
