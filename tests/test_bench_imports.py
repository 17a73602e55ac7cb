"""benchmarks/: every import of a benchmarks module names one that exists, and the modules import each other
without a cycle (imports inside functions included: a cycle there still ties two scripts together)."""
import ast
import os
import sys
from typing import Dict, Set

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")


def _modules() -> Dict[str, str]:
    """{dotted name: path} of every Python file under benchmarks/."""
    found = {}
    for root, _, files in os.walk(BENCHMARKS):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                found[os.path.relpath(path[:-3], REPO).replace(os.sep, ".")] = path
    return found


def _imported(path: str) -> Set[str]:
    """The benchmarks.* names a file imports (module names, or module.attribute for `from module import x`)."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "benchmarks":
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.split(".")[0] == "benchmarks")
    return names


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        imported = _imported(path)
        missing = {name for name in imported if name not in modules and name.rsplit(".", 1)[0] not in modules
                   and name not in ("benchmarks", "benchmarks.cpu")}
        assert not missing, f"{module} imports modules that do not exist: {sorted(missing)}"
        graph[module] = {name for name in imported if name in modules and name != module}
    return graph


def test_every_imported_benchmarks_module_exists_and_none_imports_itself():
    graph = _graph()
    assert "benchmarks.bench_layer" in graph and "benchmarks.cpu.rss_over_steps" in graph
    for module, path in _modules().items():
        assert module not in _imported(path), f"{module} imports itself"


def test_no_import_cycles():
    graph = _graph()
    state: Dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, "import cycle: " + " -> ".join(path + [module, target])
            if target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_cycle_check_sees_a_cycle(monkeypatch):
    cyclic = {"a": {"b"}, "b": {"a"}}
    monkeypatch.setattr(sys.modules[__name__], "_graph", lambda: cyclic)
    with pytest.raises(AssertionError, match="import cycle: a -> b -> a"):
        test_no_import_cycles()


def _ds_tutel_names() -> Set[tuple]:
    """(module, name) of every `from ds_tutel... import name` in benchmarks/ (name None for `import ds_tutel...`),
    those inside functions included."""
    found = set()
    for path in _modules().values():
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ds_tutel":
                found.update((node.module, alias.name) for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update((alias.name, None) for alias in node.names if alias.name.split(".")[0] == "ds_tutel")
    return found


def test_every_ds_tutel_name_a_benchmark_imports_exists():
    """The library's layout changes under the benchmarks: a stale path fails here, not half-way through a run."""
    import importlib
    names = _ds_tutel_names()
    assert ("ds_tutel.dispatch.grouped", "grouped_plan") in names
    for module, name in sorted(names, key=str):
        imported = importlib.import_module(module)
        if name is not None and not hasattr(imported, name):
            importlib.import_module(f"{module}.{name}")  # a submodule, or ModuleNotFoundError
