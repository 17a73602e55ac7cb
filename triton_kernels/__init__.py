"""Triton kernels for the gate and the sparse dispatch of ds_tutel (see docs/KERNELS.md).

`gate` holds Tutel's fused gate (softmax, top-k, normalisation, slots, capacity mask), `dispatch` the encode and
decode kernels; both expose autograd-aware functions on plain tensors, so this package does not depend on ds_tutel.
Importing this package does not import triton; importing its submodules does.
"""
from __future__ import annotations

import importlib.util
import os


def available() -> bool:
    """True when triton can be imported (its kernels still need a GPU, or TRITON_INTERPRET=1 on the CPU)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


__all__ = ["available", "interpreting"]
