"""Named model sizes. "tiny" trains in minutes on 2 CPU cores; "gpt-moe-1.1t" is the seed's cluster model.

gpt-moe-1.1t: 32 blocks, 32 heads of 128 (d_model 4096), FFN 4x (16384), MoE in every second block (16 MoE
layers), 512 experts with one expert per GPU on 512 GPUs (ep_size 512, top-1). Its experts hold
16 * 512 * (2 * 4096 * 16384 + 16384 + 4096) = 1.0996e12 parameters, the dense part 4.4e9.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from .model import ModelConfig

PRESETS: Dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=256, seq_len=128, d_model=128, n_layers=4, n_heads=4, ffn_mult=4, moe_every=2,
                        num_experts=4, ep_size=None, k=1, capacity_factor=1.25, eval_capacity_factor=2.0,
                        min_capacity=4),
    "small": ModelConfig(vocab_size=256, seq_len=256, d_model=512, n_layers=8, n_heads=8, ffn_mult=4, moe_every=2,
                         num_experts=16, ep_size=None, k=2, capacity_factor=1.25, eval_capacity_factor=2.0,
                         min_capacity=4),
    "gpt-moe-1.1t": ModelConfig(vocab_size=256, seq_len=2048, d_model=4096, n_layers=32, n_heads=32, ffn_mult=4,
                                moe_every=2, num_experts=512, ep_size=512, k=1, capacity_factor=1.0,
                                eval_capacity_factor=1.0, min_capacity=4),
}

# World size the presets were shaped for (used by the dry run when no --world-size is given).
PRESET_WORLD_SIZE = {"tiny": 2, "small": 8, "gpt-moe-1.1t": 512}


def get_preset(name: str, overrides: Optional[Dict[str, Any]] = None) -> ModelConfig:
    """The named preset with `overrides` (ModelConfig field -> value) applied; unknown names are an error."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    values = dataclasses.asdict(PRESETS[name])
    values.update(overrides or {})
    return ModelConfig.from_dict(values)
