"""Without the CPU provider (ds_tutel.kernels.cpu made unimportable) the layer still equals DeepSpeed's: the core
never imports the provider, and every stage falls back to its torch path (issue 28).

Shape legend: S tokens, M model dim.
"""
import ast
import os
import subprocess
import sys
from typing import Iterator, List, Optional, Tuple

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
PACKAGE = os.path.join(ROOT, "ds_tutel")
PROVIDER = "ds_tutel.kernels.cpu"
# The library's core: every module but the CPU provider itself and the applications beside it.
NOT_CORE = (os.path.join("kernels", "cpu"), "launch", "train")

# A fresh interpreter with the provider blocked before anything imports ds_tutel. It runs the equivalence tests
# (without tests/conftest.py, which builds the CPU loops), then checks the registry and one more layer step.
# argv: the equivalence test file.
_CHILD = """
import os, sys
sys.modules["ds_tutel.kernels.cpu"] = None  # import ds_tutel.kernels.cpu (and its submodules) raises ImportError
tests = os.path.dirname(os.path.abspath(sys.argv[1]))
sys.path[:0] = [os.path.dirname(tests), tests]
os.environ["DS_ACCELERATOR"] = "cpu"
import pytest
code = pytest.main(["-q", "-p", "no:cacheprovider", "--noconftest", sys.argv[1]])
assert code == 0, f"the equivalence tests failed without the CPU provider (pytest exit code {code})"

import torch
from ds_tutel import kernels
from ds_tutel.routing.deepspeed import route_deepspeed
from helpers import paired_layers, run_step
assert kernels.provider_loaded("cpu") is False
assert kernels.registered("cpu") == ()
routing = route_deepspeed(torch.randn(16, 4), k=2, capacity_factor=1.0, min_capacity=0)[0]
for op, args in (("grouped_plan", (routing,)), ("run_experts", ()), ("top1", (torch.rand(8, 4),)),
                 ("router_softmax", (torch.rand(8, 2),)), ("expert_row_rounding", (torch.bfloat16,))):
    assert kernels.find(op, torch.device("cpu"), *args) is None, op
reference, ours = paired_layers(16, num_experts=4, k=2, capacity_factor=1.0, min_capacity=0, use_rts=False,
                                top2_2nd_expert_sampling=False)
x_SM = torch.randn(50, 16)
out_r, laux_r, counts_r, gx_r, grads_r = run_step(reference, x_SM)
out_o, laux_o, counts_o, gx_o, grads_o = run_step(ours, x_SM)
assert ours.deepspeed_moe.last_routing is not None
torch.testing.assert_close(out_o, out_r, atol=1e-6, rtol=1e-5)
torch.testing.assert_close(laux_o, laux_r, atol=1e-6, rtol=1e-6)
assert torch.equal(counts_o, counts_r)
torch.testing.assert_close(gx_o, gx_r, atol=1e-6, rtol=1e-5)
assert grads_o.keys() == grads_r.keys() and grads_o
for name in grads_r:
    torch.testing.assert_close(grads_o[name], grads_r[name], atol=1e-6, rtol=1e-5, msg=name)
loaded = sorted(name for name, module in sys.modules.items() if name.startswith("ds_tutel.kernels.cpu") and module)
assert not loaded, loaded
print("WITHOUT-CPU-PROVIDER-OK")
"""


@pytest.mark.slow
def test_the_equivalence_tests_pass_without_the_cpu_provider():
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    done = subprocess.run([sys.executable, "-c", _CHILD, os.path.join(TESTS, "test_equivalence.py")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "WITHOUT-CPU-PROVIDER-OK" in done.stdout, (
        f"stdout:\n{done.stdout[-6000:]}\nstderr:\n{done.stderr[-3000:]}")
    assert " passed" in done.stdout and " failed" not in done.stdout


def _absolute(module: str, level: int, name: Optional[str]) -> str:
    """The absolute name of `from <level dots><name> import ...` written in module `module`."""
    if level == 0:
        return name or ""
    package = module.split(".")[:-level]  # "pkg.mod" and "pkg.__init__" alike: level 1 is pkg
    return ".".join(package + ([name] if name else []))


def imported_modules(source: str, module: str) -> Iterator[str]:
    """Every module an import statement in `source` (module `module`, "pkg.__init__" for a package) may import,
    at any depth of the file (function-level imports too), and importlib.import_module / __import__ calls with a
    constant name; `from a import b` yields a.b as well, b possibly being a submodule."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node.level, node.module)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.args[0].value


def _imports_provider(source: str, module: str) -> List[str]:
    return [name for name in imported_modules(source, module) if name == PROVIDER or name.startswith(PROVIDER + ".")]


def core_modules() -> List[Tuple[str, str]]:
    """(module name, path) of every core module; packages as "pkg.__init__"."""
    found = []
    for directory, _, files in os.walk(PACKAGE):
        relative = os.path.relpath(directory, PACKAGE)
        if relative != "." and relative.startswith(NOT_CORE):
            continue
        parts = ["ds_tutel"] + ([] if relative == "." else relative.split(os.sep))
        found += [(".".join(parts + [f[:-3]]), os.path.join(directory, f)) for f in sorted(files) if f.endswith(".py")]
    return found


def test_the_import_finder_sees_every_way_of_naming_the_provider():
    module = "ds_tutel.dispatch.grouped"
    for source in ("from ..kernels import cpu", "from ..kernels.cpu import build",
                   "from ..kernels.cpu.grouped import x", "import ds_tutel.kernels.cpu.grouped", "from ds_tutel.kernels import cpu as c",
                   "def f():\n    from ..kernels.cpu import row_buckets",
                   "import importlib\nimportlib.import_module('ds_tutel.kernels.cpu')"):
        assert _imports_provider(source, module), source
    assert _imports_provider("from .cpu import build", "ds_tutel.kernels.__init__")
    for source in ("from .. import kernels", "from ..kernels import find, resolve_dispatch_backend",
                   '"""see ds_tutel.kernels.cpu.grouped"""', "import ds_tutel.kernels.cpus"):
        assert not _imports_provider(source, module), source


def test_no_core_module_imports_the_cpu_provider():
    modules = dict(core_modules())
    # the stages the layer composes are all among those checked
    assert {"ds_tutel.layer", "ds_tutel.experts", "ds_tutel.strategies", "ds_tutel.__init__", "ds_tutel.options",
            "ds_tutel.kernels.__init__", "ds_tutel.routing.gate", "ds_tutel.routing.deepspeed",
            "ds_tutel.routing.choices", "ds_tutel.routing.slots", "ds_tutel.routing.softmax",
            "ds_tutel.dispatch.grouped", "ds_tutel.dispatch.capacity", "ds_tutel.parallel.alltoall",
            "ds_tutel.parallel.kept_exchange"} <= modules.keys()
    assert not any(name.startswith(PROVIDER) for name in modules)
    offenders = {}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            found = _imports_provider(f.read(), name)
        if found:
            offenders[name] = sorted(set(found))
    assert not offenders, f"core modules import the CPU provider: {offenders}"
