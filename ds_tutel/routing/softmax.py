"""The router's softmax over experts.

The reference is torch's row-wise softmax; a backend may register a faster layout for some shapes (on the CPU,
down the columns for fewer experts than one vector of fp32 lanes: ds_tutel.kernels.cpu.routing).

Shape legend: S tokens, E experts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels


def router_softmax(logits_SE: torch.Tensor) -> torch.Tensor:
    """softmax over the experts of fp32 logits [S, E] (the same values up to rounding on every path)."""
    fast = kernels.find("router_softmax", logits_SE.device, logits_SE)
    if fast is not None:
        return fast(logits_SE)
    return F.softmax(logits_SE, dim=1)
