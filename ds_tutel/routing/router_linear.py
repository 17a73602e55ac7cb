"""The router's fp32 linear map for tokens of any dtype: no fp32 copy of the tokens kept, and the tokens passed on.

`F.linear(x.float(), w)` saves its fp32 input for the weight gradient: with bf16/fp16 tokens that is an [S, M]
fp32 copy living from the forward to the end of the backward, twice the size of the tokens themselves. Here the
copy is transient: the forward converts, multiplies and drops it; the backward converts again for the weight
gradient and writes the input gradient straight in the tokens' dtype, a block of rows at a time (on a GPU too:
blocks of at most GPU_BLOCK_BYTES of fp32 rows), so the backward allocates no [S, M] fp32 buffer for it.
Logits are bitwise those of `F.linear(x.float(), w)`.

`router_linear_passing` also returns the tokens themselves (a view) for the dispatch to gather from. Their
gradient from the dispatch then arrives in the router's own backward call, which adds the router's share to it
in place. Otherwise autograd sums the two [S, M] gradients in a separate pass, into a third buffer. The sum is
the one autograd makes: one addition per element, in the tokens' dtype. The passed-on tokens must feed the
dispatch alone, whose backward makes a fresh gradient that nothing else holds; a gradient that is not a plain
contiguous tensor (a view, an expanded one, one with a graph) is added to out of place.

Shape legend: S tokens, M model dim, E experts, B rows of one block.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

ROWS_PER_BLOCK = 512  # on the CPU: fp32 temporaries small and in cache
# On a GPU: the fp32 temporaries of one block of rows stay under this many bytes; blocks this large keep the
# kernel launches few (a handful per step at training sizes), and the caching allocator reuses the buffer.
GPU_BLOCK_BYTES = 64 << 20


def _rows_per_block(device_type: str, M: int) -> int:
    """Rows of one block of the backward for tokens on this device type with M features."""
    if device_type == "cpu":
        return ROWS_PER_BLOCK
    return max(1, GPU_BLOCK_BYTES // (4 * max(1, M)))


def _fp32_logits(x_SM: torch.Tensor, w_EM: torch.Tensor) -> torch.Tensor:
    return F.linear(x_SM if x_SM.dtype == torch.float32 else x_SM.float(), w_EM)


def _may_add_in_place(grad_SM: torch.Tensor) -> bool:
    return grad_SM.is_contiguous() and grad_SM._base is None and not grad_SM.requires_grad


def _backward(x_SM: torch.Tensor, w_EM: torch.Tensor, grad_SE: torch.Tensor, grad_other_SM: Optional[torch.Tensor],
              needs_input_grad: Tuple[bool, ...]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grad_x_SM, grad_w_EM) of the logits, with the products and roundings of autograd's linear (and .float())
    backward. grad_other_SM, the tokens' gradient from the dispatch, is added to (in place where it is a plain
    tensor) and returned as grad_x_SM."""
    if grad_other_SM is not None and not _may_add_in_place(grad_other_SM):
        grad_other_SM = grad_other_SM.clone(memory_format=torch.contiguous_format)
    grad_x_SM = grad_w_EM = None
    if x_SM.dtype == torch.float32:
        if needs_input_grad[0]:
            grad_x_SM = grad_SE.mm(w_EM) if grad_other_SM is None else grad_other_SM.addmm_(grad_SE, w_EM)
        if needs_input_grad[1]:
            grad_w_EM = grad_SE.t().mm(x_SM)
        return grad_x_SM, grad_w_EM
    if needs_input_grad[0]:
        grad_x_SM = grad_other_SM if grad_other_SM is not None else torch.empty_like(
            x_SM, memory_format=torch.contiguous_format)
    if needs_input_grad[1]:
        grad_w_EM = torch.zeros_like(w_EM)
    block = _rows_per_block(x_SM.device.type, x_SM.shape[1])
    for start in range(0, x_SM.shape[0], block):
        rows = slice(start, start + block)
        if grad_x_SM is not None:
            if grad_other_SM is None:
                grad_x_SM[rows] = grad_SE[rows].mm(w_EM)
            else:  # rounded to the tokens' dtype first, as autograd's .float() backward rounds it
                grad_x_SM[rows] += grad_SE[rows].mm(w_EM).to(x_SM.dtype)
        if grad_w_EM is not None:
            grad_w_EM.addmm_(grad_SE[rows].t(), x_SM[rows].float())
    return grad_x_SM, grad_w_EM


class _RouterLinear(torch.autograd.Function):

    @staticmethod
    def forward(ctx: Any, x_SM: torch.Tensor, w_EM: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_SM, w_EM)
        return _fp32_logits(x_SM, w_EM)

    @staticmethod
    def backward(ctx: Any, grad_SE: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x_SM, w_EM = ctx.saved_tensors
        return _backward(x_SM, w_EM, grad_SE, None, ctx.needs_input_grad)


class _RouterLinearPassing(torch.autograd.Function):

    @staticmethod
    def forward(ctx: Any, x_SM: torch.Tensor, w_EM: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not an [S, M] of zeros
        ctx.save_for_backward(x_SM, w_EM)
        return _fp32_logits(x_SM, w_EM), x_SM.view_as(x_SM)

    @staticmethod
    def backward(ctx: Any, grad_SE: Optional[torch.Tensor], grad_tokens_SM: Optional[torch.Tensor]):
        x_SM, w_EM = ctx.saved_tensors
        if grad_SE is None:
            return grad_tokens_SM, None
        return _backward(x_SM, w_EM, grad_SE, grad_tokens_SM, ctx.needs_input_grad)


def router_linear(x_SM: torch.Tensor, w_EM: torch.Tensor) -> torch.Tensor:
    """fp32 logits [S, E] = x_SM.float() @ w_EM.T for fp32 weights w_EM [E, M] and tokens of any float dtype."""
    if x_SM.dtype == torch.float32:
        return F.linear(x_SM, w_EM)
    return _RouterLinear.apply(x_SM, w_EM)


def router_linear_passing(x_SM: torch.Tensor, w_EM: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits_SE, tokens_SM): router_linear's logits, and x_SM as a view to gather from (see the module
    docstring); the gradients of both reach x_SM through one backward call."""
    return _RouterLinearPassing.apply(x_SM, w_EM)
