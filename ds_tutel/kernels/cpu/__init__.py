"""Everything CPU-specific, behind the kernel registry (ds_tutel.kernels) under the backend "cpu".

  build.py        builds and loads the compiled loops (csrc/grouped_dispatch.cpp) on first use; DS_TUTEL_CPU_KERNELS
  routing.py      the router's choices, capacity rule and slot ranks in compiled passes; the few-expert softmax
  grouped.py      the grouped plan, gather and combine in compiled passes
  row_buckets.py  expert row counts rounded to a few sizes where oneDNN keeps a primitive per matmul shape
  onednn.py       fp32 experts with oneDNN off, so changing row counts compile and keep nothing

Nothing in the core imports this package: the registry imports it on the first lookup for a CPU tensor. Without it
(deleted, or made unimportable) every stage runs its torch path, with the same results. Why each piece exists, with
the measurements: docs/KERNELS.md ("CPU kernels").
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch

from .. import register
from . import build, onednn, row_buckets
from . import routing as _routing
from .grouped import compiled_plan


def _compiled_plan_applies(routing) -> bool:
    return build.load() is not None


def _rows_rounding_applies(dtype: torch.dtype) -> bool:
    return row_buckets.buckets_needed(torch.device("cpu"), dtype)


def _round_expert_rows(dtype: torch.dtype) -> Callable[[List[int]], List[int]]:
    return row_buckets.round_rows


def _run_experts(run: Callable[[Sequence[torch.Tensor]], List[torch.Tensor]],
                 inputs_nM: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """run(inputs_nM), with oneDNN off where the inputs are fp32 (onednn.py)."""
    onednn.close_failed_regions()
    if onednn.should_switch_off(inputs_nM):
        return onednn.run_without_onednn(run, inputs_nM)
    return run(inputs_nM)


_routing.register_all()
register("cpu", "grouped_plan", compiled_plan, accepts=_compiled_plan_applies)
# "expert_row_rounding"(dtype) gives the function that rounds each expert's row count, where new shapes cost.
register("cpu", "expert_row_rounding", _round_expert_rows, accepts=_rows_rounding_applies)
register("cpu", "run_experts", _run_experts)
