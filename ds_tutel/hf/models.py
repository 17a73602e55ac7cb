"""What ds_tutel knows about each supported transformers model type: where its sparse-MoE block is, how its router
decides, which dense parts of the block stay as they are.

Each entry was written from the model's transformers 5 source (>= 5.15): the block holds a router (a weight
[E, M] applied as a linear map, softmax over the experts in fp32, top-k of the probabilities, optionally
renormalised to sum to 1) and the experts fused as 3-D parameters gate_up_proj [E, 2I, M] (the gate rows first,
then the up rows) and down_proj [E, M, I], with the SwiGLU down(act(gate(x)) * up(x)). Conversion checks that a
block holds exactly the parameters listed here, so a transformers release that changes the layout (biases, other
names) fails loudly instead of converting wrongly.

Shape legend: E experts, M model dim, I expert intermediate dim.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

from torch import nn


@dataclass(frozen=True, kw_only=True)
class BlockSpec:
    """How to find and read the sparse-MoE block of one model type.

    block_class: the block's class in `modeling_module`; router, experts: its submodule names.
    normalize_topk: whether the top-k probabilities are renormalised to sum to 1: a bool, or the name of the HF
      router's attribute that says it (e.g. "norm_topk_prob").
    shared_expert, shared_expert_gate: a dense expert every token goes through, scaled by
      sigmoid(shared_expert_gate(x)) (Qwen2-MoE); kept as HF modules, under their HF names.
    jitter_attr: the block attribute holding multiplicative input jitter applied in training (Mixtral).
    """

    model_type: str
    modeling_module: str
    block_class: str
    router: str = "gate"
    experts: str = "experts"
    normalize_topk: Union[bool, str]
    shared_expert: Optional[str] = None
    shared_expert_gate: Optional[str] = None
    jitter_attr: Optional[str] = None

    def load_block_class(self) -> type:
        """The transformers block class (imports transformers)."""
        return getattr(importlib.import_module(self.modeling_module), self.block_class)

    def normalizes(self, router: nn.Module) -> bool:
        """Whether this HF router renormalises its top-k probabilities."""
        if isinstance(self.normalize_topk, bool):
            return self.normalize_topk
        return bool(getattr(router, self.normalize_topk))

    def dense_modules(self) -> Tuple[str, ...]:
        """Submodules of the block kept as they are."""
        return tuple(name for name in (self.shared_expert, self.shared_expert_gate) if name is not None)


def _spec(model_type: str, block_class: str, **fields) -> BlockSpec:
    return BlockSpec(model_type=model_type, modeling_module=f"transformers.models.{model_type}.modeling_{model_type}",
                     block_class=block_class, **fields)


# In the order they were taken on; every one is tested for exactness (tests/test_hf_convert.py).
SPECS: Dict[str, BlockSpec] = {spec.model_type: spec for spec in (
    _spec("qwen3_moe", "Qwen3MoeSparseMoeBlock", normalize_topk="norm_topk_prob"),
    _spec("mixtral", "MixtralSparseMoeBlock", normalize_topk=True, jitter_attr="jitter_noise"),
    _spec("olmoe", "OlmoeSparseMoeBlock", normalize_topk="norm_topk_prob"),
    _spec("qwen2_moe", "Qwen2MoeSparseMoeBlock", normalize_topk="norm_topk_prob",
          shared_expert="shared_expert", shared_expert_gate="shared_expert_gate"),
)}

SUPPORTED_MODEL_TYPES: Tuple[str, ...] = tuple(SPECS)


class UnsupportedModelError(ValueError):
    """The model's type has no conversion (yet)."""


def spec_for(model_type: Optional[str]) -> BlockSpec:
    """The spec of `model_type`, or UnsupportedModelError naming the supported types."""
    if model_type not in SPECS:
        raise UnsupportedModelError(
            f"ds_tutel.hf cannot convert model_type={model_type!r}: supported model types are "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return SPECS[model_type]
