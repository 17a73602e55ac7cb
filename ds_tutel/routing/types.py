"""The routing of one batch: the only state that flows from the gate to the dispatch.

Shape legend: S tokens, E experts, K choices per token.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

# Maps this rank's capacity to the capacity every rank of the expert-parallel group uses (their maximum).
CapacityAgreement = Callable[[int], int]


@dataclass
class Routing:
    """Per-token expert choices in sparse form (no [S, E, C] tensors anywhere).

    indices_SK:   int64, the expert of each choice (valid even where the choice was dropped).
    locations_SK: int64, the slot inside that expert's capacity buffer, -1 where dropped.
    gates_SK:     float32, the weight of each choice in the combine, 0 where dropped; carries autograd.
    capacity:     slots per expert in the dispatch buffer (agreed across the expert-parallel group).
    counts_E:     int64, choices that wanted each expert before any dropping (DeepSpeed's exp_counts).
    probs_SE:     float32 scores the choices were made from: the softmax of the logits, or a routing rule's
                  scores (sigmoid for DeepSeek-V3's rule); losses and statistics read them.
    """

    indices_SK: torch.Tensor
    locations_SK: torch.Tensor
    gates_SK: torch.Tensor
    capacity: int
    counts_E: torch.Tensor
    probs_SE: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.indices_SK.shape[0]

    @property
    def k(self) -> int:
        return self.indices_SK.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts_E.shape[0]

    # Names of the public contract (ds_tutel.route users read these).
    @property
    def indices(self) -> torch.Tensor:
        return self.indices_SK

    @property
    def locations(self) -> torch.Tensor:
        return self.locations_SK

    @property
    def gates(self) -> torch.Tensor:
        return self.gates_SK

    @property
    def counts(self) -> torch.Tensor:
        return self.counts_E

    @property
    def kept_SK(self) -> torch.Tensor:
        """Boolean mask of the choices that got a slot."""
        return self.locations_SK >= 0

    def slots_SK(self) -> torch.Tensor:
        """Flat slot of each choice in an [E * C] buffer; dropped choices point at E * C (a scratch row)."""
        scratch = self.num_experts * self.capacity
        flat_SK = self.indices_SK * self.capacity + self.locations_SK
        return torch.where(self.kept_SK, flat_SK, torch.full_like(flat_SK, scratch))

    def detached(self) -> "Routing":
        """The same decisions without autograd history: what a layer keeps for statistics after its step, so
        that the step's graph (and through it the step's input and that input's gradient) is not kept alive."""
        return replace(self, gates_SK=self.gates_SK.detach(), probs_SE=self.probs_SE.detach())

    def kept_per_expert(self) -> torch.Tensor:
        """int64 [E]: choices that got a slot in each expert (filled slots are a prefix of each expert's buffer)."""
        kept_indices = self.indices_SK[self.kept_SK]
        return torch.bincount(kept_indices, minlength=self.num_experts)
