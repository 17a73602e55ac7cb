"""How many rows each expert runs on: exactly its tokens, or that count rounded up to one of a few sizes.

Skipping empty capacity slots makes each expert's row count change from step to step. That is free where a
matmul of a new shape costs nothing extra, as with fp32 on the CPU (MKL) and on GPUs. CPU matmuls in bf16
and fp16 run through oneDNN, which JIT-compiles and caches one primitive per shape: measured on a 2-core AMD
EPYC (torch 2.13), a new row count cost about 0.2-0.6 ms more than a cached one and kept about 0.4-0.7 MB
resident, up to oneDNN's cache capacity (1024 primitives, about 750 MB). In a training job, where every step
routes new tokens, that made the layer slower than DeepSpeed's (whose experts always see C rows) and its
memory grow for hundreds of steps.

With buckets, a count n > BUCKETS_PER_OCTAVE rounds up to a multiple of 2**(floor(log2 n) - 4): at most
BUCKETS_PER_OCTAVE sizes between n and 2n, and the padding under 1/16 of the rows (about 3 % on average).
Padded rows are zeros whose output gradient is zero, so weight gradients are unchanged and their outputs
are never read.
"""
from __future__ import annotations

from typing import List

import torch

BUCKETS_PER_OCTAVE = 16
_OCTAVE_SHIFT = BUCKETS_PER_OCTAVE.bit_length() - 1  # log2(BUCKETS_PER_OCTAVE)
_PER_SHAPE_COST_DTYPES = (torch.bfloat16, torch.float16)


def buckets_needed(device: torch.device, dtype: torch.dtype) -> bool:
    """True where a matmul of a new shape costs a compile and resident memory (CPU bf16/fp16)."""
    return device.type == "cpu" and dtype in _PER_SHAPE_COST_DTYPES


def bucket(rows: int) -> int:
    """rows rounded up to the next bucket size (counts up to BUCKETS_PER_OCTAVE are their own bucket)."""
    if rows <= BUCKETS_PER_OCTAVE:
        return rows
    step = 1 << (rows.bit_length() - 1 - _OCTAVE_SHIFT)
    return -(-rows // step) * step


def expert_rows(rows: List[int], device: torch.device, dtype: torch.dtype) -> List[int]:
    """The rows each expert runs on: `rows` itself, or each count's bucket where shapes cost (see above)."""
    if not buckets_needed(device, dtype):
        return list(rows)
    return [bucket(n) for n in rows]
