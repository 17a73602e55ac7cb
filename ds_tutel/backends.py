"""Choice between the torch reference path and the Triton kernels for the gate and the dispatch.

`resolve_backend("auto" | "triton" | "torch", device)` names the backend for tensors on `device`: auto takes Triton
on CUDA/ROCm GPUs when triton imports, torch everywhere else. `dispatch_functions` and `tutel_router` return
functions with exactly the signatures of the torch path (ds_tutel.dispatch.encode/decode,
ds_tutel.tutel_gating.route_tutel), so the layer swaps them without other changes. Triton is imported only when
the Triton backend is used, so the library imports without it.

Shape legend: S tokens, M model dim, E experts, K choices per token, C capacity.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional, Tuple

import torch
from triton_kernels import interpreting  # the package's __init__ does not import triton

from . import dispatch as torch_dispatch
from .routing import CapacityAgreement, Routing
from .tutel_gating import route_tutel, tutel_capacity

BACKENDS = ("auto", "triton", "torch")

EncodeFn = Callable[[torch.Tensor, Routing], torch.Tensor]
DecodeFn = Callable[[torch.Tensor, Routing], torch.Tensor]


def _triton_importable() -> bool:
    """Whether triton imports (importing it once is cheap; a broken install counts as absent)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def resolve_backend(name: str, device: torch.device) -> str:
    """"torch" or "triton" for tensors on `device`.

    auto: triton on a GPU (CUDA or ROCm, both report device type "cuda") when triton imports, else torch.
    triton: required; on a CPU it needs TRITON_INTERPRET=1 (the interpreter, for tests), otherwise it fails.
    """
    if name not in BACKENDS:
        raise ValueError(f"dispatch_backend must be one of {BACKENDS}, got {name!r}")
    device = torch.device(device)
    if name == "torch":
        return "torch"
    if name == "auto":
        return "triton" if device.type == "cuda" and _triton_importable() else "torch"
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"dispatch_backend='triton' runs on GPU tensors; these are on {device.type}. Use 'auto' "
                           "or 'torch', or set TRITON_INTERPRET=1 to run the kernels on the CPU (slow, for tests).")
    if not _triton_importable():
        raise RuntimeError("dispatch_backend='triton' needs the triton package (pip install ds_tutel[triton]), "
                           "or use 'auto' / 'torch'")
    return "triton"


def _triton_encode(x_SM: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Triton twin of ds_tutel.dispatch.encode: kept choices of x_SM -> zero-padded [E, C, M]."""
    from triton_kernels import dispatch as kernels
    return kernels.encode(x_SM, routing.indices_SK, routing.locations_SK, routing.capacity, routing.num_experts)


def _triton_decode(buf_ECM: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Triton twin of ds_tutel.dispatch.decode: [E, C, M] -> gate-weighted sum over each token's choices [S, M]."""
    from triton_kernels import dispatch as kernels
    return kernels.decode(buf_ECM, routing.gates_SK, routing.indices_SK, routing.locations_SK)


def dispatch_functions(backend: str) -> Tuple[EncodeFn, DecodeFn]:
    """(encode, decode) of a resolved backend ("torch" or "triton"), with ds_tutel.dispatch's signatures."""
    if backend == "torch":
        return torch_dispatch.encode, torch_dispatch.decode
    if backend == "triton":
        return _triton_encode, _triton_decode
    raise ValueError(f"dispatch_functions takes a resolved backend ('torch' or 'triton'), got {backend!r}")


def _route_tutel_triton(logits_SE: torch.Tensor,
                        k: int = 1,
                        capacity_factor: float = 1.0,
                        min_capacity: int = 0,
                        batch_prioritized_routing: bool = False,
                        normalize_gate: bool = True,
                        used_token_S: Optional[torch.Tensor] = None,
                        agree_capacity: Optional[CapacityAgreement] = None,
                        selection_scores_SE: Optional[torch.Tensor] = None) -> Routing:
    """route_tutel on Triton kernels: the same Routing, computed by the fused gate kernels."""
    from triton_kernels.gate import tutel_gate
    agree = agree_capacity or (lambda c: c)
    S = logits_SE.shape[0]

    def capacity_of(counts_E: torch.Tensor) -> int:
        return tutel_capacity(counts_E, S, k, capacity_factor, min_capacity, agree)

    probs_SE, gates_SK, indices_SK, locations_SK, counts_E, capacity = tutel_gate(
        logits_SE, k, normalize_gate, batch_prioritized_routing, used_token_S, capacity_of, selection_scores_SE)
    return Routing(indices_SK=indices_SK, locations_SK=locations_SK, gates_SK=gates_SK, capacity=capacity,
                   counts_E=counts_E, probs_SE=probs_SE)


def tutel_router(backend: str) -> Callable[..., Routing]:
    """The Tutel router of a resolved backend, with route_tutel's signature."""
    if backend == "torch":
        return route_tutel
    if backend == "triton":
        return _route_tutel_triton
    raise ValueError(f"tutel_router takes a resolved backend ('torch' or 'triton'), got {backend!r}")


__all__ = ["BACKENDS", "dispatch_functions", "resolve_backend", "tutel_router"]
