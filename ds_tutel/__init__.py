"""ds_tutel: a Tutel-style Mixture-of-Experts backend for DeepSpeed.

The public names load lazily, so that `python -m ds_tutel.launch` and the rank start-up do not import torch
and DeepSpeed before they have bound the process to its CPUs.
"""
from importlib import import_module
from typing import Any

_EXPORTS = {
    "MoE": "layer",
    "Routing": "routing",
    "RouterOptions": "options",
    "RoutingStats": "stats",
    "StatsCollector": "stats",
    "routing_stats": "stats",
    "route": "gating",
    "route_deepspeed": "gating",
    "route_tutel": "tutel_gating",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ds_tutel' has no attribute {name!r}")
