"""Interleaved timing: A B C A B C ... after warm-up, so drift on a shared machine hits every candidate alike
(optionally in alternating orders, A B C B A C ..., so that none is always first on a round's new data).

On CPU each call is timed with perf_counter; on CUDA with a pair of events around it (synchronised after the
call, so the host launching the next call never overlaps the one being timed).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

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
                prepare: Optional[Dict[str, Callable[[], None]]] = None,
                before_round: Optional[Callable[[], None]] = None,
                orders: Optional[Sequence[Sequence[str]]] = None) -> Dict[str, List[float]]:
    """Seconds per call of each candidate: `warmup` untimed rounds, then up to `reps` timed rounds.

    before_round, when given, runs untimed at the start of every round (a new batch, say); prepare[name] just
    before each call of fns[name]. orders: round i calls the candidates in orders[i % len(orders)] (default:
    fns' order every round); alternating lets no candidate always be the first to touch a round's new data.
    budget_s ends the timed rounds early (never before `min_reps` rounds) once that much time has gone by.
    """
    prepare = prepare or {}
    orders = [list(order) for order in orders] if orders else [list(fns)]
    for order in orders:
        if sorted(order) != sorted(fns):
            raise ValueError(f"every order must name each candidate once: {order} against {list(fns)}")

    def run_round(index: int, times: Optional[Dict[str, List[float]]]) -> None:
        if before_round is not None:
            before_round()
        for name in orders[index % len(orders)]:
            if name in prepare:
                prepare[name]()
            if times is None:
                fns[name]()
            else:
                times[name].append(_time_once(fns[name], device))

    for i in range(warmup):
        run_round(i, None)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    started = time.perf_counter()
    for i in range(reps):
        run_round(warmup + i, times)
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
