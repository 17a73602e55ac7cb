"""Tutel's routing features as one validated, keyword-only options object (defaults keep DeepSpeed's behaviour)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict

CAPACITY_MODES = ("deepspeed", "tutel")
AUX_LOSSES = ("gshard", "switch", "none")
A2A_ALGORITHMS = ("flat", "2dh", "auto")
A2A_SENDS = ("kept", "capacity")
DISPATCH_BACKENDS = ("auto", "triton", "torch")


@dataclass(kw_only=True)
class RouterOptions:
    """How the gate routes and which losses it adds.

    capacity_mode: "deepspeed" (DeepSpeed's capacity and drop rules) or "tutel" (capacity_factor > 0 fixed,
        0 dropless, < 0 bounded no-pad; k-major queues, see tutel_gating).
    batch_prioritized_routing: (tutel) an overflowing expert keeps the highest-scoring tokens first.
    normalize_gate: (tutel) top-k gate values renormalised to sum to 1 per token.
    gate_noise: std of normal noise (divided by E) on the logits that choose experts, training only.
    input_dropout: dropout probability on the router's input, training only.
    input_jitter: epsilon of multiplicative uniform jitter on the router's input, training only.
    aux_loss: "gshard" (DeepSpeed's l_aux), "switch", or "none".
    z_loss_coef: weight of the router z-loss (mean squared logsumexp of the logits) added to l_aux.
    expert_bias: (tutel) aux-loss-free balancing: a per-expert bias added to the scores for selection only,
        moved by expert_bias_rate toward balance from the load observed in each training forward.
    """

    capacity_mode: str = "deepspeed"
    batch_prioritized_routing: bool = False
    normalize_gate: bool = True
    gate_noise: float = 0.0
    input_dropout: float = 0.0
    input_jitter: float = 0.0
    aux_loss: str = "gshard"
    z_loss_coef: float = 0.0
    expert_bias: bool = False
    expert_bias_rate: float = 1e-3

    def __post_init__(self) -> None:
        if self.capacity_mode not in CAPACITY_MODES:
            raise ValueError(f"capacity_mode must be one of {CAPACITY_MODES}, got {self.capacity_mode!r}")
        if self.aux_loss not in AUX_LOSSES:
            raise ValueError(f"aux_loss must be one of {AUX_LOSSES}, got {self.aux_loss!r}")
        for name in ("gate_noise", "input_jitter", "z_loss_coef", "expert_bias_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not isinstance(self.input_dropout, (int, float)) or not 0 <= self.input_dropout < 1:
            raise ValueError(f"input_dropout must be in [0, 1), got {self.input_dropout!r}")
        if self.capacity_mode == "deepspeed":
            for name in ("batch_prioritized_routing", "expert_bias"):
                if getattr(self, name):
                    raise ValueError(f"{name}=True needs capacity_mode='tutel' (DeepSpeed's routing has no such rule)")

    @classmethod
    def field_names(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def pick(cls, kwargs: Dict[str, Any]) -> "RouterOptions":
        """Builds options from the matching keys of kwargs (others are left alone)."""
        return cls(**{k: kwargs[k] for k in cls.field_names() if k in kwargs})
