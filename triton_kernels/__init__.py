"""Triton kernels for the gate and the sparse dispatch of ds_tutel (see docs/KERNELS.md).

`gate` holds Tutel's fused gate (softmax, top-k, normalisation, slots, capacity mask), `dispatch` the encode and
decode kernels; both expose autograd-aware functions on plain tensors and do not depend on ds_tutel. `register`
adds them to ds_tutel's kernel registry (ds_tutel.kernels) under the backend "triton".
Importing this package does not import triton; importing its submodules does.
"""
from __future__ import annotations

import os


def interpreting() -> bool:
    """True when triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1; read as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")


__all__ = ["interpreting"]
