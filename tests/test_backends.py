"""Backend selection (ds_tutel.kernels, ds_tutel.strategies): auto/triton/torch resolution, the functions each backend hands out, and
that the library imports and falls back to torch without triton.

These tests never import triton in this process (the kernel tests need to import it first, under the interpreter):
where triton's presence matters, they patch the probe or run a subprocess.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch

from ds_tutel import kernels
from ds_tutel import strategies as backends
from triton_kernels import interpreting
from ds_tutel.dispatch import capacity as torch_dispatch
from ds_tutel.routing.tutel import route_tutel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
GPU = torch.device("cuda", 0)  # a device object only: no GPU is needed to resolve for it


@pytest.fixture
def triton_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_triton_runs_on",
                        lambda: lambda device: torch.device(device).type == "cuda" or interpreting())


@pytest.fixture
def triton_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_triton_runs_on", lambda: None)


def test_torch_is_always_torch(triton_present):
    assert kernels.resolve_dispatch_backend("torch", CPU) == "torch"
    assert kernels.resolve_dispatch_backend("torch", GPU) == "torch"


def test_auto_takes_triton_on_gpus_only(triton_present, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels.resolve_dispatch_backend("auto", GPU) == "triton"
    assert kernels.resolve_dispatch_backend("auto", "cuda") == "triton"
    assert kernels.resolve_dispatch_backend("auto", CPU) == "torch"
    # The interpreter is for tests that ask for triton explicitly; auto on the CPU stays torch.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.resolve_dispatch_backend("auto", CPU) == "torch"


def test_auto_falls_back_to_torch_without_triton(triton_absent):
    assert kernels.resolve_dispatch_backend("auto", GPU) == "torch"


def test_triton_on_cpu_needs_the_interpreter(triton_present, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.resolve_dispatch_backend("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="runs on GPU tensors"):
        kernels.resolve_dispatch_backend("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.resolve_dispatch_backend("triton", CPU) == "triton"
    assert kernels.resolve_dispatch_backend("triton", GPU) == "triton"


def test_triton_without_the_package_is_a_clear_error(triton_absent):
    with pytest.raises(RuntimeError, match="needs the triton package"):
        kernels.resolve_dispatch_backend("triton", GPU)


def test_unknown_backend_names_are_rejected():
    with pytest.raises(ValueError, match="auto"):
        kernels.resolve_dispatch_backend("cuda", CPU)
    for resolved_only in (backends.dispatch_functions, backends.tutel_router):
        with pytest.raises(ValueError, match="resolved backend"):
            resolved_only("auto")


def test_torch_backend_hands_out_the_reference_functions():
    assert backends.dispatch_functions("torch") == (torch_dispatch.encode, torch_dispatch.decode)
    assert backends.tutel_router("torch") is route_tutel


def test_triton_functions_have_the_reference_signatures():
    encode, decode = backends.dispatch_functions("triton")
    assert inspect.signature(encode).parameters.keys() == inspect.signature(torch_dispatch.encode).parameters.keys()
    assert inspect.signature(decode).parameters.keys() == inspect.signature(torch_dispatch.decode).parameters.keys()
    router = backends.tutel_router("triton")
    want = inspect.signature(route_tutel).parameters
    got = inspect.signature(router).parameters
    assert list(got) == list(want)
    assert [p.default for p in got.values()] == [p.default for p in want.values()]


def _run(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": REPO, **env_extra}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_library_imports_and_selects_torch_without_triton():
    # A None entry in sys.modules makes `import triton` raise ImportError, as if it were not installed.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from ds_tutel import kernels, layer\n"
        "assert kernels.resolve_dispatch_backend('auto', torch.device('cuda')) == 'torch'\n"
        "try:\n"
        "    kernels.resolve_dispatch_backend('triton', torch.device('cuda'))\n"
        "except RuntimeError as e:\n"
        "    assert 'needs the triton package' in str(e)\n"
        "else:\n"
        "    raise AssertionError('triton backend resolved without triton')\n"
        "import triton_kernels\n"
        "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n")
    result = _run(code, {})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_triton_probe_agrees_with_the_installation():
    code = ("import importlib.util, torch\n"
            "from ds_tutel import kernels\n"
            "print((kernels._triton_runs_on() is not None) == (importlib.util.find_spec('triton') is not None))\n")
    result = _run(code, {})
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr
