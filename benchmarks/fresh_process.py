"""Calls a function in a fresh child process of a fork server that has already imported the heavy modules.

Two uses in the benchmarks: peak memory (each implementation must start from a clean process) and timing
(each point must not inherit the heap left by the points before it: glibc's allocator adapts its thresholds to
past allocations, and on the CPU a layer's time moved by 10-30 % with the history of the process).
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import traceback
from dataclasses import asdict
from typing import Any, Callable, Dict, Sequence

PRELOAD = ["torch", "deepspeed.moe.layer", "ds_tutel", "benchmarks.layer_impls"]


def _child_main(conn, module: str, name: str, args: tuple) -> None:
    try:
        conn.send(("ok", getattr(importlib.import_module(module), name)(*args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _on_point(function: Callable[..., Any], point_fields: Dict, threads: int, *args: Any) -> Any:
    """The child's side of FreshProcesses.call_on_point."""
    import torch

    from benchmarks.layer_impls import Point
    torch.set_num_threads(threads)
    return function(Point(**point_fields), *args)


class FreshProcesses:
    """`call(fn, *args)` runs the module-level function fn in a new child and returns its (picklable) result."""

    def __init__(self, preload: Sequence[str] = PRELOAD) -> None:
        if "forkserver" in mp.get_all_start_methods():
            self._ctx = mp.get_context("forkserver")
            self._ctx.set_forkserver_preload(list(preload))
        else:
            self._ctx = mp.get_context("spawn")

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 600.0, what: str = "") -> Any:
        recv, send = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=_child_main, args=(send, fn.__module__, fn.__name__, args), daemon=True)
        proc.start()
        send.close()
        try:
            if not recv.poll(timeout):
                raise TimeoutError(f"{what or fn.__name__} took over {timeout}s in its child process")
            status, payload = recv.recv()
        finally:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if status != "ok":
            raise RuntimeError(f"{what or fn.__name__} failed in its child process:\n{payload}")
        return payload

    def call_on_point(self, function: Callable[..., Any], point: Any, threads: int, *args: Any,
                      timeout: float = 600.0, what: str = "") -> Any:
        """function(point, *args) in a new child running `threads` torch threads. function must be importable
        under its module's name (not a script's __main__); the point travels as plain fields."""
        return self.call(_on_point, function, asdict(point), threads, *args, timeout=timeout,
                         what=what or f"{function.__name__} of {point.key}")
