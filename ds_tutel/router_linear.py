"""The router's fp32 linear map for tokens of any dtype, without keeping an fp32 copy of the tokens.

`F.linear(x.float(), w)` saves its fp32 input for the weight gradient: with bf16/fp16 tokens that is an [S, M]
fp32 copy living from the forward to the end of the backward, twice the size of the tokens themselves. Here the
copy is transient: the forward converts, multiplies and drops it; the backward converts again for the weight
gradient and writes the input gradient straight in the tokens' dtype, a block of rows at a time, so no [S, M]
fp32 buffer is ever allocated for it. Logits are bitwise those of `F.linear(x.float(), w)`.

Shape legend: S tokens, M model dim, E experts, B rows of one block.
"""
from __future__ import annotations

from typing import Any, Tuple

import torch
import torch.nn.functional as F

ROWS_PER_BLOCK = 512


class _RouterLinear(torch.autograd.Function):

    @staticmethod
    def forward(ctx: Any, x_SM: torch.Tensor, w_EM: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_SM, w_EM)
        return F.linear(x_SM.float(), w_EM)

    @staticmethod
    def backward(ctx: Any, grad_SE: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x_SM, w_EM = ctx.saved_tensors
        grad_x_SM = grad_w_EM = None
        if ctx.needs_input_grad[0]:
            grad_x_SM = torch.empty_like(x_SM, memory_format=torch.contiguous_format)
        if ctx.needs_input_grad[1]:
            grad_w_EM = torch.zeros_like(w_EM)
        # Blocks keep the CPU's fp32 temporaries small and in cache; a GPU does the whole table at once (one
        # kernel launch per product, the caching allocator reuses the temporary).
        block = ROWS_PER_BLOCK if x_SM.device.type == "cpu" else max(1, x_SM.shape[0])
        for start in range(0, x_SM.shape[0], block):
            rows = slice(start, start + block)
            if grad_x_SM is not None:
                grad_x_SM[rows] = grad_SE[rows].mm(w_EM)
            if grad_w_EM is not None:
                grad_w_EM.addmm_(grad_SE[rows].t(), x_SM[rows].float())
        return grad_x_SM, grad_w_EM


def router_linear(x_SM: torch.Tensor, w_EM: torch.Tensor) -> torch.Tensor:
    """fp32 logits [S, E] = x_SM.float() @ w_EM.T for fp32 weights w_EM [E, M] and tokens of any float dtype."""
    if x_SM.dtype == torch.float32:
        return F.linear(x_SM, w_EM)
    return _RouterLinear.apply(x_SM, w_EM)
