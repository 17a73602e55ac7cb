"""Builds and loads the compiled CPU loops (csrc/grouped_dispatch.cpp: the grouped dispatch and plan, the router's
choices and slot ranks) on first use.

torch.utils.cpp_extension compiles them once per machine (a minute or so; ninja and a C++ compiler needed)
and caches the build under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), in
ds_tutel/<name>, the name a digest of the source, flags, torch version and CPU model. Later processes load that
build directly. Where the build fails the layer warns once and keeps the torch-operator path, which gives the
same results.

DS_TUTEL_CPU_KERNELS selects: "auto" (default: compile, fall back with a warning), "0" (never: the torch path),
"1" (required: a failed build raises).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import threading
import warnings
from typing import Any, Optional

import torch

from ...options import cpu_kernels_mode

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "grouped_dispatch.cpp")
# Contraction off: a product then a sum rounds as the torch path's separate operators do.
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=off"]

_lock = threading.Lock()
_state: dict = {}


def mode() -> str:
    """The DS_TUTEL_CPU_KERNELS setting, checked (ds_tutel.options.cpu_kernels_mode)."""
    return cpu_kernels_mode()


def _build_name() -> str:
    """Names a build by everything that goes into it: the source, the flags, torch's version and the CPU model
    (-march=native code must not run on a CPU with fewer instruction sets sharing the extensions directory).
    A changed input is a new name, so a build that exists is always current."""
    digest = hashlib.sha1()
    with open(_SOURCE, "rb") as f:
        digest.update(f.read())
    digest.update(" ".join(_CFLAGS).encode())
    digest.update(torch.__version__.encode())
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu += "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        pass
    digest.update(cpu.encode())
    return "ds_tutel_grouped_dispatch_" + digest.hexdigest()[:12]


def _build_directory(name: str) -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "torch_extensions")
    return os.path.join(root, "ds_tutel", name)


def _load_built(name: str, directory: str) -> Optional[Any]:
    """The build in `directory`, loaded directly: importing torch.utils.cpp_extension (setuptools and all)
    would add about 4.5 MB to every process. None where it is missing or unreadable (half-written, say)."""
    path = os.path.join(directory, name + ".so")
    if not os.path.isfile(path):
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except ImportError:
        return None


def load() -> Optional[Any]:
    """The compiled module, or None where disabled or (mode "auto") where the build failed."""
    if mode() == "0":
        return None
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
    return _state["module"]


def _build() -> Optional[Any]:
    name = _build_name()
    directory = _build_directory(name)
    module = _load_built(name, directory)
    if module is not None:
        return module
    try:
        from torch.utils.cpp_extension import load as load_extension
        os.makedirs(directory, exist_ok=True)
        return load_extension(name, sources=[_SOURCE], extra_cflags=_CFLAGS, build_directory=directory,
                              verbose=False)
    except Exception as error:  # a missing compiler or ninja surfaces as several exception types
        if mode() == "1":
            raise RuntimeError(f"DS_TUTEL_CPU_KERNELS=1 but the CPU kernels did not build: {error}") from error
        warnings.warn(f"ds_tutel: CPU dispatch kernels did not build ({type(error).__name__}: {error}); "
                      "using the torch-operator path (same results, slower). Set DS_TUTEL_CPU_KERNELS=0 to "
                      "skip the build.", RuntimeWarning, stacklevel=3)
        return None
