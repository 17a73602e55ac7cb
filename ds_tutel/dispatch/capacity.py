"""Capacity buffers: sparse encode (tokens -> [E, C, M]) and decode ([E, C, M] -> tokens), torch reference path.

These are the buffers DeepSpeed's layer exchanges, of fixed shape whatever the routing: the capacity strategy
uses them where the exchange needs fixed message sizes (2DH, overlap chunks, a2a_send="capacity") or where the
Triton kernels fill them. Both directions move O(S * K * M) elements: a kept choice is one row copy, a dropped
choice nothing; no one-hot or [S, E, C] combine tensor is built. Sums over a token's k choices use index_add_,
which is sequential (so deterministic) on the CPU; the Triton twins (triton_kernels.register) write each row once
and need no atomics.

Shape legend: S tokens, M model dim, E experts, K choices per token, C capacity, N = E * C buffer rows,
J kept choices.
"""
from __future__ import annotations

from typing import Any, Tuple

import torch

from ..routing.types import Routing


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the type itself when it is wider."""
    return torch.promote_types(dtype, torch.float32)


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
    def forward(ctx: Any, buf_NM: torch.Tensor, gates_SK: torch.Tensor, kept_SK: torch.Tensor,
                token_J: torch.Tensor, slot_J: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(buf_NM, gates_SK, kept_SK, token_J, slot_J)
        acc = accumulation_dtype(buf_NM.dtype)
        y_SM = buf_NM.new_zeros(kept_SK.shape[0], buf_NM.shape[1], dtype=acc)
        weighted_JM = buf_NM.index_select(0, slot_J).to(acc) * gates_SK[kept_SK].unsqueeze(1)
        y_SM.index_add_(0, token_J, weighted_JM)
        return y_SM.to(buf_NM.dtype)

    @staticmethod
    def backward(ctx: Any, grad_SM: torch.Tensor) -> Tuple[Any, ...]:
        buf_NM, gates_SK, kept_SK, token_J, slot_J = ctx.saved_tensors
        acc = accumulation_dtype(buf_NM.dtype)
        grad_JM = grad_SM.to(acc).index_select(0, token_J)
        grad_buf_NM = buf_NM.new_zeros(buf_NM.shape)
        grad_buf_NM.index_copy_(0, slot_J, (grad_JM * gates_SK[kept_SK].unsqueeze(1)).to(buf_NM.dtype))
        grad_gates_SK = torch.zeros_like(gates_SK)
        grad_gates_SK[kept_SK] = (grad_JM * buf_NM.index_select(0, slot_J).to(acc)).sum(dim=1).to(gates_SK.dtype)
        return grad_buf_NM, grad_gates_SK, None, None, None


def _kept_pairs(routing: Routing) -> Tuple[torch.Tensor, torch.Tensor]:
    """(token_J, slot_J) of the kept choices, in (token, choice) order."""
    kept_SK = routing.kept_SK
    S, K = kept_SK.shape
    token_J = torch.arange(S, device=kept_SK.device).unsqueeze(1).expand(S, K)[kept_SK]
    return token_J, routing.slots_SK()[kept_SK]


def encode(x_SM: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Scatter the kept choices of x_SM into a zero-padded expert buffer [E, C, M]."""
    token_J, slot_J = _kept_pairs(routing)
    num_rows = routing.num_experts * routing.capacity
    buf_NM = _Encode.apply(x_SM, token_J, slot_J, num_rows)
    return buf_NM.view(routing.num_experts, routing.capacity, x_SM.shape[1])


def decode(buf_ECM: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Gather each token's expert outputs from [E, C, M] and sum them weighted by its gates -> [S, M]."""
    token_J, slot_J = _kept_pairs(routing)
    buf_NM = buf_ECM.reshape(-1, buf_ECM.shape[-1])
    return _Decode.apply(buf_NM, routing.gates_SK, routing.kept_SK, token_J, slot_J)
