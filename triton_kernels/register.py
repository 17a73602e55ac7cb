"""Registers the Triton kernels with ds_tutel's registry (ds_tutel.kernels) under the backend "triton".

Imported by the registry on the first lookup of that backend; importing it imports triton, so where triton is not
installed the import fails and the layer keeps the torch path. The registered functions have exactly the
signatures of the torch path they replace (ds_tutel.dispatch.capacity.encode / decode,
ds_tutel.routing.tutel.route_tutel), so the layer swaps them without other changes; grouped_linear
(triton_kernels.grouped_gemm) runs the experts' linear layers on their sorted rows in one grouped GEMM. encode
and decode of one Routing share one build of its slot maps, kept on the Routing object (slot_maps_of).

Shape legend: S tokens, M model dim, E experts, K choices per token, C capacity.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton  # noqa: F401  (the provider is absent where triton is not installed)

from ds_tutel.kernels import register
from ds_tutel.routing.tutel import Choices, tutel_capacity
from ds_tutel.routing.tutel import route_tutel as torch_route_tutel
from ds_tutel.routing.types import CapacityAgreement, Routing

from . import dispatch, grouped_gemm, interpreting
from .gate import tutel_gate


def runs_on(device: torch.device) -> bool:
    """Kernels run on GPU tensors, and on CPU tensors only under Triton's interpreter."""
    return torch.device(device).type == "cuda" or interpreting()


# The attribute of a Routing that holds its slot maps once built (see slot_maps_of).
_MAPS_ATTR = "_triton_slot_maps"


def _version(t: torch.Tensor) -> Optional[int]:
    """t's in-place version counter (None for inference tensors, which keep none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def slot_maps_of(routing: Routing, capacity: int, num_experts: int) -> dispatch.SlotMaps:
    """The slot maps of this routing for an [E, C] buffer, built on first use and kept on the Routing object, so
    that encode and decode of one forward share one build. They are rebuilt where the routing's indices or
    locations were replaced or changed in place, or the buffer shape differs. Routing.detached() makes a new
    object without them, so what a layer keeps between steps does not hold them."""
    indices_SK, locations_SK = routing.indices_SK, routing.locations_SK
    made_from = (_version(indices_SK), _version(locations_SK), capacity, num_experts)
    cached = getattr(routing, _MAPS_ATTR, None)
    if cached is not None:
        cached_indices_SK, cached_locations_SK, cached_from, maps = cached
        if cached_indices_SK is indices_SK and cached_locations_SK is locations_SK and cached_from == made_from:
            return maps
    maps = dispatch.slot_maps(indices_SK, locations_SK, capacity, num_experts)
    setattr(routing, _MAPS_ATTR, (indices_SK, locations_SK, made_from, maps))
    return maps


def encode(x_SM: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Kept choices of x_SM -> zero-padded [E, C, M] (ds_tutel.dispatch.capacity.encode's twin)."""
    C, E = routing.capacity, routing.num_experts
    return dispatch.encode(x_SM, routing.indices_SK, routing.locations_SK, C, E, maps=slot_maps_of(routing, C, E))


def decode(buf_ECM: torch.Tensor, routing: Routing) -> torch.Tensor:
    """[E, C, M] -> gate-weighted sum over each token's choices [S, M] (ds_tutel.dispatch.capacity.decode's twin)."""
    E, C = buf_ECM.shape[0], buf_ECM.shape[1]
    return dispatch.decode(buf_ECM, routing.gates_SK, routing.indices_SK, routing.locations_SK,
                           maps=slot_maps_of(routing, C, E))


def route_tutel(logits_SE: torch.Tensor,
                k: int = 1,
                capacity_factor: float = 1.0,
                min_capacity: int = 0,
                batch_prioritized_routing: bool = False,
                normalize_gate: bool = True,
                used_token_S: Optional[torch.Tensor] = None,
                agree_capacity: Optional[CapacityAgreement] = None,
                selection_scores_SE: Optional[torch.Tensor] = None,
                choices: Optional[Choices] = None) -> Routing:
    """ds_tutel.routing.tutel.route_tutel on the fused gate kernels: the same Routing. A routing rule's
    precomputed choices get their slots from the torch path (the fused gate computes softmax top-k only)."""
    if choices is not None:
        return torch_route_tutel(logits_SE, k=k, capacity_factor=capacity_factor, min_capacity=min_capacity,
                                 batch_prioritized_routing=batch_prioritized_routing, normalize_gate=normalize_gate,
                                 used_token_S=used_token_S, agree_capacity=agree_capacity,
                                 selection_scores_SE=selection_scores_SE, choices=choices)
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


def grouped_linear_accepts(x_NI: torch.Tensor, offsets_L1: torch.Tensor, weights: Sequence[torch.Tensor],
                           biases: Optional[Sequence[Optional[torch.Tensor]]] = None) -> bool:
    """The grouped GEMM takes tensors where the Triton kernels run, fp32/bf16/fp16, 2-D x with unit feature
    stride, contiguous [O, I] weights and [O] biases of x's dtype and device, L + 1 int32/int64 offsets there."""
    return runs_on(x_NI.device) and grouped_gemm.accepts(x_NI, offsets_L1, weights, biases)


register("triton", "grouped_linear", grouped_gemm.grouped_linear, accepts=grouped_linear_accepts)
