"""The tests' way to run a function on several spawned gloo ranks: ds_tutel.ranks with one thread per rank and
a test-sized timeout, so a hang fails fast instead of blocking CI (a failing or hanging rank raises RankFailure)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from ds_tutel.ranks import RankFailure, free_port, run_local_ranks

__all__ = ["RankFailure", "free_port", "run_ranks"]


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0, local_size: Optional[int] = None,
              env: Optional[Dict[str, str]] = None) -> List[Any]:
    """Runs fn(rank, world_size, *args) on `world_size` gloo ranks; returns results ordered by rank."""
    return run_local_ranks(fn, world_size, *args, timeout=timeout, local_size=local_size, env=env,
                           threads_per_rank=1)
