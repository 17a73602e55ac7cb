"""How many rows each expert runs on: exactly its tokens, or that count rounded up to one of a few sizes.

Skipping empty capacity slots makes each expert's row count change from step to step. That is free where a matmul
of a new shape costs nothing extra, as with fp32 on the CPU (MKL) and on GPUs. CPU matmuls in bf16 and fp16 run
through oneDNN, which JIT-compiles and caches one primitive per shape: each new row count costs a compile and
keeps resident memory, up to oneDNN's cache capacity. In a training job, where every step routes new tokens, that
made the layer slower than DeepSpeed's (whose experts always see C rows) and its memory grow for hundreds of
steps. torch sends half-type CPU matmuls to oneDNN only where the CPU has the instructions for them (on x86,
AVX-512 or AMX); elsewhere they run in ATen's own loops, which keep nothing per shape, so there the buckets are not
used: padding would only add work. Why, with the figures: docs/KERNELS.md ("CPU kernels") and
benchmarks/RESULTS.md.

With buckets, a count n > BUCKETS_PER_OCTAVE rounds up to a multiple of 2**(floor(log2 n) - 4): at most
BUCKETS_PER_OCTAVE sizes between n and 2n, and the padding under 1/16 of the rows (about 3 % on average).
Padded rows are zeros whose output gradient is zero, so weight gradients are unchanged and their outputs
are never read.
"""
from __future__ import annotations

import functools
from typing import List

import torch

BUCKETS_PER_OCTAVE = 16
_ONEDNN_CHECKS = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}


@functools.lru_cache(maxsize=None)
def onednn_half_matmuls(dtype: torch.dtype) -> bool:
    """True where torch runs CPU matmuls of this half type through oneDNN (which keeps a primitive per shape)."""
    try:
        return bool(getattr(torch.ops.mkldnn, _ONEDNN_CHECKS[dtype])())
    except (AttributeError, RuntimeError):
        return True  # unknown: keep the buckets, whose cost is bounded (under 1/16 of the rows)


def buckets_needed(device: torch.device, dtype: torch.dtype) -> bool:
    """True where a matmul of a new shape costs a compile and resident memory: CPU bf16/fp16 through oneDNN."""
    return device.type == "cpu" and dtype in _ONEDNN_CHECKS and onednn_half_matmuls(dtype)


def bucket(rows: int) -> int:
    """rows rounded up to the next bucket size (counts up to BUCKETS_PER_OCTAVE are their own bucket)."""
    if rows <= BUCKETS_PER_OCTAVE:
        return rows
    step = 1 << (rows.bit_length() - BUCKETS_PER_OCTAVE.bit_length())  # 2**(floor(log2 rows) - log2 per octave)
    return -(-rows // step) * step


def round_rows(rows: List[int]) -> List[int]:
    """Each expert's row count rounded up to its bucket."""
    return [bucket(n) for n in rows]
