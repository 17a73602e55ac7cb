"""Runs a function on several spawned gloo ranks with a timeout, so a hang fails fast instead of blocking CI.

`run_ranks(fn, world_size, *args)` starts `world_size` processes, initialises DeepSpeed's communication on
gloo in each (DS_ACCELERATOR=cpu), calls `fn(rank, world_size, *args)` and returns the per-rank results. A rank
that raises makes the whole call raise with its traceback; a rank still running after `timeout` seconds is
killed and the call fails.

`local_size` emulates several nodes on one machine: ranks are numbered node by node with `local_size` ranks per
node (LOCAL_SIZE, LOCAL_WORLD_SIZE and LOCAL_RANK say so, as a launcher would); `env` sets further variables.
"""
from __future__ import annotations

import io
import os
import socket
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch.multiprocessing as mp

from ds_tutel.shm import remove_deepspeed_shm_buffers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any,
               local_size: Optional[int] = None, env: Optional[Dict[str, str]] = None) -> None:
    local = local_size or world_size
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank % local), WORLD_SIZE=str(world_size),
                      LOCAL_SIZE=str(local), LOCAL_WORLD_SIZE=str(local), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    os.environ.update(env or {})
    try:
        import torch
        torch.set_num_threads(1)
        import deepspeed
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        result = fn(rank, world_size, *args)
        # Bytes, not tensors: shared-memory tensors would die with this process before the parent reads them.
        payload = io.BytesIO()
        torch.save(result, payload)
        queue.put((rank, "ok", payload.getvalue()))
    except BaseException:  # report everything, including assertion failures, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0, local_size: Optional[int] = None,
              env: Optional[Dict[str, str]] = None) -> List[Any]:
    """Runs fn(rank, world_size, *args) on `world_size` gloo ranks; returns results ordered by rank.

    local_size: ranks per emulated node (default: all on one node); env: extra environment for every rank.
    """
    if local_size is not None and (local_size < 1 or world_size % local_size != 0):
        raise ValueError(f"local_size {local_size} must divide world_size {world_size}")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, queue, local_size, env),
                         daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    results: dict = {}
    errors: list = []
    while len(results) + len(errors) < world_size:
        if time.monotonic() > deadline:
            break
        if not queue.empty():
            rank, status, payload = queue.get()
            if status == "ok":
                import torch
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
        elif not any(p.is_alive() for p in procs) and queue.empty():
            break
        else:
            time.sleep(0.02)
    for p in procs:
        p.join(timeout=5 if not errors else 1)
        if p.is_alive():
            p.kill()
            p.join()
    remove_deepspeed_shm_buffers("127.0.0.1", port)
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(errors))
    if len(results) < world_size:
        missing = sorted(set(range(world_size)) - set(results))
        raise TimeoutError(f"ranks {missing} did not finish within {timeout}s (hang or crash); "
                           f"exit codes {[p.exitcode for p in procs]}")
    return [results[r] for r in range(world_size)]
