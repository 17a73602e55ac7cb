"""Local CPU ranks for jobs that need a DeepSpeed world of a given size on one machine (checkpoint resharding).

`run_local_ranks(fn, world_size, *args)` spawns `world_size` processes on gloo with DeepSpeed's CPU accelerator,
runs `fn(rank, world_size, *args)` in each and returns their results in rank order. A rank that raises or dies
fails the whole call with its message; a call that outlives `timeout` seconds is killed, never left hanging.
"""
from __future__ import annotations

import datetime
import os
import queue as queue_module
import socket
import time
import traceback
from typing import Any, Callable, List
from ds_tutel.shm import remove_deepspeed_shm_buffers


class RankFailure(RuntimeError):
    """A spawned rank raised, died or timed out."""


def free_port() -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world_size: int, port: int, timeout: float, fn: Callable, args: tuple,
                results: Any) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    try:
        import deepspeed
        import torch
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=timeout), verbose=False)
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException as e:  # every failure, assertion or exit included, goes back to the parent
        results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run_local_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 600.0) -> List[Any]:
    """Runs fn(rank, world_size, *args) on `world_size` spawned gloo ranks; results must be picklable."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_entry, args=(r, world_size, port, timeout, fn, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    done: dict = {}
    failure = None
    try:
        while len(done) < world_size and failure is None:
            try:
                rank, ok, value = results.get(timeout=0.5)
            except queue_module.Empty:
                if time.monotonic() > deadline:
                    failure = f"ranks {sorted(set(range(world_size)) - set(done))} did not finish in {timeout:.0f}s"
                elif any(p.exitcode not in (None, 0) for p in procs):
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    failure = f"rank(s) {dead} died (exit codes {[procs[r].exitcode for r in dead]})"
                continue
            if ok:
                done[rank] = value
            else:
                failure = f"rank {rank} failed: {value}"
    finally:
        for p in procs:
            p.join(timeout=10 if failure is None else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
        remove_deepspeed_shm_buffers("127.0.0.1", port)
    if failure is not None:
        raise RankFailure(failure)
    return [done[r] for r in range(world_size)]
