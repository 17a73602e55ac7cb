"""Checkpoints of converted Hugging Face models trained through the DeepSpeed engine.

`save_checkpoint(engine, dir)` writes DeepSpeed's own checkpoint (per-expert model files named by global expert id,
the rest of the model, one ZeRO optimizer shard per rank) through ds_tutel.train.checkpoint.save: into
`.partial-<tag>/`, renamed to `<tag>/` once every rank has written, `latest` replaced last, so an interrupted
save leaves the previous checkpoint and `latest` as they were. The manifest records the layout (world size,
ep_size), precision, the HF model config and the DeepSpeed config.

`load_checkpoint(engine, dir)` checks the manifest (files complete, same model) and loads:
  - at the layout it was saved with: everything (weights, ZeRO optimizer state, LR scheduler, step counters), so
    a resumed run takes the steps an uninterrupted one takes;
  - at another world size or ep_size, with `module_only=True`: the weights, from DeepSpeed's per-expert files
    (each rank reads the global experts its place owns); the optimizer starts from them afresh.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from torch import nn

from ..train import checkpoint as train_checkpoint
from ..train.checkpoint import CheckpointError


def model_meta(model: nn.Module) -> Dict[str, Any]:
    """What a checkpoint of a converted model must agree on (and ep_size, which may differ): the HF config,
    model type, experts per block."""
    from .convert import converted_blocks

    blocks = converted_blocks(model)
    if not blocks:
        raise ValueError("this model has no converted MoE blocks: call ds_tutel.hf.convert first")
    moe = blocks[0][1].moe
    config = json.loads(model.config.to_json_string(use_diff=False))
    return {"hf_model_type": model.config.model_type, "hf_config": config, "num_experts": moe.num_experts,
            "ep_size": moe.ep_size}


# HF config entries that do not change the model's parameters (how it was loaded, run or labelled).
NON_STRUCTURAL = frozenset({"architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path",
                            "use_cache", "output_router_logits", "output_attentions", "output_hidden_states",
                            "return_dict", "router_aux_loss_coef", "id2label", "label2id"})


def check_same_model(saved: Dict[str, Any], ours: Dict[str, Any], where: str) -> None:
    """Raises CheckpointError naming the HF config entries (model_meta's) in which the checkpoint's model differs."""
    if "hf_config" not in saved:
        raise CheckpointError(f"{where} is not a checkpoint of a converted HF model")
    a, b = saved["hf_config"], ours["hf_config"]
    differing = sorted(k for k in (set(a) | set(b)) - NON_STRUCTURAL if a.get(k) != b.get(k))
    if saved["hf_model_type"] != ours["hf_model_type"] or differing:
        details = ", ".join(f"{k}: checkpoint {a.get(k)!r} vs model {b.get(k)!r}" for k in differing[:5])
        raise CheckpointError(f"checkpoint {where} holds a different model ({saved['hf_model_type']} vs "
                              f"{ours['hf_model_type']}; {details})")


def _precision(engine: Any) -> str:
    return "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"


def _ds_config(engine: Any) -> Any:
    config = engine.config
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            return json.load(f)
    return config if isinstance(config, dict) else None


def save_checkpoint(engine: Any, save_dir: str, tag: Optional[str] = None,
                    client_state: Optional[Dict[str, Any]] = None) -> str:
    """Collective: every rank writes its part; returns the checkpoint's path. tag defaults to
    global_step<engine.global_steps>; client_state (JSON-able) is kept in the manifest."""
    import torch.distributed as dist

    step = engine.global_steps
    meta = {"step": step, "world_size": dist.get_world_size(), "precision": _precision(engine),
            "model": model_meta(engine.module), "ds_config": _ds_config(engine), "client": client_state or {}}
    return train_checkpoint.save(engine, save_dir, tag or train_checkpoint.tag_for_step(step), meta)


def load_checkpoint(engine: Any, load_dir: str, tag: Optional[str] = None, *,
                    module_only: bool = False) -> Dict[str, Any]:
    """Collective: loads `tag` (default: the one `latest` names) into the engine; returns its manifest (the
    caller's client_state under "client").

    A checkpoint saved at another world size or ep_size loads with module_only=True (weights only; the
    optimizer and LR scheduler keep their fresh state); without it, CheckpointError says so. module_only=True
    at the same layout also loads the weights only."""
    import torch.distributed as dist

    tag = tag or train_checkpoint.read_latest(load_dir)
    if tag is None:
        raise CheckpointError(f"no checkpoint in {load_dir} (no `latest` file)")
    manifest = train_checkpoint.verify(load_dir, tag)
    saved, ours = dict(manifest.get("model", {})), model_meta(engine.module)
    check_same_model(saved, ours, os.path.join(load_dir, tag))
    same_layout = manifest["world_size"] == dist.get_world_size() and saved["ep_size"] == ours["ep_size"]
    if manifest.get("precision") != _precision(engine):
        raise CheckpointError(f"checkpoint {os.path.join(load_dir, tag)} was written in {manifest.get('precision')}"
                              f"; this engine runs {_precision(engine)}")
    if not module_only and not same_layout:
        raise CheckpointError(
            f"checkpoint {os.path.join(load_dir, tag)} was written with world size {manifest['world_size']} "
            f"and ep_size {saved['ep_size']}; this engine has world size {dist.get_world_size()} and ep_size "
            f"{ours['ep_size']}: pass module_only=True to load the weights (the optimizer starts afresh)")
    train_checkpoint.load(engine, load_dir, tag, manifest, module_only=module_only)
    return manifest
