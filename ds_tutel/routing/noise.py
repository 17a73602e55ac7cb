"""Random draws used by routing, made so that a seeded run draws exactly what DeepSpeed's gate draws.

DeepSpeed samples through torch.distributions (Uniform / Gumbel rsample); those reduce to one torch.rand call
followed by fixed arithmetic, which is reproduced here without building distribution objects per call.
"""
from __future__ import annotations

from typing import Sequence

import torch


def uniform(shape: Sequence[int], device: torch.device, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """float32 uniform draws in [low, high), bit-identical to Uniform(low, high).rsample(shape)."""
    low_t = torch.tensor(low, device=device)
    high_t = torch.tensor(high, device=device)
    return low_t + torch.rand(tuple(shape), device=device) * (high_t - low_t)


def gumbel(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Standard Gumbel draws, bit-identical to Gumbel(0, 1).rsample(shape)."""
    finfo = torch.finfo(torch.float32)
    u = uniform(shape, device, finfo.tiny, 1.0 - finfo.eps)
    return -torch.log(-torch.log(u))


def multiplicative_jitter(x: torch.Tensor, epsilon: float = 1e-2) -> torch.Tensor:
    """x times a uniform factor in [1 - epsilon, 1 + epsilon) (Switch Transformer's input jitter)."""
    if epsilon == 0:
        return x
    return x * uniform(x.shape, x.device, 1.0 - epsilon, 1.0 + epsilon)
