"""The layer's forward strategies: what runs between routing and the combined output, by name.

    grouped        ep_size 1: each expert on exactly its kept rows; no capacity buffer, no compute on empty
                   slots. Torch dispatch: the host plan of dispatch/grouped.py; Triton (the GPU path): the device
                   plan of dispatch/rows.py, the experts as grouped GEMMs (Experts.forward_rows).
    kept_exchange  ep_size > 1, a flat all-to-all in one piece, a2a_send="kept", either dispatch: only the kept
                   rows cross the wire, in both directions and in the backward (parallel/kept_exchange.py).
    capacity       everything else (a2a_send="capacity", 2dh, auto with a threshold, overlap chunks): capacity
                   buffers [E, C, M] filled by encode (torch or Triton), the flat / 2dh / auto exchange with
                   optional overlap chunks (parallel/exchange.py, which skips empty slots), then decode.

`choose` names the strategy from the layer's options (every backend runs every strategy; the resolved dispatch
backend picks how: `run`); `warn_ineffective` says once per process when an option the user set has no effect in
it. docs/ARCHITECTURE.md has the same table.

Shape legend: S tokens, M model dim, E experts, C capacity, W expert-parallel ranks, L local experts, R rows a rank
receives in the kept exchange.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Set, Tuple

import torch

from . import kernels
from .dispatch import capacity, rows
from .dispatch.grouped import grouped_decode, grouped_encode, grouped_plan
from .experts import Experts
from .options import auto_threshold
from .parallel.alltoall import Group
from .parallel.exchange import exchange_and_compute
from .parallel.kept_exchange import exchange_kept_and_compute, exchange_kept_rows_and_compute
from .routing.tutel import route_tutel
from .routing.types import Routing

GROUPED = "grouped"
KEPT_EXCHANGE = "kept_exchange"
CAPACITY = "capacity"
STRATEGIES = (GROUPED, KEPT_EXCHANGE, CAPACITY)

EncodeFn = Callable[[torch.Tensor, Routing], torch.Tensor]
DecodeFn = Callable[[torch.Tensor, Routing], torch.Tensor]


@dataclass(frozen=True)
class ExchangeOptions:
    """The expert-parallel exchange's options, as the layer was built with them."""

    algorithm: str = "flat"
    overlap_degree: int = 1
    auto_threshold: Optional[int] = None
    send: str = "kept"

    def flat_in_one_piece(self) -> bool:
        """One flat all-to-all per direction: "auto" counts as flat only with a zero threshold (otherwise it picks
        per message size, and kept rows give every rank another size)."""
        flat = self.algorithm == "flat" or (self.algorithm == "auto" and auto_threshold(self.auto_threshold) == 0)
        return flat and self.overlap_degree == 1


def choose(ep_size: int, exchange: ExchangeOptions) -> str:
    """The strategy for a layer with this expert-parallel size and exchange options (the same on every backend:
    each runs each strategy, the GPU path on its device row plan)."""
    if ep_size == 1:
        return GROUPED
    if exchange.send == "kept" and exchange.flat_in_one_piece():
        return KEPT_EXCHANGE
    return CAPACITY


def ineffective_options(strategy: str, ep_size: int, exchange: ExchangeOptions) -> List[str]:
    """Messages for the options set away from their defaults that change nothing in this strategy."""
    defaults = ExchangeOptions()
    notes = []
    if ep_size == 1:
        for name, value, default in (("a2a_algorithm", exchange.algorithm, defaults.algorithm),
                                     ("a2a_ffn_overlap_degree", exchange.overlap_degree, defaults.overlap_degree),
                                     ("a2a_send", exchange.send, defaults.send)):
            if value != default:
                notes.append(f"{name}={value!r} has no effect with ep_size=1 (no exchange)")
    elif strategy == CAPACITY and exchange.send == "kept":
        notes.append("a2a_send='kept' has no effect here (only a flat all-to-all in one piece can send kept rows): "
                     "whole capacity buffers [E, C, M] are exchanged; pass a2a_send='capacity' to say so")
    if exchange.auto_threshold is not None and exchange.algorithm != "auto":
        notes.append(f"a2a_auto_threshold={exchange.auto_threshold} has no effect with "
                     f"a2a_algorithm={exchange.algorithm!r} (it applies to 'auto')")
    return notes


_warned: Set[str] = set()


def warn_ineffective(strategy: str, ep_size: int, exchange: ExchangeOptions) -> None:
    """Warns once per process for each option that has no effect in this strategy."""
    for note in ineffective_options(strategy, ep_size, exchange):
        if note not in _warned:
            _warned.add(note)
            warnings.warn(f"ds_tutel.MoE: {note}", UserWarning, stacklevel=4)


def dispatch_functions(backend: str) -> Tuple[EncodeFn, DecodeFn]:
    """(encode, decode) into capacity buffers for a resolved backend ("torch" or "triton")."""
    if backend == "torch":
        return capacity.encode, capacity.decode
    if backend == "triton":
        encode, decode = kernels.lookup("triton", "encode"), kernels.lookup("triton", "decode")
        if encode is None or decode is None:
            raise RuntimeError("the Triton kernels are not available (pip install ds_tutel[triton])")
        return encode, decode
    raise ValueError(f"dispatch_functions takes a resolved backend ('torch' or 'triton'), got {backend!r}")


def tutel_router(backend: str) -> Callable[..., Routing]:
    """The Tutel router of a resolved backend, with route_tutel's signature."""
    if backend == "torch":
        return route_tutel
    if backend == "triton":
        router = kernels.lookup("triton", "route_tutel")
        if router is None:
            raise RuntimeError("the Triton kernels are not available (pip install ds_tutel[triton])")
        return router
    raise ValueError(f"tutel_router takes a resolved backend ('torch' or 'triton'), got {backend!r}")


def _run_rows(strategy: str, tokens_SM: torch.Tensor, routing: Routing, experts: Experts, backend: str,
              group: Group, filled_WL: Optional[Sequence[Sequence[int]]],
              sent_E: Optional[Sequence[int]]) -> torch.Tensor:
    """grouped / kept_exchange on the device plan (dispatch/rows.py): the GPU path, no host sync of its own where
    the experts run as grouped GEMMs."""
    if strategy == GROUPED:
        plan = rows.row_plan(routing)
        return rows.combine(experts.forward_rows(rows.gather(tokens_SM, plan), plan.offsets_E1, backend), plan)
    if sent_E is None:
        raise ValueError("the kept exchange on the device plan needs this rank's kept rows per expert (sent_E)")

    def run_experts(x_RM: torch.Tensor, offsets_L1: torch.Tensor, rows_L: List[int]) -> torch.Tensor:
        return experts.forward_rows(x_RM, offsets_L1, backend, rows_L)

    return exchange_kept_rows_and_compute(tokens_SM, rows.row_plan(routing, rows_E=sent_E), filled_WL, run_experts,
                                          group)


def run(strategy: str, tokens_SM: torch.Tensor, routing: Routing, experts: Experts, *, backend: str,
        group: Group, num_local_experts: int, exchange: ExchangeOptions,
        filled_WL: Optional[Sequence[Sequence[int]]], sent_E: Optional[Sequence[int]] = None) -> torch.Tensor:
    """y_SM: dispatch, (exchange,) experts, (exchange back,) combine, as the named strategy does them.
    sent_E: this rank's kept rows per expert, where the counts' exchange read them (the device plan's sizes)."""
    if backend != "torch" and strategy in (GROUPED, KEPT_EXCHANGE):
        return _run_rows(strategy, tokens_SM, routing, experts, backend, group, filled_WL, sent_E)
    round_rows = experts.row_rounding(tokens_SM.device, tokens_SM.dtype)
    if strategy == GROUPED:
        plan = grouped_plan(routing, round_rows)
        return grouped_decode(experts.forward_grouped(grouped_encode(tokens_SM, plan)), plan)
    if strategy == KEPT_EXCHANGE:
        return exchange_kept_and_compute(tokens_SM, grouped_plan(routing), filled_WL, experts.forward_grouped, group,
                                         round_rows)
    if strategy != CAPACITY:
        raise ValueError(f"unknown strategy {strategy!r}; known: {STRATEGIES}")
    encode, decode = dispatch_functions(backend)
    buf_ECM = encode(tokens_SM, routing)
    if group is None:  # ep_size 1: a None group would mean the whole world to torch.distributed
        out_ECM = experts(buf_ECM.unsqueeze(0)).squeeze(0)
    else:
        # The exchanged kept counts let the experts skip empty slots.
        out_ECM = exchange_and_compute(buf_ECM, experts.forward_filled, group, num_local_experts,
                                       algorithm=exchange.algorithm, overlap_degree=exchange.overlap_degree,
                                       auto_threshold=exchange.auto_threshold, filled_WL=filled_WL)
    return decode(out_ECM, routing)
