"""fp32 experts on the CPU run with oneDNN off, so row counts that change every step compile and keep nothing.

torch runs some fp32 CPU operators through oneDNN (GELU and its backward among them). oneDNN compiles a
primitive for every new tensor shape and keeps it in a process-wide cache, its JIT code never freed. The experts
here run on exactly their kept rows, so their row count changes nearly every step: a training job's resident
memory grew for hundreds of steps (DeepSpeed's layer, on fixed capacity buffers, compiles once). With oneDNN off
these operators take torch's own vectorised kernels; fp32 matmuls run in the BLAS either way (torch sends fp32
matmuls to oneDNN only when reduced-precision math is allowed; then, as under CPU autocast, oneDNN stays on).
Why, with the figures: docs/KERNELS.md ("CPU kernels") and benchmarks/RESULTS.md.

The flag is torch's process-wide `torch.backends.mkldnn.enabled`. The forward switches it off around the
experts. For the backward, two identity autograd nodes bracket them: the one on their outputs runs first and
opens a region, the one on their inputs runs once every expert's backward is done and closes it. Regions of
several layers may overlap (parallel branches): the flag goes off when the first opens and comes back, as the
user had it, when the last closes. A backward that fails inside a region leaves it open: the next call of
any layer's experts outside a backward (`close_failed_regions`) gives the user's setting back.

Shape legend: n rows of one expert, M model dim.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Sequence

import torch


def fp32_matmuls_in_full_precision() -> bool:
    """False where the user lets oneDNN run fp32 matmuls in a reduced precision (bf16 or tf32 math)."""
    mkldnn_matmul = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", "none")
    return torch.get_float32_matmul_precision() == "highest" and mkldnn_matmul in ("none", "ieee")


def should_switch_off(inputs_nM: Sequence[torch.Tensor]) -> bool:
    """True for fp32 CPU inputs with oneDNN on, unless oneDNN does more than eltwise work there: under CPU
    autocast (bf16 matmuls) or with reduced-precision fp32 matmuls allowed."""
    return (len(inputs_nM) > 0 and inputs_nM[0].device.type == "cpu"
            and inputs_nM[0].dtype == torch.float32 and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu") and fp32_matmuls_in_full_precision())


@contextlib.contextmanager
def _switched_off() -> Iterator[None]:
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


class _BackwardRegions:
    """How many backward regions are open, the setting to restore when none is, and the generation (a reset
    after a failed backward starts a new one; regions of an older one no longer count)."""

    open = 0
    restore_to = True
    generation = 0


def close_failed_regions() -> None:
    """Outside any backward no region can be open legitimately: one still open is a failed backward's."""
    if _BackwardRegions.open and torch._C._current_graph_task_id() == -1:
        torch.backends.mkldnn.enabled = _BackwardRegions.restore_to
        _BackwardRegions.open = 0
        _BackwardRegions.generation += 1


class _Region:
    """One layer call's backward region (see the module docstring)."""

    def __init__(self) -> None:
        self.is_open = False
        self.generation = -1

    def open(self) -> None:
        if self.is_open and self.generation == _BackwardRegions.generation:
            return
        self.is_open, self.generation = True, _BackwardRegions.generation
        if _BackwardRegions.open == 0:
            _BackwardRegions.restore_to = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = False
        _BackwardRegions.open += 1

    def close(self) -> None:
        if not self.is_open or self.generation != _BackwardRegions.generation:
            return
        self.is_open = False
        _BackwardRegions.open -= 1
        if _BackwardRegions.open == 0:
            torch.backends.mkldnn.enabled = _BackwardRegions.restore_to


class _RegionEdge(torch.autograd.Function):
    """Identity on tensors; its backward calls the region's `open` (on the experts' outputs, the first node of
    their backward) or `close` (on their inputs, the last)."""

    @staticmethod
    def forward(ctx, region: _Region, in_backward: str, *tensors: torch.Tensor):
        ctx.in_backward = getattr(region, in_backward)
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        ctx.in_backward()
        return (None, None, *grads)


def run_without_onednn(run: Callable[[Sequence[torch.Tensor]], List[torch.Tensor]],
                       inputs_nM: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """run(inputs_nM) with oneDNN off in its forward and in its backward (see the module docstring)."""
    if not (torch.is_grad_enabled() and any(x_nM.requires_grad for x_nM in inputs_nM)):
        with _switched_off():
            return run(inputs_nM)
    region = _Region()
    inputs_nM = _RegionEdge.apply(region, "close", *inputs_nM)
    with _switched_off():
        outputs_nM = run(inputs_nM)
    return list(_RegionEdge.apply(region, "open", *outputs_nM))
