"""The router's softmax over experts, fast for the few-expert tables the CPU kernel handles slowly.

Shape legend: S tokens, E experts.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# fp32 lanes of the vector unit torch's CPU kernels were built for, by torch's name for it.
_FP32_LANES = {"AVX512": 16, "AVX2": 8}


@functools.lru_cache(maxsize=None)
def row_kernel_min_experts() -> int:
    """The fewest experts for which torch's row-wise CPU softmax is the faster layout: one vector of fp32 lanes.

    Measured on 2-core AMD EPYCs, one thread, torch 2.13: with AVX-512, the row kernel over 8 experts took about
    20x longer than the column layout; with AVX2 only (S = 2048, forward+backward), the columns won below E = 8
    (179 against 321 us at E = 4) and lost from E = 8 on (222 against 109 us at E = 8, 413 against 131 at 16).
    Vector units this table does not know keep the AVX-512 threshold.
    """
    return _FP32_LANES.get(torch.backends.cpu.get_cpu_capability(), 16)


def router_softmax(logits_SE: torch.Tensor) -> torch.Tensor:
    """softmax over the experts of fp32 logits [S, E].

    With fewer experts than the CPU's fp32 vector lanes, rows of E floats are too short for the CPU kernel's
    row-wise vector loop; computing it down the columns of the transposed table is then faster and gives the
    same values up to rounding, forward and backward (1 ulp apart with AVX-512, up to 5e-7 relative with AVX2;
    both as close to the float64 softmax).
    """
    if logits_SE.device.type == "cpu" and logits_SE.shape[1] < row_kernel_min_experts():
        return F.softmax(logits_SE.t().contiguous(), dim=0).t().contiguous()
    return F.softmax(logits_SE, dim=1)
