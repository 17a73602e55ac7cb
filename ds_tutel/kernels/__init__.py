"""The one registry of accelerated implementations.

The reference path is plain torch (ds_tutel.routing, ds_tutel.dispatch, ds_tutel.experts). Faster
implementations register themselves here under an operation name and a backend:
  "cpu"     ds_tutel.kernels.cpu: compiled loops and CPU-only layouts, for tensors on the CPU;
  "triton"  triton_kernels.register: the Triton gate, capacity-buffer and grouped GEMM kernels, for GPU tensors
            (or any tensor under Triton's interpreter, TRITON_INTERPRET=1, for tests).
The core imports no provider: the registry imports a backend's provider by name on its first lookup, and a
provider that does not import (deleted, or its dependencies missing) leaves the torch path, which gives the same
results. An implementation may come with an `accepts` predicate over the call's arguments (dtype, shape, whether
a build succeeded); where it declines, the caller runs the torch path.

This module imports nothing of ds_tutel but its options, so every stage can consult it without an import cycle.
"""
from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ..options import check_backend

PROVIDERS = {"cpu": "ds_tutel.kernels.cpu", "triton": "triton_kernels.register"}
# The backend whose implementations apply, without being asked for, to tensors on a device type.
DEVICE_BACKENDS = {"cpu": "cpu"}


@dataclass(frozen=True)
class Implementation:
    fn: Callable[..., Any]
    accepts: Optional[Callable[..., bool]] = None


_table: Dict[Tuple[str, str], Implementation] = {}
_providers: Dict[str, bool] = {}
_lock = threading.RLock()


def register(backend: str, op: str, fn: Callable[..., Any], accepts: Optional[Callable[..., bool]] = None) -> None:
    """Registers fn as backend's implementation of op (a later registration replaces an earlier one)."""
    if backend not in PROVIDERS:
        raise ValueError(f"unknown backend {backend!r}; known: {sorted(PROVIDERS)}")
    with _lock:
        _table[(backend, op)] = Implementation(fn, accepts)


def provider_loaded(backend: str) -> bool:
    """Imports backend's provider once; False where it does not import (then only the torch path runs)."""
    with _lock:
        if backend not in _providers:
            try:
                importlib.import_module(PROVIDERS[backend])
                _providers[backend] = True
            except ImportError:
                _providers[backend] = False
        return _providers[backend]


def lookup(backend: str, op: str, *args: Any, **kwargs: Any) -> Optional[Callable[..., Any]]:
    """backend's implementation of op where its provider imports, it registered one and accepts these arguments;
    else None."""
    if backend not in PROVIDERS or not provider_loaded(backend):
        return None
    impl = _table.get((backend, op))
    if impl is None or (impl.accepts is not None and not impl.accepts(*args, **kwargs)):
        return None
    return impl.fn


def find(op: str, device: torch.device, *args: Any, **kwargs: Any) -> Optional[Callable[..., Any]]:
    """The implementation of op for tensors on `device` (its device type's backend, see DEVICE_BACKENDS) that
    accepts these arguments, or None: run the torch path."""
    backend = DEVICE_BACKENDS.get(torch.device(device).type)
    return None if backend is None else lookup(backend, op, *args, **kwargs)


def registered(backend: str) -> Tuple[str, ...]:
    """The operations backend's provider registered (empty where it does not import)."""
    provider_loaded(backend)
    return tuple(sorted(op for b, op in _table if b == backend))


def _triton_runs_on() -> Optional[Callable[[torch.device], bool]]:
    """The Triton provider's device check, or None where the provider does not import (no triton)."""
    return lookup("triton", "runs_on")


def resolve_dispatch_backend(name: str, device: torch.device) -> str:
    """"torch" or "triton": who computes the Tutel gate and the capacity buffers for tensors on `device`.

    auto: triton on a GPU (CUDA or ROCm, both report device type "cuda") where the Triton provider imports
    (triton installed), else torch. triton: required; on a CPU it needs TRITON_INTERPRET=1 (the interpreter, for
    tests). torch: the reference operators (on the CPU, with the "cpu" backend's implementations where they apply).
    """
    check_backend(name)
    device = torch.device(device)
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return "torch"  # without importing triton
    runs_on = _triton_runs_on()
    if name == "auto":
        return "triton" if runs_on is not None else "torch"
    if runs_on is None:
        raise RuntimeError("dispatch_backend='triton' needs the triton package (pip install ds_tutel[triton]), "
                           "or use 'auto' / 'torch'")
    if not runs_on(device):
        raise RuntimeError(f"dispatch_backend='triton' runs on GPU tensors; these are on {device.type}. Use 'auto' "
                           "or 'torch', or set TRITON_INTERPRET=1 to run the kernels on the CPU (slow, for tests).")
    return "triton"


__all__ = ["PROVIDERS", "find", "lookup", "provider_loaded", "register", "registered", "resolve_dispatch_backend"]
