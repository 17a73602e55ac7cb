"""Interleaved timing: A B C A B C ... after warm-up, so drift on a shared machine hits every candidate alike.

On CPU each call is timed with perf_counter; on CUDA with a pair of events around it (synchronised after the
call, so the host launching the next call never overlaps the one being timed).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

import torch


def _time_once(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def interleaved(fns: Dict[str, Callable[[], None]], device: torch.device, warmup: int = 2, reps: int = 5,
                budget_s: Optional[float] = None, min_reps: int = 5,
                prepare: Optional[Dict[str, Callable[[], None]]] = None) -> Dict[str, List[float]]:
    """Seconds per call of each candidate: `warmup` untimed rounds, then up to `reps` timed rounds.

    prepare[name], when given, runs untimed just before each call of fns[name] (a new batch, say).
    budget_s ends the timed rounds early (never before `min_reps` rounds) once that much time has gone by.
    """
    prepare = prepare or {}
    for _ in range(warmup):
        for name, fn in fns.items():
            if name in prepare:
                prepare[name]()
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    started = time.perf_counter()
    for i in range(reps):
        for name, fn in fns.items():
            if name in prepare:
                prepare[name]()
            times[name].append(_time_once(fn, device))
        if budget_s is not None and i + 1 >= min_reps and time.perf_counter() - started > budget_s:
            break
    return times


def median(values: List[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator: List[float], denominator: List[float]) -> float:
    """Median over rounds of numerator[i] / denominator[i]: both were timed in the same round, a few
    milliseconds apart, so a load change on the machine between rounds cancels out of each ratio."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def ratio_quartiles(numerator: List[float], denominator: List[float]) -> List[float]:
    """First and third quartile of the per-round ratios: how far one round's ratio strays on this machine."""
    ratios = sorted(n / d for n, d in zip(numerator, denominator))
    if len(ratios) < 2:
        return [ratios[0], ratios[0]]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return [q1, q3]


def geomean(values: List[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).log().mean().exp())
