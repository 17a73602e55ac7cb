"""Loading the Triton kernels under Triton's CPU interpreter, for the kernel tests; and checks of that loading.

Triton decides at decoration time whether a @triton.jit function is compiled for a GPU or interpreted: for its
own library functions (tl.zeros, ...) when triton is first imported, for ours when triton_kernels.* is. So the
kernel test modules import the kernels through `load_interpreted()` when they are collected: it sets
TRITON_INTERPRET=1 for the import (re-importing our modules if a GPU build of them was loaded before) and then
restores the environment, so that tests of other modules see the environment they expect. If triton itself was
imported earlier without the interpreter, it fails with instructions instead of producing confusing errors.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Callable, Tuple

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("the Triton kernel tests need the triton package (pip install ds_tutel[triton])",
                allow_module_level=True)


def _is_interpreted(kernel: object) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def load_interpreted() -> Tuple[ModuleType, ModuleType]:
    """(triton_kernels.dispatch, triton_kernels.gate) with every kernel running in the interpreter (those of
    triton_kernels.grouped_gemm too)."""
    if "triton" in sys.modules and not _is_interpreted(sys.modules["triton"].language.standard.zeros):
        raise RuntimeError("triton was imported before the kernel tests could switch its interpreter on; run "
                           "pytest with TRITON_INTERPRET=1 in the environment, or the tests/test_triton_* files alone")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        dispatch = importlib.import_module("triton_kernels.dispatch")
        gate = importlib.import_module("triton_kernels.gate")
        if not _is_interpreted(dispatch._gather_rows_kernel):
            dispatch = importlib.reload(dispatch)
            gate = importlib.reload(gate)
        grouped_gemm = importlib.import_module("triton_kernels.grouped_gemm")
        if not _is_interpreted(grouped_gemm._grouped_mm_kernel):
            importlib.reload(grouped_gemm)  # in place: the registry's grouped_linear then runs interpreted too
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return dispatch, gate


def poisoning_empty(real_empty: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """An allocator for the kernels' outputs that fills them with NaN (floats) or a sentinel (ints), so that any
    element a kernel fails to write shows up in the comparison with the torch path."""

    def empty(shape, dtype, device):
        out = real_empty(shape, dtype, device)
        return out.fill_(float("nan") if dtype.is_floating_point else -987654)

    return empty


load_interpreted()


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Interpreter on, and every kernel output allocated poisoned (see poisoning_empty)."""
    dispatch, gate = load_interpreted()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    empty = poisoning_empty(dispatch._empty)
    monkeypatch.setattr(dispatch, "_empty", empty)
    monkeypatch.setattr(gate, "_empty", empty)


def test_load_interpreted_builds_interpreted_kernels_and_restores_the_environment():
    before = os.environ.get("TRITON_INTERPRET")
    dispatch, gate = load_interpreted()
    assert os.environ.get("TRITON_INTERPRET") == before
    for kernel in (dispatch._gather_rows_kernel, gate._softmax_topk_kernel, gate._expert_histogram_kernel,
                   gate._assign_slots_kernel, gate._gate_backward_kernel):
        assert _is_interpreted(kernel)
    assert sys.modules["triton_kernels.dispatch"] is dispatch


def test_poisoned_fixture_poisons_outputs(poisoned):
    dispatch, _ = load_interpreted()
    assert torch.isnan(dispatch._empty((3, 2), torch.bfloat16, torch.device("cpu"))).all()
    assert (dispatch._empty((4,), torch.int64, torch.device("cpu")) == -987654).all()
