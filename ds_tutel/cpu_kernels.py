"""Compiled CPU loops for the grouped dispatch (csrc/grouped_dispatch.cpp), built on first use.

torch.utils.cpp_extension compiles them once per machine (about a minute on 2 cores; ninja and a C++
compiler needed) and caches the build under torch's extensions directory (TORCH_EXTENSIONS_DIR). Where the
build fails the layer warns once and keeps the torch-operator path, which gives the same results.

DS_TUTEL_CPU_KERNELS selects: "auto" (default: compile, fall back with a warning), "0" (never: the torch path),
"1" (required: a failed build raises).
"""
from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings
from typing import Any, Optional

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "grouped_dispatch.cpp")
_MODES = ("auto", "0", "1")
# Contraction off: a product then a sum rounds as the torch path's separate operators do.
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=off"]

_lock = threading.Lock()
_state: dict = {}


def mode() -> str:
    """The DS_TUTEL_CPU_KERNELS setting, checked."""
    value = os.environ.get("DS_TUTEL_CPU_KERNELS", "auto").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"DS_TUTEL_CPU_KERNELS must be one of {_MODES}, got {value!r}")
    return value


def _build_name() -> str:
    """One build per CPU model: -march=native code must not run on a machine with fewer instruction sets
    sharing the extensions directory."""
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu += "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        pass
    return "ds_tutel_grouped_dispatch_" + hashlib.sha1(cpu.encode()).hexdigest()[:10]


def load() -> Optional[Any]:
    """The compiled module, or None where disabled or (mode "auto") where the build failed."""
    if mode() == "0":
        return None
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
    return _state["module"]


def _build() -> Optional[Any]:
    try:
        from torch.utils.cpp_extension import load as load_extension
        return load_extension(_build_name(), sources=[_SOURCE], extra_cflags=_CFLAGS, verbose=False)
    except Exception as error:  # a missing compiler or ninja surfaces as several exception types
        if mode() == "1":
            raise RuntimeError(f"DS_TUTEL_CPU_KERNELS=1 but the CPU kernels did not build: {error}") from error
        warnings.warn(f"ds_tutel: CPU dispatch kernels did not build ({type(error).__name__}: {error}); "
                      "using the torch-operator path (same results, slower). Set DS_TUTEL_CPU_KERNELS=0 to "
                      "skip the build.", RuntimeWarning, stacklevel=3)
        return None
