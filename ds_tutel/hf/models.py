"""What ds_tutel knows about each supported transformers model type: where its sparse-MoE block is, how its router
decides, which dense parts of the block stay as they are.

Each entry was written from the model's transformers 5 source (>= 5.15): the block holds a router (a weight [E, M]
applied as a linear map, with a bias for GPT-OSS) whose routing rule is one of ds_tutel.routing.rules (softmax top-k
for most; DeepSeek-V3's sigmoid group-limited top-k with a selection bias buffer; GPT-OSS's and Granite-MoE's top-k
then softmax), and the experts fused as 3-D parameters in one of the layouts of layouts.EXPERT_FORMS. Where
transformers 4 (4.57) has the same block with per-expert Linear MLPs, `per_expert` names their Linear maps
(layouts.PerExpertGLULayout); the routing is the same, its attributes (top_k, norm_topk_prob) may sit on the
block instead of the router. Conversion checks that a block holds exactly the parameters its layout lists, so a
transformers release that changes the layout (biases, other names) fails loudly instead of converting wrongly.

Shape legend: E experts, M model dim, I expert intermediate dim.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

from torch import nn

from .layouts import EXPERT_FORMS, ExpertLayout, PerExpertGLULayout


@dataclass(frozen=True, kw_only=True)
class BlockSpec:
    """How to find and read the sparse-MoE block of one model type.

    block_class: the block's class in `modeling_module`; router, experts: its submodule names.
    normalize_topk: whether the top-k probabilities are renormalised to sum to 1: a bool, or the name of the HF
      router's attribute that says it (e.g. "norm_topk_prob").
    shared_expert, shared_expert_gate: a dense expert every token goes through, scaled by
      sigmoid(shared_expert_gate(x)) (Qwen2-MoE); kept as HF modules, under their HF names.
    jitter_attr: the block attribute holding multiplicative input jitter applied in training (Mixtral).
    jitter_draws: how many times that jitter is drawn and applied (Phi-MoE: twice, by the block and its router).
    rule: the routing rule (ds_tutel.routing.rules) the router computes.
    rule_attributes: (ds_tutel option, HF router attribute) pairs read from the router for the rule, e.g.
      ("n_group", "num_group"); where the router has no such attribute, the one named as the option.
    router_bias: whether the router has a bias (GPT-OSS), kept as `deepspeed_moe.gate.wg.bias`.
    selection_bias: the name of the router's buffer holding a per-expert bias used for selection only
      (DeepSeek-V3's e_score_correction_bias), kept as the gate's `selection_bias` buffer.
    expert_form: the experts' fused layout and function, a key of layouts.EXPERT_FORMS.
    returns_router_scores: the block returns (hidden_states, router_scores) rather than hidden_states (GPT-OSS;
      its decoder layer discards the scores).
    per_expert: the layout of transformers 4's per-expert MLPs of this block, None where there is none.
    per_expert_returns_logits: transformers 4's block returns (hidden_states, router_logits): the model collects
      the logits from the block's output (Mixtral, Qwen, OLMoE).
    per_expert_overrides: (field, value) pairs where transformers 4's block differs otherwise (Phi-MoE's router
      is `gate` there, and only the block jitters the input).
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
    jitter_draws: int = 1
    rule: str = "softmax_topk"
    rule_attributes: Tuple[Tuple[str, str], ...] = ()
    router_bias: bool = False
    selection_bias: Optional[str] = None
    expert_form: str = "swiglu"
    returns_router_scores: bool = False
    per_expert: Optional[PerExpertGLULayout] = None
    per_expert_returns_logits: bool = False
    per_expert_overrides: Tuple[Tuple[str, Any], ...] = ()

    def load_block_class(self) -> type:
        """The transformers block class (imports transformers)."""
        return getattr(importlib.import_module(self.modeling_module), self.block_class)

    def for_block(self, block: nn.Module) -> "BlockSpec":
        """This spec as it applies to `block`: with per_expert_overrides where the block holds per-expert MLPs."""
        if self.per_expert is not None and isinstance(getattr(block, self.experts, None), nn.ModuleList):
            return dataclasses.replace(self, **dict(self.per_expert_overrides))
        return self

    def layout(self, experts: nn.Module) -> ExpertLayout:
        """The layout of this block's HF experts: per-expert MLPs (transformers 4) or the fused form."""
        if self.per_expert is not None and isinstance(experts, nn.ModuleList):
            return self.per_expert
        return EXPERT_FORMS[self.expert_form]

    def top_k(self, block: nn.Module) -> int:
        """How many experts the HF block routes each token to."""
        return int(_attribute(block, self.router, "top_k"))

    def normalizes(self, block: nn.Module) -> bool:
        """Whether this HF block renormalises its top-k probabilities."""
        if isinstance(self.normalize_topk, bool):
            return self.normalize_topk
        return bool(_attribute(block, self.router, self.normalize_topk))

    def rule_options(self, block: nn.Module) -> Dict[str, Any]:
        """ds_tutel routing options (ds_tutel.options.RouterOptions fields) that reproduce this HF block's rule."""
        options: Dict[str, Any] = dict(routing_rule=self.rule, router_bias=self.router_bias)
        options.update({option: _attribute(block, self.router, attribute, option)
                        for option, attribute in self.rule_attributes})
        return options

    def dense_modules(self) -> Tuple[str, ...]:
        """Submodules of the block kept as they are."""
        return tuple(name for name in (self.shared_expert, self.shared_expert_gate) if name is not None)


def _attribute(block: nn.Module, router_name: str, *names: str) -> Any:
    """The first of `names` found on the block's router, else on the block (transformers 4 keeps top_k and
    norm_topk_prob there); AttributeError naming them if neither has any."""
    router = getattr(block, router_name)
    for owner in (router, block):
        for name in names:
            if hasattr(owner, name):
                return getattr(owner, name)
    raise AttributeError(f"{type(block).__name__} and its router have none of {', '.join(names)}")


def _spec(model_type: str, block_class: str, **fields) -> BlockSpec:
    return BlockSpec(model_type=model_type, modeling_module=f"transformers.models.{model_type}.modeling_{model_type}",
                     block_class=block_class, **fields)


# DeepSeek-V3's router (and GLM-4-MoE's, the same code): sigmoid scores, group-limited top-k with the correction
# bias for selection, renormalised where norm_topk_prob, times routed_scaling_factor.
_GROUP_LIMITED: Dict[str, Any] = dict(
    rule="sigmoid_group_topk", selection_bias="e_score_correction_bias",
    rule_attributes=(("n_group", "num_group"), ("topk_group", "topk_group"),
                     ("routed_scaling_factor", "routed_scaling_factor")))

# transformers 4's per-expert MLPs: gate_proj / up_proj / down_proj, returning (hidden_states, router_logits).
_PER_EXPERT: Dict[str, Any] = dict(per_expert=PerExpertGLULayout(), per_expert_returns_logits=True)

# In the order they were taken on; every one is tested for exactness (tests/test_hf_convert.py, and the
# per-expert layouts under transformers 4 in tests/test_hf_transformers4.py).
SPECS: Dict[str, BlockSpec] = {spec.model_type: spec for spec in (
    _spec("qwen3_moe", "Qwen3MoeSparseMoeBlock", normalize_topk="norm_topk_prob", **_PER_EXPERT),
    _spec("mixtral", "MixtralSparseMoeBlock", normalize_topk=True, jitter_attr="jitter_noise",
          per_expert=PerExpertGLULayout(gate="w1", up="w3", down="w2"), per_expert_returns_logits=True),
    _spec("olmoe", "OlmoeSparseMoeBlock", normalize_topk="norm_topk_prob", **_PER_EXPERT),
    _spec("qwen2_moe", "Qwen2MoeSparseMoeBlock", normalize_topk="norm_topk_prob",
          shared_expert="shared_expert", shared_expert_gate="shared_expert_gate", **_PER_EXPERT),
    # Layers below first_k_dense_replace hold a dense MLP, not this block: they stay as they are.
    _spec("deepseek_v3", "DeepseekV3MoE", normalize_topk="norm_topk_prob", shared_expert="shared_experts",
          per_expert=PerExpertGLULayout(), **_GROUP_LIMITED),
    _spec("glm4_moe", "Glm4MoeMoE", normalize_topk="norm_topk_prob", shared_expert="shared_experts",
          per_expert=PerExpertGLULayout(), **_GROUP_LIMITED),
    _spec("gpt_oss", "GptOssMLP", router="router", normalize_topk=False, rule="topk_softmax", router_bias=True,
          expert_form="clamped_glu", returns_router_scores=True),
    # Granite-MoE: the block is `block_sparse_moe` (router GraniteMoeTopKRouter: top-k of the fp32 logits, softmax
    # over the k; no bias), its experts the "swiglu" layout. The decoder layer scales the block's output by
    # residual_multiplier, outside the block. It records no router logits in transformers 5.15 (no aux loss).
    _spec("granitemoe", "GraniteMoeMoE", router="router", normalize_topk=False, rule="topk_softmax"),
    # Granite-MoE-Shared: the same block; its dense `shared_mlp` is a submodule of the decoder layer, not of the
    # block (the layer adds it to the block's output), so it stays as it is.
    _spec("granitemoeshared", "GraniteMoeSharedMoE", router="router", normalize_topk=False, rule="topk_softmax"),
    # Phi-MoE: the router (a Linear subclass) routes by sparsemixer (two picks, sampled in training), margin
    # router_jitter_noise; the block and then the router jitter the input (input_jitter_noise, 0 by default).
    # In transformers 4 the router is a plain Linear `gate` and the block alone jitters.
    _spec("phimoe", "PhimoeSparseMoeBlock", router="router", normalize_topk=False, rule="sparsemixer",
          rule_attributes=(("sparsemixer_eps", "router_jitter_noise"),), jitter_attr="input_jitter_noise",
          jitter_draws=2, per_expert=PerExpertGLULayout(gate="w1", up="w3", down="w2"),
          per_expert_returns_logits=True, per_expert_overrides=(("router", "gate"), ("jitter_draws", 1))),
)}

SUPPORTED_MODEL_TYPES: Tuple[str, ...] = tuple(SPECS)
# The types transformers 4 has in a form this conversion reads (per-expert MLPs).
TRANSFORMERS4_MODEL_TYPES: Tuple[str, ...] = tuple(name for name, spec in SPECS.items() if spec.per_expert)


class UnsupportedModelError(ValueError):
    """The model's type has no conversion (yet)."""


def transformers_major() -> int:
    """The installed transformers' major version (imports transformers)."""
    import transformers

    return int(transformers.__version__.split(".")[0])


def spec_for(model_type: Optional[str]) -> BlockSpec:
    """The spec of `model_type`, or UnsupportedModelError naming the supported types (those of the installed
    transformers' major version)."""
    if model_type not in SPECS:
        raise UnsupportedModelError(
            f"ds_tutel.hf cannot convert model_type={model_type!r}: supported model types are "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (with transformers 4: {', '.join(TRANSFORMERS4_MODEL_TYPES)})")
    spec = SPECS[model_type]
    if spec.per_expert is None and transformers_major() < 5:
        raise UnsupportedModelError(
            f"ds_tutel.hf converts model_type={model_type!r} from transformers >= 5.15 only (its transformers 4 "
            f"block differs); with transformers 4 the supported types are {', '.join(TRANSFORMERS4_MODEL_TYPES)}")
    return spec
