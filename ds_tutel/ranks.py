"""Local CPU ranks: a DeepSpeed world of a given size on one machine, for jobs (checkpoint resharding), the
benchmarks' expert-parallel runs and the multi-rank tests.

`run_local_ranks(fn, world_size, *args)` starts `world_size` processes (forked from a server that has imported
torch, with the caller's environment), initialises DeepSpeed's communication on
gloo in each (DS_ACCELERATOR=cpu), runs `fn(rank, world_size, *args)` and returns the results in rank order.
A rank that raises or dies fails the whole call with its message; a call that outlives `timeout` seconds is
killed, never left hanging. `local_size` emulates several nodes: ranks are numbered node by node with
`local_size` per node, and LOCAL_RANK, LOCAL_SIZE and LOCAL_WORLD_SIZE say so, as a launcher would.
"""
from __future__ import annotations

import datetime
import glob
import io
import os
import queue as queue_module
import socket
import time
import traceback
from typing import Any, Callable, Dict, List, Mapping, Optional

from .launch.shm import remove_deepspeed_shm_buffers


class RankFailure(RuntimeError):
    """A spawned rank raised, died or timed out."""


def free_port() -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world_size: int, local_size: int, port: int, timeout: float, threads: int,
                caller_env: Mapping[str, str], env: Mapping[str, str], fn: Callable, args: tuple,
                results: Any) -> None:
    os.environ.clear()  # the caller's environment as it is now, not the fork server's from when it started
    os.environ.update(caller_env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank % local_size), WORLD_SIZE=str(world_size),
                      LOCAL_SIZE=str(local_size), LOCAL_WORLD_SIZE=str(local_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads))
    os.environ.update(env)
    try:
        import deepspeed
        import torch
        torch.set_num_threads(threads)
        deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=timeout), verbose=False)
        result = fn(rank, world_size, *args)
        # Bytes, not tensors: tensors sent through the queue would live in this process's shared memory, which
        # dies with it before the parent reads them.
        payload = io.BytesIO()
        torch.save(result, payload)
        results.put((rank, True, payload.getvalue()))
    except BaseException as e:  # every failure, assertion or exit included, goes back to the parent
        results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        try:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # the result is already reported; a failing teardown must not hide it
            pass


def stale_build_locks(before: float) -> List[str]:
    """torch extension build locks last touched before `before` (a time.time()): a compile interrupted earlier
    leaves its lock file, and every later build of that extension, DeepSpeed's CPU communication op included,
    then waits on it for ever."""
    from torch.utils.cpp_extension import get_default_build_root
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    paths = glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock"))
    return sorted(path for path in paths if os.path.getmtime(path) < before)


# Modules the rank processes' fork server imports once: each rank is forked from it with torch already imported
# (seconds of start-up per rank saved) and imports the rest itself, under the environment it is given.
FORK_SERVER_PRELOAD = ["torch"]


def _rank_context() -> Any:
    """The multiprocessing context ranks start in: a fork server that has imported FORK_SERVER_PRELOAD (a
    fresh process, not a fork of the caller: none of the caller's threads or state is copied), where the
    platform has one; else spawn."""
    import torch.multiprocessing as mp
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(FORK_SERVER_PRELOAD)
    return ctx


def run_local_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 600.0,
                    local_size: Optional[int] = None, env: Optional[Dict[str, str]] = None,
                    threads_per_rank: Optional[int] = None) -> List[Any]:
    """Runs fn(rank, world_size, *args) on `world_size` spawned gloo ranks; results must be picklable.

    local_size: ranks per emulated node (default: all on one node); env: extra environment for every rank;
    threads_per_rank: torch threads per rank (default: the machine's cores shared out).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    local = local_size or world_size
    if local < 1 or world_size % local != 0:
        raise ValueError(f"local_size {local_size} must divide world_size {world_size}")
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    import torch
    started = time.time()
    ctx = _rank_context()
    results = ctx.Queue()
    port = free_port()
    caller_env = dict(os.environ)
    procs = [ctx.Process(target=_rank_entry, daemon=True,
                         args=(r, world_size, local, port, timeout, threads, caller_env, dict(env or {}), fn, args,
                               results))
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
                    failure = (f"ranks {sorted(set(range(world_size)) - set(done))} did not finish in {timeout:.0f}s "
                               "(a hang or a crash)")
                    locks = stale_build_locks(started)
                    if locks:
                        failure += (f"; torch extension build locks older than this run: {locks} (a compile "
                                    "interrupted earlier leaves one, and later builds wait on it: delete it if no "
                                    "compile is running)")
                elif any(p.exitcode not in (None, 0) for p in procs):
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    failure = f"rank(s) {dead} died (exit codes {[procs[r].exitcode for r in dead]})"
                continue
            if ok:
                done[rank] = torch.load(io.BytesIO(value), weights_only=False)
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


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0, local_size: Optional[int] = None,
              env: Optional[Dict[str, str]] = None) -> List[Any]:
    """run_local_ranks with one torch thread per rank and a test-sized timeout, so that a hang fails fast: the
    tests' and small jobs' way to run fn(rank, world_size, *args) on spawned gloo ranks."""
    return run_local_ranks(fn, world_size, *args, timeout=timeout, local_size=local_size, env=env,
                           threads_per_rank=1)
