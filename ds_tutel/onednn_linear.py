"""fp32 `nn.Linear` layers of the experts with their three matmuls run by oneDNN instead of the BLAS (opt-in).

torch runs fp32 CPU matmuls through its BLAS (MKL on x86). On some CPUs that library does not use the widest
vector instructions the CPU has. On this project's AMD EPYC with AVX-512, MKL ran fp32 GEMMs at about 77 GFLOP/s
on one core, and oneDNN ran the same products at 2.1-2.3 times that (torch 2.13). An expert Linear's forward and
backward together were 1.6-2.3 times faster (benchmarks/RESULTS.md, sixteenth session).

`cpu_fp32_linear="onednn"` on `ds_tutel.MoE` turns the exact `nn.Linear` modules inside the layer's own expert
copies into `OneDNNLinear` (same parameters, names and state dict; only the class changes). Their forward runs
y = x W^T + b, and their backward runs grad_x = g W and grad_W = g^T x, as oneDNN matmuls. The sums run in
another order than the BLAS's, so results agree with nn.Linear to fp32 rounding, not bitwise.

The cost is memory. oneDNN compiles and keeps a primitive for every matmul shape it meets (about 2.6 MB and
3 ms per new row count for a 512 -> 1024 Linear's three products here). The layer therefore rounds fp32 row
counts to row buckets (row_buckets.py), as it does for bf16, which bounds the number of primitives but keeps them
resident. Anything else (other dtypes, GPUs, CPU autocast, reduced-precision fp32 matmuls) runs nn.Linear's own
forward.

Shape legend: R rows, K input features, N output features.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .onednn_off import fp32_matmuls_in_full_precision

CPU_FP32_LINEARS = ("blas", "onednn")


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True where torch has oneDNN and its dense linear operator."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def runs_here(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where OneDNNLinear takes the oneDNN path for this input and weight. Not for an empty input (an
    expert that got no tokens): oneDNN builds no primitive for zero rows."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() > 0 and not torch.is_autocast_enabled("cpu") and fp32_matmuls_in_full_precision()
            and available())


def _matmul_nt(a_RK: torch.Tensor, b_NK: torch.Tensor, bias_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a_RK @ b_NK^T (+ bias_N) by oneDNN; either operand may be a transposed view."""
    return torch.ops.mkldnn._linear_pointwise(a_RK, b_NK, bias_N, "none", [], "")


class _OneDNNLinearFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx: Any, x_RK: torch.Tensor, weight_NK: torch.Tensor, bias_N: Optional[torch.Tensor]):
        ctx.save_for_backward(x_RK, weight_NK)
        ctx.has_bias = bias_N is not None
        return _matmul_nt(x_RK, weight_NK, bias_N)

    @staticmethod
    def backward(ctx: Any, grad_RN: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x_RK, weight_NK = ctx.saved_tensors
        grad_RN = grad_RN.contiguous()
        grad_x = _matmul_nt(grad_RN, weight_NK.t()) if ctx.needs_input_grad[0] else None
        grad_w = _matmul_nt(grad_RN.t(), x_RK.t()) if ctx.needs_input_grad[1] else None
        grad_b = grad_RN.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias) with the matmuls run by oneDNN, forward and backward (fp32 CPU tensors)."""
    x_RK = x.reshape(-1, x.shape[-1])
    y_RN = _OneDNNLinearFunction.apply(x_RK, weight, bias)
    return y_RN.reshape(*x.shape[:-1], weight.shape[0])


class OneDNNLinear(nn.Linear):
    """nn.Linear whose fp32 CPU matmuls run by oneDNN (see the module docstring); otherwise nn.Linear itself."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if runs_here(input, self.weight):
            return onednn_linear(input, self.weight, self.bias)
        return F.linear(input, self.weight, self.bias)


def route_linears_through_onednn(module: nn.Module) -> int:
    """Turns every exact nn.Linear inside `module` into a OneDNNLinear in place; returns how many.

    Subclasses of nn.Linear keep their own class: their forward may do more than a linear map."""
    count = 0
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = OneDNNLinear
            count += 1
    return count
