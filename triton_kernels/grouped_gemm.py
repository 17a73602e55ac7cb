"""Triton grouped GEMM for the experts: every local expert's nn.Linear on exactly its rows, forward and backward.

    y_NO[rows of l] = x_NI[rows of l] @ weights[l].T + biases[l]        rows of l = offsets_L1[l]:offsets_L1[l + 1]

The experts keep their own parameters (DeepSpeed's per-expert names and checkpoints stay as they are): the kernels
read expert l's weight, bias and gradient tensors through small device arrays of per-expert addresses (int64,
built from data_ptr() on the host, copied without a sync, cached while the addresses do not change).

Three kernels, none of whose grids depends on the row offsets' values (no host sync to launch):
  _grouped_mm_kernel   out[rows of l] = a[rows of l] @ B_l (+ bias_l). The grid covers an upper bound of the row
                       tiles, cdiv(N, BLOCK_M) + L, times the column tiles; each program reads the offsets, finds
                       which expert and which of its row tiles it owns (a prefix sum of the experts' tile counts),
                       and does nothing where there is none. Rows of no expert (a padded buffer's tail) are not
                       computed or written. Forward: a = x, B_l = W_l^T; backward: a = dy, B_l = W_l (the same
                       kernel with B's strides swapped).
  _weight_grad_kernel  dW_l = dy_l^T @ x_l, one program per (expert, tile of W); the reduction runs over the
                       expert's rows, read from the offsets, so an expert with no rows writes zeros.
  _bias_grad_kernel    db_l = sum of dy_l over its rows, one program per (expert, block of O).
Tiles accumulate in fp32 whatever the input dtype (fp32, bf16, fp16). fp32 inputs use TF32 only where torch
allows it for CUDA matmuls (torch.backends.cuda.matmul.allow_tf32), as nn.Linear does. Tile sizes, warps and
stages are autotuned per GPU generation (Ampere and Hopper lists, pruned by shared memory); under Triton's
interpreter one small configuration runs, so tests stay fast. Plain pointer loads only (no TMA descriptors or
Hopper-only intrinsics): the same source compiles for SM80 and SM90, where Triton lowers tl.dot to wgmma itself.

Shape legend: N rows (sorted expert after expert), I input features, O output features, L experts,
L1 = L + 1 offsets, K the reduced dimension of a GEMM, P its output columns.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import interpreting
from .dispatch import _empty  # every kernel output is allocated through it (tests poison it)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Triton's interpreter multiplies bf16 tiles in tl.dot as their raw 16-bit integers (it keeps bf16 as uint16 and
# calls numpy's matmul on that), so under it the tiles go to fp32 first: exact, as a GPU's bf16 MMA products are.
_UPCAST = interpreting()
_MAX_ROWS_BUCKET = 4096


# ---------------------------------------------------------------------------------------------------------------
# Autotuning configurations


def _config(bm: int, bn: int, bk: int, stages: int, warps: int, group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_stages=stages, num_warps=warps)


# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps). Ampere: BLOCK_K 32 and 3-4 stages fit its 163 KiB of shared memory;
# Hopper: BLOCK_K 64, and 8 warps on the large tiles for its warpgroup MMA.
_AMPERE = [(128, 128, 32, 4, 4), (128, 256, 32, 3, 8), (256, 128, 32, 3, 8), (64, 128, 32, 4, 4),
           (64, 64, 32, 4, 4)]
_HOPPER = [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
           (64, 128, 64, 4, 4)]
_INTERPRETER = [(16, 16, 16, 1, 1)]


def _configs() -> List[triton.Config]:
    if interpreting():
        return [_config(*c, group_m=2) for c in _INTERPRETER]
    return [_config(*c) for c in _AMPERE + _HOPPER]


def _prune(configs: List[triton.Config], named_args: Dict[str, Any], **kwargs: Any) -> List[triton.Config]:
    """Keeps the list made for this GPU's generation (Hopper from SM90 on, else Ampere) and, of it, the configs
    whose pipelined tiles fit its shared memory at this dtype; at least one survives."""
    if len(configs) <= 1:
        return configs
    tensor = next(v for v in named_args.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    props = torch.cuda.get_device_properties(tensor.device)
    wanted = {tuple(c) for c in (_HOPPER if props.major >= 9 else _AMPERE)}
    smem = getattr(props, "shared_memory_per_block_optin", 163 * 1024)

    def key(c: triton.Config) -> Tuple[int, ...]:
        k = c.kwargs
        return k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], c.num_stages, c.num_warps

    def fits(c: triton.Config) -> bool:
        k = c.kwargs
        return (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * tensor.element_size() * c.num_stages <= smem

    mine = [c for c in configs if key(c) in wanted]
    return [c for c in mine if fits(c)] or [min(mine, key=lambda c: key(c)[0] * key(c)[1])]


def rows_bucket(N: int, L: int) -> int:
    """Rows per expert rounded up to a power of two: part of the autotuning key (small experts want small tiles),
    coarse enough that dropless routing's changing counts rarely retune. From host sizes only: no sync."""
    return min(_MAX_ROWS_BUCKET, triton.next_power_of_2(max(1, triton.cdiv(N, max(L, 1)))))


# ---------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _find_tile(offsets_ptr, tile, L, BLOCK_M: tl.constexpr, LP: tl.constexpr):
    """(expert, first row, end row, found) of the tile-th row tile, counting every expert's tiles of BLOCK_M rows
    in expert order; found is false past the last tile (then the rest is meaningless)."""
    experts_L = tl.arange(0, LP)
    in_L = experts_L < L
    starts_L = tl.load(offsets_ptr + experts_L, mask=in_L, other=0).to(tl.int64)
    ends_L = tl.load(offsets_ptr + experts_L + 1, mask=in_L, other=0).to(tl.int64)
    tiles_L = tl.where(in_L, (ends_L - starts_L + BLOCK_M - 1) // BLOCK_M, 0)
    last_L = tl.cumsum(tiles_L, axis=0)  # tiles of experts 0..l
    # The owner is the first expert whose tiles end after this one (experts with no rows own no tile).
    expert = tl.sum((last_L <= tile).to(tl.int32), axis=0)
    mine_L = experts_L == expert
    first_tile = tl.sum(tl.where(mine_L, last_L - tiles_L, 0), axis=0)
    start = tl.sum(tl.where(mine_L, starts_L, 0), axis=0)
    end = tl.sum(tl.where(mine_L, ends_L, 0), axis=0)
    return expert, start + (tile - first_tile) * BLOCK_M, end, expert < L


@triton.autotune(configs=_configs(), key=["P", "K", "ROWS_BUCKET"], prune_configs_by={"early_config_prune": _prune})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["N"])
def _grouped_mm_kernel(a_ptr, b_addrs_ptr, bias_addrs_ptr, out_ptr, offsets_ptr, N, L, P, K,
                       stride_a, stride_out, stride_bk, stride_bp, ROWS_BUCKET,
                       HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, LP: tl.constexpr,
                       EVEN_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # out[r, p] = sum_k a[r, k] * B_l[k, p] (+ bias_l[p]) for the rows r of expert l; B_l[k, p] lies at
    # b_l + k * stride_bk + p * stride_bp. Programs go GROUP_M row tiles at a time down the columns, so that
    # neighbouring programs share tiles of a and of B_l in L2.
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(N, BLOCK_M) + L  # a bound of sum_l cdiv(n_l, BLOCK_M), whatever the split
    col_tiles = tl.cdiv(P, BLOCK_N)
    per_group = GROUP_M * col_tiles
    first_tile = (pid // per_group) * GROUP_M
    group_rows = min(row_tiles - first_tile, GROUP_M)
    tile = first_tile + (pid % per_group) % group_rows
    col_tile = (pid % per_group) // group_rows
    expert, row0, row_end, found = _find_tile(offsets_ptr, tile, L, BLOCK_M, LP)
    if found:
        dtype = a_ptr.dtype.element_ty
        # Addresses read from memory carry no alignment for Triton's analysis; they are 16-byte aligned (checked by
        # the wrapper), and saying so gives vector loads, hence asynchronous copies and a pipelined loop.
        b_ptr = tl.multiple_of(tl.load(b_addrs_ptr + expert).to(tl.pointer_type(dtype)), 16)
        rows_M = row0 + tl.arange(0, BLOCK_M)
        cols_N = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok_M = rows_M < row_end
        col_ok_N = cols_N < P
        # Rows past the tile's end read row row_end - 1 (in bounds; never stored): no row mask on the loads of a.
        # Columns are masked rather than clamped, which would hide their contiguity from Triton where B's columns
        # are contiguous (dx) and so turn its vector loads, and their pipelining, into single elements.
        safe_rows_M = tl.minimum(rows_M, row_end - 1)
        ks_K = tl.arange(0, BLOCK_K)
        a_MK = a_ptr + safe_rows_M[:, None] * stride_a + ks_K[None, :]
        b_KN = b_ptr + ks_K[:, None] * stride_bk + cols_N[None, :] * stride_bp
        acc_MN = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a_tile = tl.load(a_MK)
                b_tile = tl.load(b_KN, mask=col_ok_N[None, :], other=0.0)
            else:
                a_tile = tl.load(a_MK, mask=ks_K[None, :] < K - k0, other=0.0)
                b_tile = tl.load(b_KN, mask=(ks_K[:, None] < K - k0) & col_ok_N[None, :], other=0.0)
            if UPCAST:
                a_tile = a_tile.to(tl.float32)
                b_tile = b_tile.to(tl.float32)
            acc_MN = tl.dot(a_tile, b_tile, acc_MN, input_precision=PRECISION)
            a_MK += BLOCK_K
            b_KN += BLOCK_K * stride_bk
        if HAS_BIAS:
            bias_addr = tl.load(bias_addrs_ptr + expert)
            if bias_addr != 0:
                bias_ptr = tl.multiple_of(bias_addr.to(tl.pointer_type(dtype)), 16)
                acc_MN += tl.load(bias_ptr + cols_N, mask=col_ok_N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows_M[:, None] * stride_out + cols_N[None, :], acc_MN.to(out_ptr.dtype.element_ty),
                 mask=row_ok_M[:, None] & col_ok_N[None, :])


@triton.autotune(configs=_configs(), key=["O", "I", "ROWS_BUCKET"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _weight_grad_kernel(dy_ptr, x_ptr, dw_addrs_ptr, offsets_ptr, O, I, stride_dy, stride_x, ROWS_BUCKET,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # dW_l[o, i] = sum over the rows r of expert l of dy[r, o] * x[r, i]: a tile of BLOCK_M x BLOCK_N of dW_l per
    # program, reducing over the rows BLOCK_K at a time. GROUP_M is unused (one config list serves all kernels).
    pid = tl.program_id(0)
    tiles_o = tl.cdiv(O, BLOCK_M)
    tiles_i = tl.cdiv(I, BLOCK_N)
    expert = pid // (tiles_o * tiles_i)
    within = pid % (tiles_o * tiles_i)
    outs_M = (within // tiles_i) * BLOCK_M + tl.arange(0, BLOCK_M)
    ins_N = (within % tiles_i) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(offsets_ptr + expert).to(tl.int64)
    end = tl.load(offsets_ptr + expert + 1).to(tl.int64)
    out_ok_M = outs_M < O
    in_ok_N = ins_N < I
    rs_K = tl.arange(0, BLOCK_K)
    dyt_MK = dy_ptr + (start + rs_K)[None, :] * stride_dy + outs_M[:, None]
    x_KN = x_ptr + (start + rs_K)[:, None] * stride_x + ins_N[None, :]
    acc_MN = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rows = (end - start).to(tl.int32)
    # An int32 trip count from 0 (not a range over the int64 row offsets): Triton pipelines only such loops.
    for r0 in range(0, rows, BLOCK_K):
        live_K = rs_K < rows - r0
        dyt_tile = tl.load(dyt_MK, mask=out_ok_M[:, None] & live_K[None, :], other=0.0)
        x_tile = tl.load(x_KN, mask=live_K[:, None] & in_ok_N[None, :], other=0.0)
        if UPCAST:
            dyt_tile = dyt_tile.to(tl.float32)
            x_tile = x_tile.to(tl.float32)
        acc_MN = tl.dot(dyt_tile, x_tile, acc_MN, input_precision=PRECISION)
        dyt_MK += BLOCK_K * stride_dy
        x_KN += BLOCK_K * stride_x
    dw_ptr = tl.multiple_of(tl.load(dw_addrs_ptr + expert).to(tl.pointer_type(x_ptr.dtype.element_ty)), 16)
    tl.store(dw_ptr + outs_M[:, None] * I + ins_N[None, :], acc_MN.to(x_ptr.dtype.element_ty),
             mask=out_ok_M[:, None] & in_ok_N[None, :])


@triton.jit
def _bias_grad_kernel(dy_ptr, db_addrs_ptr, offsets_ptr, O, stride_dy, BLOCK_R: tl.constexpr,
                      BLOCK_O: tl.constexpr):
    # db_l[o] = sum over the rows r of expert l of dy[r, o]; experts without a bias have address 0.
    expert = tl.program_id(0)
    db_addr = tl.load(db_addrs_ptr + expert)
    if db_addr != 0:
        outs_O = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        out_ok_O = outs_O < O
        start = tl.load(offsets_ptr + expert).to(tl.int64)
        rows = (tl.load(offsets_ptr + expert + 1).to(tl.int64) - start).to(tl.int32)
        rs_R = tl.arange(0, BLOCK_R)
        dy_RO = dy_ptr + (start + rs_R)[:, None] * stride_dy + outs_O[None, :]
        acc_RO = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.float32)
        for r0 in range(0, rows, BLOCK_R):  # an int32 trip count, as in _weight_grad_kernel
            acc_RO += tl.load(dy_RO, mask=(rs_R < rows - r0)[:, None] & out_ok_O[None, :], other=0.0).to(tl.float32)
            dy_RO += BLOCK_R * stride_dy
        db_ptr = tl.multiple_of(db_addr.to(tl.pointer_type(dy_ptr.dtype.element_ty)), 16)
        tl.store(db_ptr + outs_O, tl.sum(acc_RO, axis=0).to(dy_ptr.dtype.element_ty), mask=out_ok_O)


# ---------------------------------------------------------------------------------------------------------------
# Launch wrappers


# Device arrays of addresses, by (device, addresses): reused while the weights stay where they are. An entry is
# right whenever its addresses are, so reuse is always safe; the cache is bounded.
_address_cache: Dict[Tuple[str, Tuple[int, ...]], torch.Tensor] = {}
_ADDRESS_CACHE_SIZE = 64


def addresses(tensors: Sequence[Optional[torch.Tensor]], device: torch.device, cache: bool = True) -> torch.Tensor:
    """int64 device tensor of the tensors' data_ptr() (0 for None). The host -> device copy is asynchronous from
    pinned memory on a GPU, so it does not sync."""
    addrs = tuple(0 if t is None else t.data_ptr() for t in tensors)
    key = (str(device), addrs)
    if cache and key in _address_cache:
        return _address_cache[key]
    host = torch.tensor(addrs, dtype=torch.int64)
    if device.type == "cuda":
        out = host.pin_memory().to(device, non_blocking=True)
    else:
        out = host.to(device)
    if cache:
        if len(_address_cache) >= _ADDRESS_CACHE_SIZE:
            _address_cache.pop(next(iter(_address_cache)))
        _address_cache[key] = out
    return out


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: TF32 for fp32 only where torch allows it for CUDA matmuls (nn.Linear's rule)."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _grouped_mm(a_NK: torch.Tensor, offsets_L1: torch.Tensor, b_addrs: torch.Tensor, P: int, stride_bk: int,
                stride_bp: int, bias_addrs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out_NP[rows of l] = a_NK[rows of l] @ B_l (+ bias_l), B_l[k, p] at b_l + k * stride_bk + p * stride_bp."""
    N, K = a_NK.shape
    L = offsets_L1.shape[0] - 1
    out_NP = _empty((N, P), a_NK.dtype, a_NK.device)
    if N == 0 or P == 0:
        return out_NP

    def grid(meta: Dict[str, Any]) -> Tuple[int]:
        return ((triton.cdiv(N, meta["BLOCK_M"]) + L) * triton.cdiv(P, meta["BLOCK_N"]),)

    _grouped_mm_kernel[grid](a_NK, b_addrs, b_addrs if bias_addrs is None else bias_addrs, out_NP, offsets_L1, N, L,
                             P, K, a_NK.stride(0), out_NP.stride(0), stride_bk, stride_bp, rows_bucket(N, L),
                             HAS_BIAS=bias_addrs is not None, PRECISION=_precision(a_NK.dtype), UPCAST=_UPCAST,
                             LP=max(16, triton.next_power_of_2(L)))
    return out_NP


def _weight_grads(dy_NO: torch.Tensor, x_NI: torch.Tensor, offsets_L1: torch.Tensor) -> List[torch.Tensor]:
    """dW_l = dy_l^T @ x_l for every expert l, each its own [O, I] tensor (zeros for an expert with no rows)."""
    (N, O), I = dy_NO.shape, x_NI.shape[1]
    L = offsets_L1.shape[0] - 1
    dws = [_empty((O, I), x_NI.dtype, x_NI.device) for _ in range(L)]
    if O == 0 or I == 0 or L == 0:
        return dws

    def grid(meta: Dict[str, Any]) -> Tuple[int]:
        return (L * triton.cdiv(O, meta["BLOCK_M"]) * triton.cdiv(I, meta["BLOCK_N"]),)

    _weight_grad_kernel[grid](dy_NO, x_NI, addresses(dws, x_NI.device, cache=False), offsets_L1, O, I,
                              dy_NO.stride(0), x_NI.stride(0), rows_bucket(N, L), PRECISION=_precision(x_NI.dtype),
                              UPCAST=_UPCAST)
    return dws


def _bias_grads(dy_NO: torch.Tensor, offsets_L1: torch.Tensor, wanted: Sequence[bool]) -> List[Optional[torch.Tensor]]:
    """db_l = sum of dy_l over its rows where wanted[l] (zeros for an expert with no rows), else None."""
    O = dy_NO.shape[1]
    dbs = [_empty((O,), dy_NO.dtype, dy_NO.device) if w else None for w in wanted]
    if O == 0 or not any(wanted):
        return dbs
    if interpreting():
        block_r, block_o, warps = 16, min(64, triton.next_power_of_2(O)), 1
    else:
        block_r, block_o, warps = 32, min(256, triton.next_power_of_2(O)), 4
    _bias_grad_kernel[(len(wanted), triton.cdiv(O, block_o))](dy_NO, addresses(dbs, dy_NO.device, cache=False),
                                                             offsets_L1, O, dy_NO.stride(0), BLOCK_R=block_r,
                                                             BLOCK_O=block_o, num_warps=warps)
    return dbs


class _GroupedLinear(torch.autograd.Function):
    """y_NO[rows of l] = x_NI[rows of l] @ W_l^T + b_l; backward: dx (the grouped GEMM on W_l), dW_l, db_l."""

    @staticmethod
    def forward(ctx: Any, x_NI: torch.Tensor, offsets_L1: torch.Tensor, L: int,
                *params: Optional[torch.Tensor]) -> torch.Tensor:
        weights, biases = params[:L], params[L:]
        O, I = weights[0].shape
        w_addrs = addresses(weights, x_NI.device)
        has_bias = any(b is not None for b in biases)
        b_addrs = addresses(biases, x_NI.device) if has_bias else None
        ctx.save_for_backward(x_NI, offsets_L1, *weights)
        ctx.w_addrs, ctx.L = w_addrs, L
        ctx.with_bias = [b is not None for b in biases]
        # y = x @ W^T: B_l[k = i, p = o] = W_l[o, i].
        return _grouped_mm(x_NI, offsets_L1, w_addrs, O, 1, I, b_addrs)

    @staticmethod
    def backward(ctx: Any, dy_NO: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x_NI, offsets_L1, *weights = ctx.saved_tensors
        L = ctx.L
        O, I = weights[0].shape
        if dy_NO.stride(1) != 1:
            dy_NO = dy_NO.contiguous()
        wants = ctx.needs_input_grad
        dx_NI = None
        if wants[0]:
            # dx = dy @ W: B_l[k = o, p = i] = W_l[o, i].
            dx_NI = _grouped_mm(dy_NO, offsets_L1, ctx.w_addrs, I, I, 1)
        wants_w = wants[3:3 + L]
        dws: List[Optional[torch.Tensor]] = [None] * L
        if any(wants_w):
            dws = [dw if want else None for dw, want in zip(_weight_grads(dy_NO, x_NI, offsets_L1), wants_w)]
        wants_b = [w and has for w, has in zip(wants[3 + L:], ctx.with_bias)]
        dbs = _bias_grads(dy_NO, offsets_L1, wants_b)
        return (dx_NI, None, None, *dws, *dbs)


def _check(x_NI: torch.Tensor, offsets_L1: torch.Tensor, weights: Sequence[torch.Tensor],
           biases: Sequence[Optional[torch.Tensor]]) -> Optional[str]:
    """Why the kernels cannot take these arguments, or None. Host metadata only."""
    if x_NI.dim() != 2 or x_NI.dtype not in DTYPES or x_NI.stride(1) != 1 and x_NI.shape[1] > 1:
        return "x_NI must be 2-D, fp32/bf16/fp16, with unit stride along its features"
    L = len(weights)
    if L == 0:
        return "at least one expert weight is needed"
    if offsets_L1.dim() != 1 or offsets_L1.shape[0] != L + 1 or offsets_L1.dtype not in (torch.int32, torch.int64) \
            or offsets_L1.device != x_NI.device:
        return "offsets_L1 must be an int32/int64 vector of L + 1 entries on x_NI's device"
    O, I = weights[0].shape if weights[0].dim() == 2 else (-1, -1)
    if I != x_NI.shape[1]:
        return "every weight must be [O, I] with I = x_NI.shape[1]"
    for w in weights:
        if w.shape != (O, I) or w.dtype != x_NI.dtype or w.device != x_NI.device or not w.is_contiguous() \
                or w.data_ptr() % 16:
            return "every weight must be a contiguous, 16-byte aligned [O, I] tensor of x_NI's dtype and device"
    if len(biases) != L:
        return "biases must name one entry (a tensor or None) per expert"
    for b in biases:
        if b is not None and (b.shape != (O,) or b.dtype != x_NI.dtype or b.device != x_NI.device
                              or not b.is_contiguous() or b.data_ptr() % 16):
            return "every bias must be a contiguous, 16-byte aligned [O] tensor of x_NI's dtype and device, or None"
    return None


def accepts(x_NI: torch.Tensor, offsets_L1: torch.Tensor, weights: Sequence[torch.Tensor],
            biases: Optional[Sequence[Optional[torch.Tensor]]] = None) -> bool:
    """Whether grouped_linear takes these arguments as they are (see _check)."""
    return _check(x_NI, offsets_L1, weights, list(biases) if biases is not None else [None] * len(weights)) is None


def grouped_linear(x_NI: torch.Tensor, offsets_L1: torch.Tensor, weights: Sequence[torch.Tensor],
                   biases: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """y_NO[rows of l] = x_NI[rows of l] @ weights[l].T + biases[l], differentiable in x, weights and biases.

    x_NI: rows sorted expert after expert. offsets_L1: int32/int64 [L + 1] on x's device, non-decreasing, within
    [0, N]; expert l owns rows offsets[l]:offsets[l + 1] (possibly none). Rows of no expert (before offsets[0],
    from offsets[L] on: a padded buffer's tail) are left unwritten in y and in dx, and nothing from them reaches
    the weights' or biases' gradients. weights[l]: expert l's own
    [O, I] tensor (nn.Linear's layout), biases[l]: its [O] tensor or None. No host sync: the launch grids depend
    on sizes only, never on the offsets' values."""
    biases = list(biases) if biases is not None else [None] * len(weights)
    why = _check(x_NI, offsets_L1, weights, biases)
    if why is not None:
        raise ValueError(f"grouped_linear: {why}")
    return _GroupedLinear.apply(x_NI, offsets_L1, len(weights), *weights, *biases)


__all__ = ["accepts", "addresses", "grouped_linear", "rows_bucket"]
