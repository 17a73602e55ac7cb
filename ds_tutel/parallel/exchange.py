"""The expert-parallel middle of an MoE layer: all-to-all out, local experts, all-to-all back.

The all-to-all is flat, hierarchical (2dh) or chosen per message size (auto), see alltoall.py. With an overlap
degree d > 1 the buffer is cut along the capacity dimension into d chunks, and the all-to-alls of one chunk run
(asynchronous collectives) while the experts compute another, in forward and backward. Experts act on each slot
independently, so chunking changes no result.

Shape legend: W expert-parallel ranks, L local experts (E = W * L), C capacity (Ci: one chunk's), M model dim.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from ..options import DEFAULT_AUTO_THRESHOLD_BYTES, check_algorithm, check_overlap_degree
from . import alltoall as comm
from .topology import Topology

ExpertFn = Callable[[torch.Tensor], torch.Tensor]  # [W, L, C', M] -> [W, L, C', M]


def check_exchange_args(buf_ECM: torch.Tensor, group: comm.Group, num_local_experts: int, algorithm: str,
                        overlap_degree: int) -> int:
    """Validates the arguments locally (before any collective); returns W, the group size."""
    check_algorithm(algorithm)
    check_overlap_degree(overlap_degree)
    if isinstance(num_local_experts, bool) or not isinstance(num_local_experts, int) or num_local_experts < 1:
        raise ValueError(f"num_local_experts must be an int >= 1, got {num_local_experts!r}")
    if not isinstance(buf_ECM, torch.Tensor) or buf_ECM.dim() != 3:
        raise ValueError(f"buf_ECM must be a 3-d tensor [E, C, M], got "
                         f"{tuple(buf_ECM.shape) if isinstance(buf_ECM, torch.Tensor) else type(buf_ECM).__name__}")
    W = comm.group_size(group)
    if buf_ECM.shape[0] != W * num_local_experts:
        raise ValueError(f"buffer has {buf_ECM.shape[0]} experts, expected group size {W} x {num_local_experts} "
                         "local experts")
    return W


def _exchange_count_pairs(kept_E: torch.Tensor, capacity: int, group: comm.Group, num_local_experts: int,
                          algorithm: str, topology: Optional[Topology],
                          auto_threshold: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sent_E2, recv_E2): this rank's (kept count, capacity) per expert, and the pairs every source rank w sent
    this rank's local experts (row w * L + l), in one small all-to-all. Nothing is read to the host."""
    E = kept_E.shape[0]
    W = comm.group_size(group)
    if E != W * num_local_experts:
        raise ValueError(f"{E} kept counts, expected group size {W} x {num_local_experts} local experts")
    exchange = comm.plan_exchange(group, algorithm, kept_E.device, topology=topology, threshold_bytes=auto_threshold)
    sent_E2 = torch.stack([kept_E.to(torch.int64), torch.full_like(kept_E, capacity, dtype=torch.int64)], dim=1)
    return sent_E2, exchange(sent_E2)


def exchange_counts(kept_E: torch.Tensor, capacity: int, group: comm.Group, num_local_experts: int,
                    algorithm: str = "flat", *, topology: Optional[Topology] = None,
                    auto_threshold: Optional[int] = None) -> Tuple[List[List[int]], List[int]]:
    """(filled_WL, capacity_W): how many slots of each local expert every source rank w filled, and the capacity
    each rank routed with, in one small all-to-all (the one exchange_and_compute makes for kept_E, with each
    rank's capacity riding along). Every rank receives every rank's capacity, so all see the same list."""
    _, recv_E2 = _exchange_count_pairs(kept_E, capacity, group, num_local_experts, algorithm, topology,
                                       auto_threshold)
    recv_WL2 = recv_E2.view(-1, num_local_experts, 2)
    return recv_WL2[:, :, 0].tolist(), recv_WL2[:, 0, 1].tolist()


def exchange_counts_once(kept_E: torch.Tensor, capacity: int, group: comm.Group, num_local_experts: int,
                         algorithm: str = "flat", *, topology: Optional[Topology] = None,
                         auto_threshold: Optional[int] = None) -> Tuple[List[List[int]], List[int], List[int]]:
    """(filled_WL, capacity_W, sent_E): exchange_counts' two lists plus this rank's own kept counts kept_E, all read
    to the host in one transfer after the exchange: the one host sync the GPU path's kept exchange makes."""
    sent_E2, recv_E2 = _exchange_count_pairs(kept_E, capacity, group, num_local_experts, algorithm, topology,
                                             auto_threshold)
    E, L = kept_E.shape[0], num_local_experts
    table = torch.cat([recv_E2, sent_E2]).tolist()  # received (w, l) pairs, then this rank's
    filled_WL = [[table[w * L + l][0] for l in range(L)] for w in range(E // L)]
    capacity_W = [table[w * L][1] for w in range(E // L)]
    return filled_WL, capacity_W, [n for n, _ in table[E:]]


def exchange_and_compute(buf_ECM: torch.Tensor, experts: ExpertFn, group: comm.Group, num_local_experts: int,
                         algorithm: str = "flat", overlap_degree: int = 1, *, topology: Optional[Topology] = None,
                         auto_threshold: Optional[int] = None,
                         kept_E: Optional[torch.Tensor] = None,
                         filled_WL: Optional[List[List[int]]] = None) -> torch.Tensor:
    """Sends each expert's slots to the rank that owns it, runs the local experts, returns outputs [E, C, M].

    Block w of dim 0 (experts w*L .. w*L+L-1) goes to rank w; rank w receives one [L, C, M] block from every
    rank, so the experts see [W, L, C, M] with W indexing the source rank.
    algorithm: 'flat' | '2dh' | 'auto' (2dh for messages of at most `auto_threshold` bytes per rank, default
      $DS_TUTEL_A2A_AUTO_THRESHOLD or DEFAULT_AUTO_THRESHOLD_BYTES); 2dh is flat on a single node.
    overlap_degree: capacity chunks whose all-to-alls overlap the experts (clamped to C); same result as 1.
    topology: nodes x local ranks; default from the launcher's environment (topology.from_env).
    kept_E: when given (this rank's filled slots per expert; filled slots are a prefix of each expert's
      buffer), the counts go through the same exchange first, and experts is called as
      experts(chunk_WLCM, filled_WL) with the filled slots of that capacity chunk per (source rank, local
      expert), so that it can skip the empty ones.
    filled_WL: the exchanged counts themselves, when the caller already has them (exchange_counts); kept_E is
      then not exchanged again.
    """
    W = check_exchange_args(buf_ECM, group, num_local_experts, algorithm, overlap_degree)
    E, C, M = buf_ECM.shape
    L = num_local_experts
    exchange = comm.plan_exchange(group, algorithm, buf_ECM.device, topology=topology,
                                  threshold_bytes=auto_threshold)
    degree = max(1, min(overlap_degree, C))

    if filled_WL is None and kept_E is not None:
        filled_WL = exchange(kept_E.view(E, 1)).view(W, L).tolist()

    def run(chunk_WLCM: torch.Tensor, first_slot: int) -> torch.Tensor:
        if filled_WL is None:
            return experts(chunk_WLCM)
        size = chunk_WLCM.shape[2]
        return experts(chunk_WLCM, [[min(max(n - first_slot, 0), size) for n in row] for row in filled_WL])

    if degree == 1:
        recv_ECM = exchange(buf_ECM)
        out_WLCM = run(recv_ECM.view(W, L, C, M), 0)
        return exchange(out_WLCM.reshape(E, C, M))

    chunks_ECM = torch.tensor_split(buf_ECM, degree, dim=1)
    firsts = [0]
    for chunk_ECM in chunks_ECM[:-1]:
        firsts.append(firsts[-1] + chunk_ECM.shape[1])
    if W == 1:
        outs_ECM = [run(chunk_ECM.reshape(1, L, -1, M), first).reshape(E, -1, M)
                    for chunk_ECM, first in zip(chunks_ECM, firsts)]
        return torch.cat(outs_ECM, dim=1)

    # Issue every chunk's dispatch first; then, chunk by chunk, wait for it, run the experts and issue its
    # combine, so the exchanges of the other chunks run while the experts compute.
    schedule = comm.Schedule()
    sent = [comm.all_to_all_start(chunk_ECM.contiguous(), exchange, schedule) for chunk_ECM in chunks_ECM]
    returning = []
    for (unfilled_ECM, slot), chunk_ECM, first in zip(sent, chunks_ECM, firsts):
        Ci = chunk_ECM.shape[1]
        recv_WLCM = comm.all_to_all_wait(unfilled_ECM, slot).view(W, L, Ci, M)
        out_WLCM = run(recv_WLCM, first)
        returning.append(comm.all_to_all_start(out_WLCM.reshape(E, Ci, M), exchange, schedule))
    outs_ECM: List[torch.Tensor] = [comm.all_to_all_wait(unfilled_ECM, slot) for unfilled_ECM, slot in returning]
    return torch.cat(outs_ECM, dim=1)
