"""How a transformers sparse-MoE block stores its experts, and how they map onto ds_tutel's stacked GLU experts
(ds_tutel.stacked_experts: one `gate_up_proj` [L, 2I, M] and one `down_proj` [L, M, I] Linear weight stacked
over the local experts, biases [L, 2I] / [L, M] where the model has them).

Three layouts:
  - "swiglu" (transformers 5, most models): fused 3-D parameters `gate_up_proj` [E, 2I, M] (gate rows, then up
    rows) and `down_proj` [E, M, I]: expert e's stacked weights are exactly these rows.
  - "clamped_glu" (transformers 5 and 4, GPT-OSS): `gate_up_proj` [E, M, 2I] applied as x @ W, gate and up
    columns interleaved, `down_proj` [E, I, M], and their biases: the stacked weights are these transposed.
  - per-expert Linear (transformers 4): an nn.ModuleList of E MLPs, each with three bias-free Linear maps
    (gate, up, down; Mixtral names them w1, w3, w2): the stacked gate_up_proj is gate's and up's weights one
    above the other.

A layout reads the HF experts module (`tensors`, `hf_dims`, `template`, `to_stacked`) and writes the stacked
tensors back in its own form (`from_stacked` to [L, ...] pieces, `hf_entries` to the state-dict entries).

Shape legend: E experts, L local experts (or any run of experts), M model dim, I expert intermediate dim, n rows
one expert runs on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..stacked_experts import GLUExpert


class ChunkedGLU(nn.Module):
    """act_fn(gate) * up, the gate the first half of the last dim and up the second (the HF "swiglu" experts)."""

    def __init__(self, act_fn: nn.Module) -> None:
        super().__init__()
        self.act_fn = act_fn

    def forward(self, gate_up_n2I: torch.Tensor) -> torch.Tensor:
        gate_nI, up_nI = gate_up_n2I.chunk(2, dim=-1)
        return self.act_fn(gate_nI) * up_nI


class ClampedInterleavedGLU(nn.Module):
    """GPT-OSS's gated activation: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = clamp(gate,
    max=limit), the gate at even and up at odd positions of the last dim."""

    def __init__(self, alpha: float, limit: float) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.limit = float(limit)

    def forward(self, gate_up_n2I: torch.Tensor) -> torch.Tensor:
        gate_nI = gate_up_n2I[..., 0::2].clamp(max=self.limit)
        up_nI = gate_up_n2I[..., 1::2].clamp(min=-self.limit, max=self.limit)
        return (up_nI + 1) * (gate_nI * torch.sigmoid(gate_nI * self.alpha))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, limit={self.limit}"


def _transposed(t_LAB: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t_LAB is None else t_LAB.transpose(1, 2).contiguous()


class SwiGLULayout:
    """HF layout "swiglu": gate_up_proj [E, 2I, M] (gate rows first, then up rows) and down_proj [E, M, I], no
    biases: expert e is down(act(gate(x)) * up(x)). Stacked, expert e's weights are exactly gate_up_proj[e] and
    down_proj[e]."""

    HF_TENSORS: Tuple[str, ...] = ("gate_up_proj", "down_proj")
    per_expert = False

    @classmethod
    def tensors(cls, experts: nn.Module) -> Dict[str, torch.Tensor]:
        """The experts' HF tensors by name relative to the experts module, else ValueError."""
        found = {name: getattr(experts, name, None) for name in cls.HF_TENSORS}
        if not all(isinstance(t, torch.Tensor) for t in found.values()):
            raise ValueError(f"expected fused experts {', '.join(cls.HF_TENSORS)} (transformers >= 5.15); this "
                             f"transformers version stores them otherwise")
        return found

    @staticmethod
    def hf_dims(experts: nn.Module) -> Tuple[int, int, int]:
        """(E, M, I) of HF experts in this layout, else ValueError."""
        gate_up_E2IM, down_EMI = experts.gate_up_proj, experts.down_proj
        E, two_I, M = gate_up_E2IM.shape
        I = two_I // 2
        if two_I != 2 * I or tuple(down_EMI.shape) != (E, M, I):
            raise ValueError(f"gate_up_proj {tuple(gate_up_E2IM.shape)} and down_proj {tuple(down_EMI.shape)} are "
                             "not [E, 2I, M] and [E, M, I]")
        return E, M, I

    @staticmethod
    def template(experts: nn.Module, M: int, I: int, device: torch.device, dtype: torch.dtype) -> GLUExpert:
        """One ds_tutel expert of this form (the MoE layer stacks its copies)."""
        return GLUExpert(M, I, ChunkedGLU(experts.act_fn), bias=False, device=device, dtype=dtype)

    @staticmethod
    def to_stacked(experts: nn.Module, first: int, stop: int) -> Dict[str, torch.Tensor]:
        """Experts first..stop-1 of the HF experts, as the stacked parameters (by name) hold them."""
        return {"gate_up_proj.weight": experts.gate_up_proj[first:stop],
                "down_proj.weight": experts.down_proj[first:stop]}

    @staticmethod
    def from_stacked(stacked: Dict[str, Optional[torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
        """The stacked parameters' tensors (by name; None passes through) as HF pieces [L, ...] by name."""
        return {"gate_up_proj": stacked["gate_up_proj.weight"], "down_proj": stacked["down_proj.weight"]}

    @staticmethod
    def hf_entries(pieces: Dict[str, Optional[torch.Tensor]],
                   num_experts: int) -> Dict[str, Optional[torch.Tensor]]:
        """The experts' state-dict entries (relative to the experts module) from the pieces [E, ...] of all
        num_experts experts (None: nothing to report for that piece)."""
        return dict(pieces)


class ClampedGLULayout(SwiGLULayout):
    """HF layout "clamped_glu" (GPT-OSS): gate_up_proj [E, M, 2I] applied as x @ W with gate and up columns
    interleaved (gate at even, up at odd columns), gate_up_proj_bias [E, 2I] likewise, down_proj [E, I, M],
    down_proj_bias [E, M]. Stacked, the weights are these transposed (Linear's [out, in]), the biases as they
    are; the interleaving stays (ClampedInterleavedGLU reads it)."""

    HF_TENSORS: Tuple[str, ...] = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")

    @staticmethod
    def hf_dims(experts: nn.Module) -> Tuple[int, int, int]:
        gate_up_EM2I = experts.gate_up_proj
        E, M, two_I = gate_up_EM2I.shape
        I = two_I // 2
        shapes = {"gate_up_proj": (E, M, 2 * I), "gate_up_proj_bias": (E, 2 * I), "down_proj": (E, I, M),
                  "down_proj_bias": (E, M)}
        if two_I != 2 * I or any(tuple(getattr(experts, n).shape) != shape for n, shape in shapes.items()):
            raise ValueError("expected gate_up_proj [E, M, 2I], gate_up_proj_bias [E, 2I], down_proj [E, I, M], "
                             "down_proj_bias [E, M], got " +
                             ", ".join(f"{n} {tuple(getattr(experts, n).shape)}" for n in shapes))
        return E, M, I

    @staticmethod
    def template(experts: nn.Module, M: int, I: int, device: torch.device, dtype: torch.dtype) -> GLUExpert:
        return GLUExpert(M, I, ClampedInterleavedGLU(experts.alpha, experts.limit), bias=True, device=device,
                         dtype=dtype)

    @staticmethod
    def to_stacked(experts: nn.Module, first: int, stop: int) -> Dict[str, torch.Tensor]:
        return {"gate_up_proj.weight": experts.gate_up_proj[first:stop].transpose(1, 2),
                "gate_up_proj.bias": experts.gate_up_proj_bias[first:stop],
                "down_proj.weight": experts.down_proj[first:stop].transpose(1, 2),
                "down_proj.bias": experts.down_proj_bias[first:stop]}

    @staticmethod
    def from_stacked(stacked: Dict[str, Optional[torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
        return {"gate_up_proj": _transposed(stacked["gate_up_proj.weight"]),
                "gate_up_proj_bias": stacked["gate_up_proj.bias"],
                "down_proj": _transposed(stacked["down_proj.weight"]), "down_proj_bias": stacked["down_proj.bias"]}


@dataclass(frozen=True)
class PerExpertGLULayout:
    """HF per-expert layout (transformers 4): the experts an nn.ModuleList of E MLPs, each computing
    down(act(gate(x)) * up(x)) with bias-free Linear maps named `gate`, `up`, `down` (weights [I, M], [I, M],
    [M, I]). Stacked, expert e's gate_up_proj is its gate weight above its up weight."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    per_expert = True

    def tensors(self, experts: nn.Module) -> Dict[str, torch.Tensor]:
        if not isinstance(experts, nn.ModuleList) or len(experts) == 0:
            raise ValueError("expected the experts as an nn.ModuleList of MLPs")
        found = {}
        for e, mlp in enumerate(experts):
            for name in (self.gate, self.up, self.down):
                linear = getattr(mlp, name, None)
                if not isinstance(linear, nn.Linear):
                    raise ValueError(f"expert {e} has no Linear `{name}` (expected {self.gate}, {self.up}, "
                                     f"{self.down})")
                found[f"{e}.{name}.weight"] = linear.weight
        return found

    def hf_dims(self, experts: nn.Module) -> Tuple[int, int, int]:
        I, M = getattr(experts[0], self.gate).weight.shape
        shapes = {self.gate: (I, M), self.up: (I, M), self.down: (M, I)}
        for e, mlp in enumerate(experts):
            for name, shape in shapes.items():
                if tuple(getattr(mlp, name).weight.shape) != shape:
                    raise ValueError(f"expert {e}'s {name} weight {tuple(getattr(mlp, name).weight.shape)} is not "
                                     f"{list(shape)} like expert 0's (every expert must have the same shapes)")
        return len(experts), M, I

    def template(self, experts: nn.Module, M: int, I: int, device: torch.device, dtype: torch.dtype) -> GLUExpert:
        return GLUExpert(M, I, ChunkedGLU(experts[0].act_fn), bias=False, device=device, dtype=dtype)

    def to_stacked(self, experts: nn.Module, first: int, stop: int) -> Dict[str, torch.Tensor]:
        chosen = experts[first:stop]
        return {"gate_up_proj.weight": torch.stack([torch.cat([getattr(mlp, self.gate).weight,
                                                               getattr(mlp, self.up).weight]) for mlp in chosen]),
                "down_proj.weight": torch.stack([getattr(mlp, self.down).weight for mlp in chosen])}

    def from_stacked(self, stacked: Dict[str, Optional[torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
        gate_up_L2IM = stacked["gate_up_proj.weight"]
        gate_LIM, up_LIM = (None, None) if gate_up_L2IM is None else gate_up_L2IM.chunk(2, dim=1)
        return {self.gate: gate_LIM, self.up: up_LIM, self.down: stacked["down_proj.weight"]}

    def hf_entries(self, pieces: Dict[str, Optional[torch.Tensor]],
                   num_experts: int) -> Dict[str, Optional[torch.Tensor]]:
        return {f"{e}.{name}.weight": (None if t is None else t[e]) for e in range(num_experts)
                for name, t in pieces.items()}


ExpertLayout = Union[type, PerExpertGLULayout]

# The transformers 5 fused-expert layouts a BlockSpec's expert_form names.
EXPERT_FORMS: Dict[str, type] = {"swiglu": SwiGLULayout, "clamped_glu": ClampedGLULayout}
