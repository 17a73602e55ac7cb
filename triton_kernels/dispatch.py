"""Triton kernels for sparse encode (tokens -> expert buffer) and decode (expert buffer -> tokens).

One kernel moves all the data. `_gather_rows_kernel` writes every output row exactly once, as a weighted sum
of up to G source rows accumulated in fp32:
    out_RM[r] = sum_g w[r, g] * src_XM[idx_RG[r, g] // idx_div]        (idx < 0 contributes nothing)
Because each output row is written once by one program (rather than scattered into a zeroed buffer), there
are no atomics, no separate zero fill, and the results are deterministic. The four passes are four uses of it,
on two index maps that `_slot_map_kernel` builds from the routing, once per forward (the caller passes them to
encode and decode): slots_SK (the buffer row of each choice, -1 where dropped) and its inverse choice_N (the flat
choice j = s * K + k filling each buffer row, -1 where empty):
    encode forward   rows = buffer rows, G = 1, idx = choice_N, idx_div = K (its token)
    encode backward  rows = tokens,      G = K, idx = slots_SK, no weights (gather + sum over k)
    decode forward   rows = tokens,      G = K, idx = slots_SK, w = gates_SK
    decode backward  rows = buffer rows, G = 1, idx = choice_N, idx_div = K, w = gates of the choice; the gate
                     gradient dot(buf[slot], grad_y[token]) rides along on the rows already loaded, written per
                     (choice, block of M) and summed over the blocks afterwards.
Each program owns BLOCK_R rows x BLOCK_M columns, so row copies are coalesced and any M works (masked tail);
BLOCK_M is up to 2 KiB of a row, BLOCK_R and the warps are autotuned on a GPU (one config under the interpreter).

Shape legend: S tokens, M model dim, E experts, K choices per token, C capacity, N = E * C buffer rows,
J = S * K choices, R output rows, G source rows summed into each output row, X source rows, B blocks of M.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import interpreting


def _empty(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocates every kernel output (uninitialised; the kernels write all of it). Tests poison it here."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _gather_rows_kernel(out_ptr, src_ptr, idx_ptr, w_ptr, dot_ptr, partial_ptr,
                        R, M, G, idx_div, stride_out, stride_src, stride_dot, num_m_blocks,
                        HAS_W: tl.constexpr, W_BY_IDX: tl.constexpr, WITH_DOT: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows_R = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols_M = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok_R = rows_R < R
    col_ok_M = cols_M < M
    acc_RM = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    for g in range(G):
        idx_R = tl.load(idx_ptr + rows_R * G + g, mask=row_ok_R, other=-1)
        live_R = idx_R >= 0
        live_RM = live_R[:, None] & col_ok_M[None, :]
        src_rows_R = tl.where(live_R, idx_R // idx_div, 0)
        src_RM = tl.load(src_ptr + src_rows_R[:, None] * stride_src + cols_M[None, :], mask=live_RM,
                         other=0.0).to(tl.float32)
        if WITH_DOT:
            # Only with G == 1 (checked by the wrapper): the dot of the unweighted source row with row r of dot_ptr,
            # stored for this index and block of M.
            other_RM = tl.load(dot_ptr + rows_R[:, None] * stride_dot + cols_M[None, :], mask=live_RM,
                               other=0.0).to(tl.float32)
            tl.store(partial_ptr + idx_R * num_m_blocks + pid_m, tl.sum(src_RM * other_RM, axis=1), mask=live_R)
        if HAS_W:
            if W_BY_IDX:
                w_R = tl.load(w_ptr + idx_R, mask=live_R, other=0.0)
            else:
                w_R = tl.load(w_ptr + rows_R * G + g, mask=live_R, other=0.0)
            src_RM = src_RM * w_R[:, None]
        acc_RM += src_RM
    tl.store(out_ptr + rows_R[:, None] * stride_out + cols_M[None, :], acc_RM.to(out_ptr.dtype.element_ty),
             mask=row_ok_R[:, None] & col_ok_M[None, :])


@triton.jit
def _slot_map_kernel(indices_ptr, locations_ptr, slots_ptr, choice_ptr, J, capacity, E, BLOCK_J: tl.constexpr):
    choices_J = tl.program_id(0).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    in_J = choices_J < J
    locations_J = tl.load(locations_ptr + choices_J, mask=in_J, other=-1)
    experts_J = tl.load(indices_ptr + choices_J, mask=in_J, other=0)
    # A choice outside the buffer (expert not in [0, E), slot not in [0, C)) counts as dropped: no routing, however
    # made, can make the dispatch read or write past the end of a buffer.
    kept_J = (locations_J >= 0) & (locations_J < capacity) & (experts_J >= 0) & (experts_J < E)
    slots_J = experts_J * capacity + locations_J
    tl.store(slots_ptr + choices_J, tl.where(kept_J, slots_J, -1), mask=in_J)
    # Kept choices own distinct slots, so this scatter has unique targets: no atomics, deterministic.
    tl.store(choice_ptr + slots_J, choices_J, mask=kept_J)


# (BLOCK_R rows per program, warps) tried by the autotuner on a GPU, per (M, G, which pass, dtype): from 2 rows per
# program (many programs, for few rows) to 16 (more bytes in flight per program). Four, so that the first step's
# compiles and trials stay short.
_GATHER_TILES = [(2, 4), (4, 4), (8, 8), (16, 8)]


def _gather_configs() -> List[triton.Config]:
    """The autotuner's choices; under the interpreter one, with many rows per program (each program costs Python
    overhead there, and one config means no benchmarking)."""
    if interpreting():
        return [triton.Config({"BLOCK_R": 32}, num_warps=1)]
    return [triton.Config({"BLOCK_R": rows}, num_warps=warps) for rows, warps in _GATHER_TILES]


# The kernel with its rows per program and warps autotuned (BLOCK_M stays the wrapper's: the fused dot's partial
# sums are laid out by it). A separate name, so that _gather_rows_kernel stays the plain kernel.
_gather_rows_tuned = triton.autotune(configs=_gather_configs(),
                                     key=["M", "G", "HAS_W", "W_BY_IDX", "WITH_DOT"])(_gather_rows_kernel)


def _block_m(M: int, element_size: int) -> int:
    """Columns per program: on a GPU up to 2 KiB of a row, so a few rows make a coalesced program; under the
    interpreter at most 128 (tests cover several blocks of M with small M)."""
    if interpreting():
        return min(128, triton.next_power_of_2(M))
    return min(triton.next_power_of_2(M), 2048 // element_size)


def gather_rows(src_XM: torch.Tensor, idx_RG: torch.Tensor, w: Optional[torch.Tensor] = None, *,
                idx_div: int = 1, w_by_idx: bool = False, dot_RM: Optional[torch.Tensor] = None,
                num_idx: int = 0, out_RM: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """out_RM[r] = sum_g w[.] * src_XM[idx_RG[r, g] // idx_div], skipping idx < 0; fp32 accumulation, src dtype out.

    The weight is w[r, g] (w shaped like idx_RG), or w[idx] with w_by_idx. With dot_RM (only for G == 1) also
    returns dot_I (fp32, num_idx entries): dot_I[idx_RG[r, 0]] = <src_XM[idx_RG[r, 0] // idx_div], dot_RM[r]>,
    0 for indices no row uses (the gate gradient of decode). idx_RG is int64; w is cast to float32.
    """
    R, G = idx_RG.shape
    M = src_XM.shape[1]
    device = src_XM.device
    if src_XM.stride(1) != 1:
        src_XM = src_XM.contiguous()
    idx_RG = idx_RG.contiguous()
    w = None if w is None else w.to(torch.float32).contiguous()
    if out_RM is None:
        out_RM = _empty((R, M), src_XM.dtype, device)
    dot_I = None
    if dot_RM is not None:
        if G != 1:
            raise ValueError("gather_rows: the fused dot needs exactly one source row per output row")
        if dot_RM.stride(1) != 1:
            dot_RM = dot_RM.contiguous()
    if R == 0 or M == 0:
        out_RM.zero_()
        return out_RM, (None if dot_RM is None else torch.zeros(num_idx, dtype=torch.float32, device=device))
    BLOCK_M = _block_m(M, src_XM.element_size())
    num_m_blocks = triton.cdiv(M, BLOCK_M)
    partial_IB = None
    if dot_RM is not None:
        partial_IB = torch.zeros((num_idx, num_m_blocks), dtype=torch.float32, device=device)
    _gather_rows_tuned[lambda meta: (triton.cdiv(R, meta["BLOCK_R"]), num_m_blocks)](
        out_RM, src_XM, idx_RG, w if w is not None else idx_RG,
        dot_RM if dot_RM is not None else src_XM, partial_IB if partial_IB is not None else out_RM,
        R, M, G, idx_div, out_RM.stride(0), src_XM.stride(0), dot_RM.stride(0) if dot_RM is not None else 0,
        num_m_blocks, HAS_W=w is not None, W_BY_IDX=w_by_idx, WITH_DOT=dot_RM is not None, BLOCK_M=BLOCK_M)
    if partial_IB is not None:
        dot_I = partial_IB[:, 0] if num_m_blocks == 1 else partial_IB.sum(dim=1)
    return out_RM, dot_I


# (slots_SK, choice_N), see slot_maps.
SlotMaps = Tuple[torch.Tensor, torch.Tensor]


def slot_maps(indices_SK: torch.Tensor, locations_SK: torch.Tensor, capacity: int, num_experts: int) -> SlotMaps:
    """(slots_SK, choice_N): the flat buffer row of each choice (-1 where dropped, or where its expert or slot lies
    outside the [E, C] buffer), and its inverse, the flat choice s * K + k that fills each buffer row (-1 where the
    slot is empty). One kernel launch; build it once per routing and pass it to encode and decode."""
    S, K = indices_SK.shape
    device = indices_SK.device
    slots_SK = _empty((S, K), torch.int64, device)
    choice_N = torch.full((num_experts * capacity,), -1, dtype=torch.int64, device=device)
    J = S * K
    if J > 0:
        BLOCK_J = min(1024, triton.next_power_of_2(J))
        _slot_map_kernel[(triton.cdiv(J, BLOCK_J),)](indices_SK.contiguous(), locations_SK.contiguous(), slots_SK,
                                                    choice_N, J, capacity, num_experts, BLOCK_J=BLOCK_J)
    return slots_SK, choice_N


class _Encode(torch.autograd.Function):
    """buf_NM[slot] = x_SM[token of slot]; empty slots are zero. Backward: grad_x[s] = sum_k grad_buf[slot(s, k)]."""

    @staticmethod
    def forward(ctx: Any, x_SM: torch.Tensor, slots_SK: torch.Tensor, choice_N: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(slots_SK)
        buf_NM, _ = gather_rows(x_SM, choice_N.unsqueeze(1), idx_div=slots_SK.shape[1])
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
        ctx.save_for_backward(buf_NM, gates_SK, choice_N)
        y_SM, _ = gather_rows(buf_NM, slots_SK, gates_SK)
        return y_SM

    @staticmethod
    def backward(ctx: Any, grad_SM: torch.Tensor) -> Tuple[Any, ...]:
        buf_NM, gates_SK, choice_N = ctx.saved_tensors
        S, K = gates_SK.shape
        want_gates = ctx.needs_input_grad[1]
        grad_NM, dot_J = gather_rows(grad_SM, choice_N.unsqueeze(1), gates_SK, idx_div=K, w_by_idx=True,
                                     dot_RM=buf_NM if want_gates else None, num_idx=S * K)
        return grad_NM, (dot_J.view(S, K) if want_gates else None), None, None


def encode(x_SM: torch.Tensor, indices_SK: torch.Tensor, locations_SK: torch.Tensor, capacity: int,
           num_experts: int, maps: Optional[SlotMaps] = None) -> torch.Tensor:
    """Scatter each kept choice of x_SM into its expert slot of a zero-padded [E, C, M] buffer (differentiable).
    maps: slot_maps(indices_SK, locations_SK, capacity, num_experts) if already built (else built here)."""
    if maps is None:
        maps = slot_maps(indices_SK, locations_SK, capacity, num_experts)
    slots_SK, choice_N = maps
    buf_NM = _Encode.apply(x_SM, slots_SK, choice_N)
    return buf_NM.view(num_experts, capacity, x_SM.shape[1])


def decode(buf_ECM: torch.Tensor, gates_SK: torch.Tensor, indices_SK: torch.Tensor,
           locations_SK: torch.Tensor, maps: Optional[SlotMaps] = None) -> torch.Tensor:
    """Gather each token's kept expert outputs from [E, C, M], summed with its gates -> [S, M] (differentiable).
    maps: slot_maps(indices_SK, locations_SK, C, E) if already built (else built here)."""
    E, C, M = buf_ECM.shape
    if maps is None:
        maps = slot_maps(indices_SK, locations_SK, C, E)
    slots_SK, choice_N = maps
    return _Decode.apply(buf_ECM.reshape(E * C, M), gates_SK.to(torch.float32), slots_SK, choice_N)


__all__ = ["SlotMaps", "decode", "encode", "gather_rows", "slot_maps"]
