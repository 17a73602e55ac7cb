"""The training job's Hugging Face model (`--hf MODEL_TYPE`): a tiny transformers MoE language model built from its
config class (random weights, nothing downloaded), converted to ds_tutel layers, behind the interface the loop
uses for GPTMoE (cfg, moe_layers(), forward(idx_BT) -> (logits_BTV, l_aux)).

The data are the job's byte tokens (vocabulary 256). l_aux is the model's own load-balancing loss from its router
logits (transformers' `aux_loss`), which the job weights with `aux_loss_weight` as it does GPTMoE's. ep_size and
the conversion options come from the DeepSpeed JSON's "ds_tutel": {"hf": {...}} section (ds_tutel.hf.config);
--ep-size wins, and the default is every rank, as for GPTMoE.

Shape legend: B batch, T sequence, V vocab.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .model import check_parallel_layout

# Per model type (every type ds_tutel.hf converts): the transformers config fields of a tiny model (2 layers,
# hidden 64, 4 experts, top-2) whose steps take milliseconds on a CPU; --model KEY=VALUE overrides any of them (or
# any other config field).
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)
HF_PRESETS: Dict[str, Dict[str, Any]] = {
    "qwen3_moe": dict(COMMON, num_experts=4, moe_intermediate_size=64, norm_topk_prob=True, head_dim=16),
    "mixtral": dict(COMMON, num_local_experts=4),
    "olmoe": dict(COMMON, num_experts=4),
    "qwen2_moe": dict(COMMON, num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=64),
    # 2 groups of 2 experts, the best group; the first layer dense. DeepSeek-V3's latent attention, tiny.
    "deepseek_v3": dict(COMMON, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=64, n_group=2,
                        topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16),
    "glm4_moe": dict(COMMON, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=64, n_group=2,
                     topk_group=1, first_k_dense_replace=1),
    "gpt_oss": dict(COMMON, num_local_experts=4, head_dim=16),
    "granitemoe": dict(COMMON, num_local_experts=4),
    "granitemoeshared": dict(COMMON, num_local_experts=4, shared_intermediate_size=64),
    "phimoe": dict(COMMON, num_local_experts=4),
}
JOB_FIELDS = ("seq_len", "ep_size")  # --model keys that belong to the job, not to the HF config


@dataclass
class HFJobConfig:
    """What a checkpoint of the HF job must agree on but ep_size: model type, HF config fields, sequence length,
    conversion options."""

    model_type: str
    seq_len: int = 128
    ep_size: Optional[int] = None
    fields: Dict[str, Any] = field(default_factory=dict)    # HF config fields over the preset
    options: Dict[str, Any] = field(default_factory=dict)   # ds_tutel.hf.convert options

    def __post_init__(self) -> None:
        if self.model_type not in HF_PRESETS:
            raise ValueError(f"--hf: no tiny preset for model type {self.model_type!r}; available: "
                             f"{sorted(HF_PRESETS)}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"model config: seq_len must be a positive int, got {self.seq_len!r}")

    def hf_config(self) -> Any:
        """The transformers config (imports transformers)."""
        import transformers
        values = {**HF_PRESETS[self.model_type], "max_position_embeddings": self.seq_len, **self.fields}
        try:
            return transformers.AutoConfig.for_model(self.model_type, **values)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--hf {self.model_type}: bad model config {self.fields}: {e}") from None

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config().vocab_size)

    @property
    def num_experts(self) -> int:
        config = self.hf_config()
        for name in ("num_experts", "num_local_experts", "n_routed_experts"):
            if getattr(config, name, None):
                return int(getattr(config, name))
        raise ValueError(f"--hf {self.model_type}: the config names no expert count")

    def resolved(self, world_size: int) -> "HFJobConfig":
        """ep_size fixed for a job of `world_size` ranks, checked to divide evenly."""
        ep_size = world_size if self.ep_size is None else self.ep_size
        check_parallel_layout(self.num_experts, ep_size, world_size)
        return dataclasses.replace(self, ep_size=ep_size)

    def to_dict(self) -> Dict[str, Any]:
        """The checkpoint manifest's "model" (num_experts and vocab_size derived, for the checks and resharding)."""
        return {"hf_model_type": self.model_type, "seq_len": self.seq_len, "ep_size": self.ep_size,
                "fields": dict(self.fields), "options": dict(self.options), "num_experts": self.num_experts,
                "vocab_size": self.vocab_size}

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "HFJobConfig":
        """The inverse of to_dict."""
        return cls(model_type=values["hf_model_type"], seq_len=values["seq_len"], ep_size=values["ep_size"],
                   fields=dict(values["fields"]), options=dict(values["options"]))


def is_hf_job(model: Dict[str, Any]) -> bool:
    """Whether a checkpoint manifest's "model" is this job's HF model (HFJobConfig.to_dict)."""
    return "hf_model_type" in model and "fields" in model


def job_config(model_type: str, overrides: Dict[str, Any], ds_config: Dict[str, Any]) -> HFJobConfig:
    """The job's HF config from --hf, the --model KEY=VALUE overrides and the JSON's "ds_tutel"."hf" section
    (checked before any rank starts DeepSpeed)."""
    from ..hf.config import hf_options
    ep_size, options = hf_options(ds_config)
    job = {k: overrides[k] for k in JOB_FIELDS if k in overrides}
    job.setdefault("ep_size", ep_size)
    fields = {k: v for k, v in overrides.items() if k not in JOB_FIELDS}
    return HFJobConfig(model_type=model_type, fields=fields, options=options, **job)


class HFLanguageModel(nn.Module):
    """A converted transformers causal LM with GPTMoE's interface. The HF model is `self.hf`, so the engine's
    parameter names are the converted model's prefixed by `hf.` (ds_tutel.hf.export_state_dict(model.hf) gives
    the HF layout)."""

    def __init__(self, cfg: HFJobConfig, seed: int) -> None:
        super().__init__()
        import transformers

        from ..hf import convert
        if cfg.ep_size is None:
            raise ValueError("resolve ep_size first: HFJobConfig.resolved(world_size)")
        transformers.logging.set_verbosity_error()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # every rank builds the same weights; each keeps its experts
            hf_model = transformers.AutoModelForCausalLM.from_config(cfg.hf_config())
        self.hf = convert(hf_model, ep_size=cfg.ep_size, **cfg.options)
        self.cfg = cfg

    def moe_layers(self) -> List[nn.Module]:
        from ..hf import converted_blocks
        return [block.moe for _, block in converted_blocks(self.hf)]

    def forward(self, idx_BT: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits_BTV, the model's load-balancing loss; 0 in eval mode, and for models without one:
        DeepSeek-V3 and GLM-4-MoE balance through their correction bias, Granite-MoE records no router logits)."""
        if idx_BT.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence length {idx_BT.shape[1]} exceeds the model's seq_len {self.cfg.seq_len}")
        out = self.hf(input_ids=idx_BT, output_router_logits=self.training, use_cache=False)
        aux = getattr(out, "aux_loss", None) if self.training else None
        if not isinstance(aux, torch.Tensor):
            aux = out.logits.new_zeros(())
        return out.logits, aux.float()
