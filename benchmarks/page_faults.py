"""Page faults per step and per operator: where a CPU step pays for fresh memory rather than for work.

A minor page fault is the kernel handing the process a zeroed 4 KiB page on first touch; glibc gives freed
memory back to the kernel when enough of it lies at the top of the heap, so a step that frees and reallocates
large tensors can fault them in again every time (docs/BENCHMARKS.md, "Page faults and the allocator").

`fault_steps` runs the implementations of one point the way the timing does (interleaved, shared expert
weights) and reports each step's time and minor-fault count; `only="ours"` (or another name) runs that
implementation by itself instead, as a training job would. `faults_by_operator` counts, over several interleaved rounds, the faults and
time inside every aten operator of one implementation (a TorchDispatchMode reads getrusage before and after
each call). `report` runs each of these in a fresh process (benchmarks/fresh_process.py), since the heap a
process inherits from earlier work decides where the faults fall.

Linux and macOS only (resource.getrusage).
"""
from __future__ import annotations

import collections
import resource
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.layer_impls import Point, timed_steps


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _measure(fn: Callable[[], object]) -> Tuple[float, int]:
    faults = minor_faults()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, minor_faults() - faults


def fault_steps(point: Point, steps: int = 6, warmup: int = 2, only: str = ""
                ) -> Dict[str, List[Tuple[float, int]]]:
    """{implementation: [(seconds, minor faults) per step]}, interleaved (ours, deepspeed, floor, ...) or, with
    `only` naming one implementation, that one alone (as a training job runs it)."""
    fns = timed_steps(point, torch.device("cpu")).fns
    if only:
        fns = {only: fns[only]}
    results: Dict[str, List[Tuple[float, int]]] = {name: [] for name in fns}
    for i in range(warmup + steps):
        for name, fn in fns.items():
            sample = _measure(fn)
            if i >= warmup:
                results[name].append(sample)
    return results


class _FaultsPerOperator(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.faults: Dict[str, int] = collections.Counter()
        self.seconds: Dict[str, float] = collections.Counter()
        self.calls: Dict[str, int] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        faults, start = minor_faults(), time.perf_counter()
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.seconds[name] += time.perf_counter() - start
        self.faults[name] += minor_faults() - faults
        self.calls[name] += 1
        return out


def faults_by_operator(point: Point, implementation: str = "ours", rounds: int = 4, warmup: int = 2
                       ) -> List[Tuple[str, int, float, int]]:
    """(operator, faults, seconds, calls) summed over `rounds` steps of `implementation`, each inside an
    interleaved round of all three (so the heap is in the state the timing sees), most faults first."""
    fns = timed_steps(point, torch.device("cpu")).fns
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    counter = _FaultsPerOperator()
    for _ in range(rounds):
        for name, fn in fns.items():  # the same order as a timed round
            if name == implementation:
                with counter:
                    fn()
            else:
                fn()
    rows = [(op, counter.faults[op], counter.seconds[op], counter.calls[op]) for op in counter.calls]
    return sorted(rows, key=lambda row: (-row[1], -row[2]))


def report(point: Point, steps: int = 6, top: int = 10) -> str:
    """Faults and times per step (interleaved, and each implementation alone) and the operators of ours that
    fault, each measured in a fresh process."""
    from benchmarks import page_faults  # this file under its module name, which a child can import
    from benchmarks.fresh_process import FreshProcesses
    processes = FreshProcesses()
    threads = torch.get_num_threads()

    def child(function: Callable, *args):
        return processes.call_on_point(function, point, threads, *args)

    def step_line(name: str, samples: List[Tuple[float, int]]) -> str:
        return f"  {name:<10} " + "  ".join(f"{1e3 * s:.1f} ms/{f}" for s, f in samples)

    lines = [f"page faults of {point.key}: step time / minor faults, {steps} steps after warm-up, {threads} torch "
             "thread(s), a fresh process for each block", "interleaved as timed (ours, deepspeed, floor):"]
    lines += [step_line(name, samples) for name, samples in child(page_faults.fault_steps, steps).items()]
    lines.append("each implementation alone, in a process of its own:")
    for name in ("ours", "deepspeed", "floor"):
        lines += [step_line(n, samples) for n, samples in child(page_faults.fault_steps, steps, 2, name).items()]
    lines.append("operators of ours over 4 interleaved rounds, most faults first (faults, ms, calls):")
    for op, faults, seconds, calls in child(page_faults.faults_by_operator)[:top]:
        lines.append(f"  {op:<28} {faults:>7} {1e3 * seconds:>8.2f} {calls:>5}")
    return "\n".join(lines)
