"""The expert-parallel middle of an MoE layer: all-to-all out, local experts, all-to-all back.

Shape legend: W expert-parallel ranks, L local experts (E = W * L), C capacity, M model dim.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import comm

ExpertFn = Callable[[torch.Tensor], torch.Tensor]  # [W, L, C', M] -> [W, L, C', M]


def exchange_and_compute(buf_ECM: torch.Tensor, experts: ExpertFn, group: comm.Group, num_local_experts: int,
                         algorithm: str = "flat", overlap_degree: int = 1) -> torch.Tensor:
    """Sends each expert's slots to the rank that owns it, runs the local experts, returns outputs [E, C, M].

    Block w of dim 0 (experts w*L .. w*L+L-1) goes to rank w; rank w receives one [L, C, M] block from every
    rank, so the experts see [W, L, C, M] with W indexing the source rank.
    """
    if algorithm != "flat" or overlap_degree != 1:
        raise NotImplementedError(f"a2a algorithm {algorithm!r} with overlap degree {overlap_degree}")
    E, C, M = buf_ECM.shape
    W = E // num_local_experts
    recv_ECM = comm.all_to_all(buf_ECM, group)
    out_WLCM = experts(recv_ECM.view(W, num_local_experts, C, M))
    return comm.all_to_all(out_WLCM.reshape(E, C, M), group)
