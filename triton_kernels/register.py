"""Registers the Triton kernels with ds_tutel's registry (ds_tutel.kernels) under the backend "triton".

Imported by the registry on the first lookup of that backend; importing it imports triton, so where triton is not
installed the import fails and the layer keeps the torch path. The registered functions have exactly the
signatures of the torch path they replace (ds_tutel.dispatch.capacity.encode / decode,
ds_tutel.routing.tutel.route_tutel), so the layer swaps them without other changes.

Shape legend: S tokens, M model dim, E experts, K choices per token, C capacity.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton  # noqa: F401  (the provider is absent where triton is not installed)

from ds_tutel.kernels import register
from ds_tutel.routing.tutel import tutel_capacity
from ds_tutel.routing.types import CapacityAgreement, Routing

from . import dispatch, interpreting
from .gate import tutel_gate


def runs_on(device: torch.device) -> bool:
    """Kernels run on GPU tensors, and on CPU tensors only under Triton's interpreter."""
    return torch.device(device).type == "cuda" or interpreting()


def encode(x_SM: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Kept choices of x_SM -> zero-padded [E, C, M] (ds_tutel.dispatch.capacity.encode's twin)."""
    return dispatch.encode(x_SM, routing.indices_SK, routing.locations_SK, routing.capacity, routing.num_experts)


def decode(buf_ECM: torch.Tensor, routing: Routing) -> torch.Tensor:
    """[E, C, M] -> gate-weighted sum over each token's choices [S, M] (ds_tutel.dispatch.capacity.decode's twin)."""
    return dispatch.decode(buf_ECM, routing.gates_SK, routing.indices_SK, routing.locations_SK)


def route_tutel(logits_SE: torch.Tensor,
                k: int = 1,
                capacity_factor: float = 1.0,
                min_capacity: int = 0,
                batch_prioritized_routing: bool = False,
                normalize_gate: bool = True,
                used_token_S: Optional[torch.Tensor] = None,
                agree_capacity: Optional[CapacityAgreement] = None,
                selection_scores_SE: Optional[torch.Tensor] = None) -> Routing:
    """ds_tutel.routing.tutel.route_tutel on the fused gate kernels: the same Routing."""
    agree = agree_capacity or (lambda c: c)
    S = logits_SE.shape[0]

    def capacity_of(counts_E: torch.Tensor) -> int:
        return tutel_capacity(counts_E, S, k, capacity_factor, min_capacity, agree)

    probs_SE, gates_SK, indices_SK, locations_SK, counts_E, capacity = tutel_gate(
        logits_SE, k, normalize_gate, batch_prioritized_routing, used_token_S, capacity_of, selection_scores_SE)
    return Routing(indices_SK=indices_SK, locations_SK=locations_SK, gates_SK=gates_SK, capacity=capacity,
                   counts_E=counts_E, probs_SE=probs_SE)


register("triton", "runs_on", runs_on)
register("triton", "encode", encode)
register("triton", "decode", decode)
register("triton", "route_tutel", route_tutel)
