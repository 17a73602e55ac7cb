"""The package's layout as a contract: no import cycles, the core never imports a backend, and the forward strategy
table (docs/ARCHITECTURE.md) is what the layer runs, with a warning for options that change nothing."""
from __future__ import annotations

import ast
import os
import warnings
from typing import Dict, List, Set

import pytest
import torch
from torch import nn

import ds_tutel
from ds_tutel import strategies
from ds_tutel.strategies import CAPACITY, GROUPED, KEPT_EXCHANGE, ExchangeOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("ds_tutel", "triton_kernels", "benchmarks")
# The stages and the layer: none of them may name a backend's provider.
CORE = ("ds_tutel.layer", "ds_tutel.strategies", "ds_tutel.experts", "ds_tutel.options", "ds_tutel.stats",
        "ds_tutel.kernels", "ds_tutel.routing", "ds_tutel.dispatch", "ds_tutel.parallel")
BACKENDS = ("ds_tutel.kernels.cpu", "triton_kernels", "triton")


def _modules() -> Dict[str, str]:
    """Dotted module name -> file, for every .py file of the packages."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, name), REPO)[:-3].replace(os.sep, ".")
                    found[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, name)
    return found


def _imports(module: str, path: str, known: Set[str]) -> Set[str]:
    """The known modules that `module` imports anywhere in its source (top level or inside functions)."""
    is_package = path.endswith("__init__.py")
    tree = ast.parse(open(path).read(), path)
    targets: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base_parts = parts if is_package else parts[:-1]
                base = ".".join(base_parts[:len(base_parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from pkg import sub` imports the submodule; `from mod import name` imports mod.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] not in known and f"benchmarks.{name}" in known:
                name = f"benchmarks.{name}"  # a benchmark script importing a sibling by its bare name
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {m: _imports(m, path, set(modules)) & set(modules) for m, path in modules.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = _graph()
    assert "ds_tutel.layer" in graph and graph["ds_tutel.layer"], "the import graph must see the layer's imports"
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_core_names_no_backend():
    graph = _graph()
    core = [m for m in graph if any(m == c or m.startswith(c + ".") for c in CORE)
            and not m.startswith("ds_tutel.kernels.cpu")]
    assert "ds_tutel.routing.gate" in core and "ds_tutel.kernels" in core
    offenders = {m: sorted(t for t in graph[m] if any(t == b or t.startswith(b + ".") for b in BACKENDS))
                 for m in core}
    assert {m: t for m, t in offenders.items() if t} == {}


@pytest.mark.parametrize("ep_size,exchange,expected", [
    (1, ExchangeOptions(), GROUPED),
    (1, ExchangeOptions(send="capacity", algorithm="2dh"), GROUPED),
    (4, ExchangeOptions(), KEPT_EXCHANGE),
    (4, ExchangeOptions(algorithm="auto", auto_threshold=0), KEPT_EXCHANGE),
    (4, ExchangeOptions(algorithm="auto", auto_threshold=1 << 20), CAPACITY),
    (4, ExchangeOptions(algorithm="2dh"), CAPACITY),
    (4, ExchangeOptions(overlap_degree=2), CAPACITY),
    (4, ExchangeOptions(send="capacity"), CAPACITY),
])
def test_strategy_table(ep_size, exchange, expected):
    """The same on every backend: a layer on the GPU path (Triton) takes these strategies too
    (tests/test_kept_exchange.py runs both backends' kept exchange)."""
    assert strategies.choose(ep_size, exchange) == expected


def test_options_without_effect_are_named():
    assert strategies.ineffective_options(GROUPED, 1, ExchangeOptions()) == []
    assert strategies.ineffective_options(KEPT_EXCHANGE, 4, ExchangeOptions()) == []
    notes = strategies.ineffective_options(GROUPED, 1, ExchangeOptions(algorithm="2dh", overlap_degree=2))
    assert len(notes) == 2 and all("ep_size=1" in n for n in notes)
    (note,) = strategies.ineffective_options(CAPACITY, 4, ExchangeOptions(algorithm="2dh"))
    assert "a2a_send='kept'" in note and "flat all-to-all in one piece" in note
    (note,) = strategies.ineffective_options(KEPT_EXCHANGE, 4, ExchangeOptions(auto_threshold=1024))
    assert "a2a_auto_threshold" in note


def test_a_layer_warns_once_about_an_option_without_effect(monkeypatch):
    monkeypatch.setattr(strategies, "_warned", set())
    expert = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    layer = ds_tutel.MoE(8, expert, num_experts=4, a2a_algorithm="2dh")
    assert layer.deepspeed_moe.strategy(torch.device("cpu")) == GROUPED
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            layer(torch.randn(5, 8))
    messages = [str(w.message) for w in caught if "no effect" in str(w.message)]
    assert messages == ["ds_tutel.MoE: a2a_algorithm='2dh' has no effect with ep_size=1 (no exchange)"]


def test_default_layer_warns_nothing(monkeypatch):
    monkeypatch.setattr(strategies, "_warned", set())
    expert = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds_tutel.MoE(8, expert, num_experts=4, k=2)(torch.randn(5, 8))
