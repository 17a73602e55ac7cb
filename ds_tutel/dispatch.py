"""Sparse encode (tokens -> expert buffer) and decode (expert buffer -> tokens), torch reference path.

Both move O(S * K * M) elements: a kept choice is one row copy, a dropped choice nothing. No one-hot or
[S, E, C] combine tensor is built. Forward and backward are gathers and scatters with unique targets, so the
results are deterministic.

Shape legend: S tokens, M model dim, E experts, K choices per token, C capacity, N = E * C buffer rows.
"""
from __future__ import annotations

from typing import Any, Tuple

import torch

from .routing import Routing


class _Encode(torch.autograd.Function):
    """buf_NM[slot of (s, k)] = x_SM[s] for every kept choice; empty slots are zero."""

    @staticmethod
    def forward(ctx: Any, x_SM: torch.Tensor, token_J: torch.Tensor, slot_J: torch.Tensor,
                num_rows: int) -> torch.Tensor:
        ctx.save_for_backward(token_J, slot_J)
        ctx.num_tokens = x_SM.shape[0]
        buf_NM = x_SM.new_zeros(num_rows, x_SM.shape[1])
        buf_NM.index_copy_(0, slot_J, x_SM.index_select(0, token_J))
        return buf_NM

    @staticmethod
    def backward(ctx: Any, grad_NM: torch.Tensor) -> Tuple[Any, ...]:
        token_J, slot_J = ctx.saved_tensors
        grad_SM = grad_NM.new_zeros(ctx.num_tokens, grad_NM.shape[1])
        grad_SM.index_add_(0, token_J, grad_NM.index_select(0, slot_J))
        return grad_SM, None, None, None


class _Decode(torch.autograd.Function):
    """y_SM[s] = sum_k gates_SK[s, k] * buf_NM[slot of (s, k)] over kept choices, accumulated in fp32."""

    @staticmethod
    def forward(ctx: Any, buf_NM: torch.Tensor, gates_SK: torch.Tensor, slots_SK: torch.Tensor) -> torch.Tensor:
        scratch = buf_NM.shape[0]
        padded_NM = torch.cat([buf_NM, buf_NM.new_zeros(1, buf_NM.shape[1])])
        ctx.save_for_backward(padded_NM, gates_SK, slots_SK)
        ctx.num_rows = scratch
        y_SM = None
        for k in range(slots_SK.shape[1]):
            term_SM = padded_NM.index_select(0, slots_SK[:, k]) * gates_SK[:, k:k + 1]
            y_SM = term_SM if y_SM is None else y_SM + term_SM
        return y_SM.to(buf_NM.dtype)

    @staticmethod
    def backward(ctx: Any, grad_SM: torch.Tensor) -> Tuple[Any, ...]:
        padded_NM, gates_SK, slots_SK = ctx.saved_tensors
        grad_f_SM = grad_SM.float()
        grad_buf_NM = grad_SM.new_zeros(ctx.num_rows + 1, grad_SM.shape[1])
        grad_gates_SK = torch.empty_like(gates_SK)
        for k in range(slots_SK.shape[1]):
            rows_SM = padded_NM.index_select(0, slots_SK[:, k])
            grad_gates_SK[:, k] = (rows_SM.float() * grad_f_SM).sum(dim=1)
            grad_buf_NM.index_copy_(0, slots_SK[:, k], (grad_f_SM * gates_SK[:, k:k + 1]).to(grad_SM.dtype))
        return grad_buf_NM[:-1], grad_gates_SK, None


def encode(x_SM: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Scatter the kept choices of x_SM into a zero-padded expert buffer [E, C, M]."""
    kept_SK = routing.kept_SK
    token_J = torch.arange(x_SM.shape[0], device=x_SM.device).unsqueeze(1).expand_as(kept_SK)[kept_SK]
    slot_J = routing.slots_SK()[kept_SK]
    num_rows = routing.num_experts * routing.capacity
    buf_NM = _Encode.apply(x_SM, token_J, slot_J, num_rows)
    return buf_NM.view(routing.num_experts, routing.capacity, x_SM.shape[1])


def decode(buf_ECM: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Gather each token's expert outputs from [E, C, M] and sum them weighted by its gates -> [S, M]."""
    buf_NM = buf_ECM.reshape(-1, buf_ECM.shape[-1])
    return _Decode.apply(buf_NM, routing.gates_SK, routing.slots_SK())
