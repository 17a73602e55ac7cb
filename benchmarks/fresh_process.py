"""Calls a function in a fresh child process: forked from a server that has already imported the heavy modules,
or spawned as a new interpreter with a hash seed of its own.

Two uses in the benchmarks: peak memory (each implementation must start from a clean process) and timing
(each point must not inherit the heap left by the points before it: glibc's allocator adapts its thresholds to
past allocations, and on the CPU a layer's time moves with the history of the process; docs/BENCHMARKS.md).
"""
from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import os
import sys
import traceback
from dataclasses import asdict
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

PRELOAD = ["torch", "deepspeed.moe.layer", "ds_tutel", "benchmarks.layer_impls"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def importable_name(fn: Callable[..., Any]) -> Tuple[str, str]:
    """(module, name) under which a child imports the module-level function fn: a benchmark run as a script
    (module __main__) by its dotted name under the repository, benchmarks.bench_layer say."""
    module = fn.__module__
    if module == "__main__":
        path = os.path.splitext(os.path.abspath(sys.modules["__main__"].__file__))[0]
        module = os.path.relpath(path, REPO).replace(os.sep, ".")
    return module, fn.__name__


def _child_main(conn, module: str, name: str, args: tuple) -> None:
    try:
        conn.send(("ok", getattr(importlib.import_module(module), name)(*args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _on_point(module: str, name: str, point_fields: Dict, threads: int, *args: Any) -> Any:
    """The child's side of FreshProcesses.call_on_point."""
    import torch

    from benchmarks.layer_impls import Point
    torch.set_num_threads(threads)
    return getattr(importlib.import_module(module), name)(Point(**point_fields), *args)


@contextlib.contextmanager
def _environment(name: str, value: Optional[str]) -> Iterator[None]:
    """os.environ[name] = value (None: unchanged) for the duration, then as it was."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


class FreshProcesses:
    """`call(fn, *args)` runs the module-level function fn in a new child and returns its (picklable) result;
    the child imports fn's module by name (see importable_name), so the module is loaded there, not pickled.

    By default children fork from one server that has imported `preload` (a fork instead of an import per call).
    spawn=True starts every child as a new interpreter instead, so that `call(..., hash_seed=n)` can give each
    its own PYTHONHASHSEED: the seed orders sets and dicts during the imports, and with them the heap a
    process starts its work on (see benchmarks/memory.py); forked children all share their server's.
    """

    def __init__(self, preload: Sequence[str] = PRELOAD, spawn: bool = False) -> None:
        self.spawn = spawn or "forkserver" not in mp.get_all_start_methods()
        if self.spawn:
            self._ctx = mp.get_context("spawn")
        else:
            self._ctx = mp.get_context("forkserver")
            self._ctx.set_forkserver_preload(list(preload))

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 600.0, what: str = "",
             hash_seed: Optional[int] = None) -> Any:
        if hash_seed is not None and not self.spawn:
            raise ValueError("hash_seed needs FreshProcesses(spawn=True): forked children share their server's")
        recv, send = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=_child_main, args=(send, *importable_name(fn), args), daemon=True)
        with _environment("PYTHONHASHSEED", None if hash_seed is None else str(hash_seed)):
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
                      timeout: float = 600.0, what: str = "", hash_seed: Optional[int] = None) -> Any:
        """function(point, *args) in a new child running `threads` torch threads. function is module-level (in a
        benchmark run as a script too, see importable_name); the point travels as plain fields."""
        return self.call(_on_point, *importable_name(function), asdict(point), threads, *args, timeout=timeout,
                         what=what or f"{function.__name__} of {point.key}", hash_seed=hash_seed)
