"""What ds_tutel knows about each supported transformers model type: where its sparse-MoE block is, how its router
decides, which dense parts of the block stay as they are.

Each entry was written from the model's transformers 5 source (>= 5.15): the block holds a router (a weight [E, M]
applied as a linear map, with a bias for GPT-OSS) whose routing rule is one of ds_tutel.routing.rules (softmax top-k
for most; DeepSeek-V3's sigmoid group-limited top-k with a selection bias buffer; GPT-OSS's and Granite-MoE's top-k
then softmax), and the experts fused as 3-D parameters in one of the layouts of block.EXPERT_FORMS: "swiglu"
(gate_up_proj [E, 2I, M], the gate rows first, and down_proj [E, M, I]: down(act(gate(x)) * up(x))) or "clamped_glu"
(GPT-OSS: gate_up_proj [E, M, 2I] with gate and up columns interleaved, down_proj [E, I, M], and their biases).
Conversion checks that a block holds exactly the parameters listed here, so a transformers release that changes the
layout (biases, other names) fails loudly instead of converting wrongly.

Shape legend: E experts, M model dim, I expert intermediate dim.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

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
    rule: the routing rule (ds_tutel.routing.rules) the router computes.
    rule_attributes: (ds_tutel option, HF router attribute) pairs read from the router for the rule, e.g.
      ("n_group", "num_group").
    router_bias: whether the router has a bias (GPT-OSS), kept as `deepspeed_moe.gate.wg.bias`.
    selection_bias: the name of the router's buffer holding a per-expert bias used for selection only
      (DeepSeek-V3's e_score_correction_bias), kept as the gate's `expert_bias` buffer.
    expert_form: the experts' layout and function, a key of block.EXPERT_FORMS.
    returns_router_scores: the block returns (hidden_states, router_scores) rather than hidden_states (GPT-OSS;
      its decoder layer discards the scores).
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
    rule: str = "softmax_topk"
    rule_attributes: Tuple[Tuple[str, str], ...] = ()
    router_bias: bool = False
    selection_bias: Optional[str] = None
    expert_form: str = "swiglu"
    returns_router_scores: bool = False

    def load_block_class(self) -> type:
        """The transformers block class (imports transformers)."""
        return getattr(importlib.import_module(self.modeling_module), self.block_class)

    def normalizes(self, router: nn.Module) -> bool:
        """Whether this HF router renormalises its top-k probabilities."""
        if isinstance(self.normalize_topk, bool):
            return self.normalize_topk
        return bool(getattr(router, self.normalize_topk))

    def rule_options(self, router: nn.Module) -> Dict[str, Any]:
        """ds_tutel routing options (ds_tutel.options.RouterOptions fields) that reproduce this HF router's rule."""
        options: Dict[str, Any] = dict(routing_rule=self.rule, router_bias=self.router_bias)
        options.update({option: getattr(router, attribute) for option, attribute in self.rule_attributes})
        return options

    def dense_modules(self) -> Tuple[str, ...]:
        """Submodules of the block kept as they are."""
        return tuple(name for name in (self.shared_expert, self.shared_expert_gate) if name is not None)


def _spec(model_type: str, block_class: str, **fields) -> BlockSpec:
    return BlockSpec(model_type=model_type, modeling_module=f"transformers.models.{model_type}.modeling_{model_type}",
                     block_class=block_class, **fields)


# DeepSeek-V3's router (and GLM-4-MoE's, the same code): sigmoid scores, group-limited top-k with the correction
# bias for selection, renormalised where norm_topk_prob, times routed_scaling_factor.
_GROUP_LIMITED: Dict[str, Any] = dict(
    rule="sigmoid_group_topk", selection_bias="e_score_correction_bias",
    rule_attributes=(("n_group", "num_group"), ("topk_group", "topk_group"),
                     ("routed_scaling_factor", "routed_scaling_factor")))

# In the order they were taken on; every one is tested for exactness (tests/test_hf_convert.py).
SPECS: Dict[str, BlockSpec] = {spec.model_type: spec for spec in (
    _spec("qwen3_moe", "Qwen3MoeSparseMoeBlock", normalize_topk="norm_topk_prob"),
    _spec("mixtral", "MixtralSparseMoeBlock", normalize_topk=True, jitter_attr="jitter_noise"),
    _spec("olmoe", "OlmoeSparseMoeBlock", normalize_topk="norm_topk_prob"),
    _spec("qwen2_moe", "Qwen2MoeSparseMoeBlock", normalize_topk="norm_topk_prob",
          shared_expert="shared_expert", shared_expert_gate="shared_expert_gate"),
    # Layers below first_k_dense_replace hold a dense MLP, not this block: they stay as they are.
    _spec("deepseek_v3", "DeepseekV3MoE", normalize_topk="norm_topk_prob", shared_expert="shared_experts",
          **_GROUP_LIMITED),
    _spec("glm4_moe", "Glm4MoeMoE", normalize_topk="norm_topk_prob", shared_expert="shared_experts",
          **_GROUP_LIMITED),
    _spec("gpt_oss", "GptOssMLP", router="router", normalize_topk=False, rule="topk_softmax", router_bias=True,
          expert_form="clamped_glu", returns_router_scores=True),
    # Granite-MoE: the block is `block_sparse_moe` (router GraniteMoeTopKRouter: top-k of the fp32 logits, softmax
    # over the k; no bias), its experts the "swiglu" layout. The decoder layer scales the block's output by
    # residual_multiplier, outside the block. It records no router logits in transformers 5.15 (no aux loss).
    _spec("granitemoe", "GraniteMoeMoE", router="router", normalize_topk=False, rule="topk_softmax"),
    # Granite-MoE-Shared: the same block; its dense `shared_mlp` is a submodule of the decoder layer, not of the
    # block (the layer adds it to the block's output), so it stays as it is.
    _spec("granitemoeshared", "GraniteMoeSharedMoE", router="router", normalize_topk=False, rule="topk_softmax"),
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
