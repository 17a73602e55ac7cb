"""Triton kernels for sparse encode (tokens -> expert buffer) and decode (expert buffer -> tokens).

One kernel moves all the data. `_gather_rows_kernel` writes every output row exactly once, as a weighted sum
of up to G source rows accumulated in fp32:
    out_RM[r] = sum_g w_RG[r, g] * src_XM[idx_RG[r, g]]        (idx < 0 contributes nothing)
Because each output row is written once by one program (rather than scattered into a zeroed buffer), there
are no atomics, no separate zero fill, and the results are deterministic. The four passes are four uses of it:
    encode forward   rows = buffer slots, G = 1, idx = the token that fills the slot
    encode backward  rows = tokens,       G = K, idx = the slot of each choice, no weights (gather + sum over k)
    decode forward   rows = tokens,       G = K, idx = the slot of each choice, w = gates
    decode backward  rows = buffer slots, G = 1, idx = the token of the slot, w = its gate; the gate gradient
                     dot(buf[slot], grad_y[token]) rides along on the rows already loaded (per M block).
Each program owns BLOCK_R rows x BLOCK_M columns, so row copies are coalesced and any M works (masked tail).

Shape legend: S tokens, M model dim, E experts, K choices per token, C capacity, N = E * C buffer rows,
R output rows, G source rows summed into each output row, X source rows, B blocks of M.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import interpreting


def _empty(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocates every kernel output (uninitialised; the kernels write all of it). Tests poison it here."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _gather_rows_kernel(out_ptr, src_ptr, idx_ptr, w_ptr, dot_ptr, partial_ptr,
                        R, M, G, stride_out, stride_src, stride_dot, num_m_blocks,
                        HAS_W: tl.constexpr, WITH_DOT: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows_R = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols_M = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok_R = rows_R < R
    col_ok_M = cols_M < M
    acc_RM = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    if WITH_DOT:
        # G == 1 here (checked by the wrapper): one source row per output row, and the dot needs it unweighted.
        idx_R = tl.load(idx_ptr + rows_R, mask=row_ok_R, other=-1)
        live_R = idx_R >= 0
        live_RM = live_R[:, None] & col_ok_M[None, :]
        src_RM = tl.load(src_ptr + idx_R[:, None] * stride_src + cols_M[None, :], mask=live_RM,
                         other=0.0).to(tl.float32)
        other_RM = tl.load(dot_ptr + rows_R[:, None] * stride_dot + cols_M[None, :], mask=live_RM,
                           other=0.0).to(tl.float32)
        tl.store(partial_ptr + rows_R * num_m_blocks + pid_m, tl.sum(src_RM * other_RM, axis=1), mask=row_ok_R)
        if HAS_W:
            src_RM = src_RM * tl.load(w_ptr + rows_R, mask=live_R, other=0.0)[:, None]
        acc_RM += src_RM
    else:
        for g in range(G):
            idx_R = tl.load(idx_ptr + rows_R * G + g, mask=row_ok_R, other=-1)
            live_R = idx_R >= 0
            src_RM = tl.load(src_ptr + idx_R[:, None] * stride_src + cols_M[None, :],
                             mask=live_R[:, None] & col_ok_M[None, :], other=0.0).to(tl.float32)
            if HAS_W:
                src_RM = src_RM * tl.load(w_ptr + rows_R * G + g, mask=live_R, other=0.0)[:, None]
            acc_RM += src_RM
    tl.store(out_ptr + rows_R[:, None] * stride_out + cols_M[None, :], acc_RM.to(out_ptr.dtype.element_ty),
             mask=row_ok_R[:, None] & col_ok_M[None, :])


def _blocks(num_rows: int, M: int, element_size: int) -> Tuple[int, int, int]:
    """(BLOCK_R, BLOCK_M, num_warps). On a GPU: a few rows of up to 2 KiB each per program, enough programs to fill
    the machine. Under the interpreter every program costs Python overhead, so take big blocks instead."""
    if interpreting():
        return min(32, triton.next_power_of_2(max(num_rows, 1))), min(128, triton.next_power_of_2(M)), 1
    return 4, min(triton.next_power_of_2(M), 2048 // element_size), 4


def gather_rows(src_XM: torch.Tensor, idx_RG: torch.Tensor, w_RG: Optional[torch.Tensor] = None,
                dot_RM: Optional[torch.Tensor] = None,
                out_RM: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """out_RM[r] = sum_g w_RG[r, g] * src_XM[idx_RG[r, g]], skipping idx < 0; fp32 accumulation, src dtype out.

    With dot_RM (only for G == 1) also returns dot_R[r] = <src_XM[idx_RG[r, 0]], dot_RM[r]> in fp32, 0 where
    idx < 0 (the gate gradient of decode). idx_RG is int64; w_RG float32.
    """
    R, G = idx_RG.shape
    M = src_XM.shape[1]
    if src_XM.stride(1) != 1:
        src_XM = src_XM.contiguous()
    idx_RG = idx_RG.contiguous()
    w_RG = None if w_RG is None else w_RG.to(torch.float32).contiguous()
    if out_RM is None:
        out_RM = _empty((R, M), src_XM.dtype, src_XM.device)
    if dot_RM is not None:
        if G != 1:
            raise ValueError("gather_rows: the fused dot needs exactly one source row per output row")
        if dot_RM.stride(1) != 1:
            dot_RM = dot_RM.contiguous()
    if R == 0 or M == 0:
        out_RM.zero_()
        return out_RM, (None if dot_RM is None else torch.zeros(R, dtype=torch.float32, device=src_XM.device))
    BLOCK_R, BLOCK_M, num_warps = _blocks(R, M, src_XM.element_size())
    num_m_blocks = triton.cdiv(M, BLOCK_M)
    partial_RB = None
    if dot_RM is not None:
        partial_RB = _empty((R, num_m_blocks), torch.float32, src_XM.device)
    grid = (triton.cdiv(R, BLOCK_R), num_m_blocks)
    _gather_rows_kernel[grid](
        out_RM, src_XM, idx_RG, w_RG if w_RG is not None else idx_RG,
        dot_RM if dot_RM is not None else src_XM, partial_RB if partial_RB is not None else out_RM,
        R, M, G, out_RM.stride(0), src_XM.stride(0), dot_RM.stride(0) if dot_RM is not None else 0, num_m_blocks,
        HAS_W=w_RG is not None, WITH_DOT=dot_RM is not None, BLOCK_R=BLOCK_R, BLOCK_M=BLOCK_M,
        num_warps=num_warps)
    return out_RM, (None if partial_RB is None else partial_RB.sum(dim=1))


def slot_maps(indices_SK: torch.Tensor, locations_SK: torch.Tensor, capacity: int,
              num_experts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(slots_SK, choice_N): the flat buffer row of each choice (-1 where dropped), and its inverse, the flat
    choice s * K + k that fills each buffer row (-1 where the slot is empty)."""
    kept_SK = locations_SK >= 0
    slots_SK = torch.where(kept_SK, indices_SK * capacity + locations_SK, torch.full_like(indices_SK, -1))
    N = num_experts * capacity
    # Dropped choices write to a scratch row N that is cut off afterwards.
    choice_N = torch.full((N + 1,), -1, dtype=torch.int64, device=indices_SK.device)
    target_J = torch.where(kept_SK, slots_SK, torch.full_like(slots_SK, N)).reshape(-1)
    choice_N.index_put_((target_J,), torch.arange(target_J.numel(), device=indices_SK.device))
    return slots_SK, choice_N[:N]


class _Encode(torch.autograd.Function):
    """buf_NM[slot] = x_SM[token of slot]; empty slots are zero. Backward: grad_x[s] = sum_k grad_buf[slot(s, k)]."""

    @staticmethod
    def forward(ctx: Any, x_SM: torch.Tensor, slots_SK: torch.Tensor, token_N: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(slots_SK)
        buf_NM, _ = gather_rows(x_SM, token_N.unsqueeze(1))
        return buf_NM

    @staticmethod
    def backward(ctx: Any, grad_NM: torch.Tensor) -> Tuple[Any, ...]:
        (slots_SK,) = ctx.saved_tensors
        grad_SM, _ = gather_rows(grad_NM, slots_SK)
        return grad_SM, None, None


class _Decode(torch.autograd.Function):
    """y_SM[s] = sum_k gates_SK[s, k] * buf_NM[slot(s, k)] over kept choices, fp32 accumulation.

    Backward: grad_buf[slot] = gate * grad_y[token of slot] (zero for empty slots) and
    grad_gates[s, k] = <buf[slot(s, k)], grad_y[s]> (zero where dropped), in one pass over the buffer rows.
    """

    @staticmethod
    def forward(ctx: Any, buf_NM: torch.Tensor, gates_SK: torch.Tensor, slots_SK: torch.Tensor,
                choice_N: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(buf_NM, gates_SK, slots_SK, choice_N)
        y_SM, _ = gather_rows(buf_NM, slots_SK, gates_SK)
        return y_SM

    @staticmethod
    def backward(ctx: Any, grad_SM: torch.Tensor) -> Tuple[Any, ...]:
        buf_NM, gates_SK, slots_SK, choice_N = ctx.saved_tensors
        K = slots_SK.shape[1]
        filled_N = choice_N >= 0
        safe_choice_N = choice_N.clamp(min=0)
        token_N = torch.where(filled_N, safe_choice_N // K, choice_N)
        gate_N = torch.where(filled_N, gates_SK.reshape(-1)[safe_choice_N], torch.zeros_like(gates_SK).reshape(-1)[:1])
        want_gates = ctx.needs_input_grad[1]
        grad_NM, dot_N = gather_rows(grad_SM, token_N.unsqueeze(1), gate_N.unsqueeze(1),
                                     dot_RM=buf_NM if want_gates else None)
        grad_gates_SK = None
        if want_gates:
            kept_SK = slots_SK >= 0
            grad_gates_SK = torch.where(kept_SK, dot_N[slots_SK.clamp(min=0)], torch.zeros_like(dot_N[:1]))
        return grad_NM, grad_gates_SK, None, None


def encode(x_SM: torch.Tensor, indices_SK: torch.Tensor, locations_SK: torch.Tensor, capacity: int,
           num_experts: int) -> torch.Tensor:
    """Scatter each kept choice of x_SM into its expert slot of a zero-padded [E, C, M] buffer (differentiable)."""
    slots_SK, choice_N = slot_maps(indices_SK, locations_SK, capacity, num_experts)
    token_N = torch.where(choice_N >= 0, choice_N // indices_SK.shape[1], choice_N)
    buf_NM = _Encode.apply(x_SM, slots_SK, token_N)
    return buf_NM.view(num_experts, capacity, x_SM.shape[1])


def decode(buf_ECM: torch.Tensor, gates_SK: torch.Tensor, indices_SK: torch.Tensor,
           locations_SK: torch.Tensor) -> torch.Tensor:
    """Gather each token's kept expert outputs from [E, C, M], summed with its gates -> [S, M] (differentiable)."""
    E, C, M = buf_ECM.shape
    slots_SK, choice_N = slot_maps(indices_SK, locations_SK, C, E)
    return _Decode.apply(buf_ECM.reshape(E * C, M), gates_SK.to(torch.float32), slots_SK, choice_N)


__all__ = ["decode", "encode", "gather_rows", "slot_maps"]
