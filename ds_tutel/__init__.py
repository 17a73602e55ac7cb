"""ds_tutel: a Tutel-style Mixture-of-Experts backend for DeepSpeed.

One forward pass of `ds_tutel.MoE` (layer.py), stage by stage:
    routing/    tokens -> Routing (DeepSpeed's or Tutel's semantics)
    dispatch/   kept rows grouped by expert, or capacity buffers [E, C, M]
    parallel/   the all-to-all exchange over the expert-parallel group (flat, 2DH, kept rows)
    experts.py  the local experts on their rows (stacked_experts.py: gated experts with stacked weights)
    dispatch/   combine: gate-weighted sum back at each token
strategies.py names the ways these stages compose; kernels/ is the one registry of faster implementations (CPU
loops in kernels/cpu/, Triton kernels in the top-level triton_kernels package). launch/ and train/ are the
applications: the launcher and the GPT-MoE training job.

The public names load lazily, so that `python -m ds_tutel.launch` and the rank start-up do not import torch
and DeepSpeed before they have bound the process to its CPUs.
"""
from importlib import import_module
from typing import Any

_EXPORTS = {
    "MoE": "layer",
    "GLUExpert": "stacked_experts",
    "Routing": "routing.types",
    "RouterOptions": "options",
    "RoutingStats": "stats",
    "StatsCollector": "stats",
    "routing_stats": "stats",
    "route": "routing.gate",
    "route_deepspeed": "routing.deepspeed",
    "route_tutel": "routing.tutel",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ds_tutel' has no attribute {name!r}")
