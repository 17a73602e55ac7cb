"""glibc malloc settings that stop a benchmarked CPU step from page-faulting its own gradients back in.

With glibc's defaults, freeing a block at the top of the heap that leaves more than the trim threshold free
returns that memory to the kernel, and the threshold adapts to the largest block freed so far. A training loop
frees every gradient at `zero_grad` and allocates them again in the next backward: when they lie at the top of
the heap, each step gives them back and takes them again, one page fault per 4 KiB. Measured on the project's
2-core CPU machine (benchmarks/RESULTS.md), that cost up to half of a layer's step, and which layer paid it
changed with the order of allocations, not with the work done. (The whole training job, ds_tutel.train on 2 CPU
ranks, ran at the same tokens/s with and without these settings, so the launch path does not set them.)

STEADY_MALLOC_ENV keeps freed memory in the process (no trimming) and serves blocks up to 32 MiB from the heap
(glibc's largest allowed mmap threshold), so a steady training loop reuses its pages. Resident memory then stays
at the job's peak instead of shrinking between steps. glibc reads these variables when a process starts, so
they must be in the environment of the rank, not set from inside it.
"""
from __future__ import annotations

import os
from typing import Dict, Mapping, Optional

STEADY_MALLOC_ENV: Dict[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str((1 << 31) - 1),  # the largest value older glibc (atoi) parses
}


def describe(env: Optional[Mapping[str, str]] = None) -> str:
    """The malloc settings in `env` (default: this process's environment), for reports."""
    env = os.environ if env is None else env
    settings = [f"{name}={env[name]}" for name in sorted(STEADY_MALLOC_ENV) if name in env]
    return ", ".join(settings) if settings else "glibc defaults"


def is_steady(env: Optional[Mapping[str, str]] = None) -> bool:
    """True when `env` holds exactly STEADY_MALLOC_ENV's values."""
    env = os.environ if env is None else env
    return all(env.get(name) == value for name, value in STEADY_MALLOC_ENV.items())
