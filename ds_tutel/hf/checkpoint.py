"""Checkpoints of converted Hugging Face models trained through the DeepSpeed engine.

`save_checkpoint(engine, dir)` writes DeepSpeed's own checkpoint (per-expert model files named by global expert id,
the rest of the model, one ZeRO optimizer shard per rank) through ds_tutel.train.checkpoint.save: into
`.partial-<tag>/`, renamed to `<tag>/` once every rank has written, `latest` replaced last, so an interrupted
save leaves the previous checkpoint and `latest` as they were. The manifest records the layout (world size,
ep_size), precision, the HF model config and the DeepSpeed config.

`load_checkpoint(engine, dir)` checks the manifest (files complete, same model) and loads everything (weights,
optimizer state, LR scheduler, step counters), so a resumed run takes the steps an uninterrupted one takes:
  - at the layout it was saved with, through DeepSpeed's own loader;
  - at another world size or ep_size (ZeRO stage 1 or 2 on both sides), the weights from DeepSpeed's per-expert
    files (each rank reads the global experts its place owns), then the optimizer state resharded at load time:
    every rank reads all the source's ZeRO shards, joins them into full per-parameter states
    (ds_tutel.train.reshard.read_full_states) and installs its share into the engine (install_full_states).
With `module_only=True` it loads the weights alone, at any layout; the optimizer starts from them afresh.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

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

    A checkpoint saved at another world size or ep_size loads in full too (ZeRO stage 1 or 2 checkpoints into a
    ZeRO stage 1 or 2 engine): every rank reads every source shard, so the whole model's optimizer state must fit
    in each rank's memory. Each optimizer group takes the learning rate its parameters were saved with. Other
    checkpoints raise CheckpointError, on every rank before any collective, naming module_only=True, which loads
    the weights only (the optimizer and LR scheduler keep their fresh state) at any layout."""
    import torch.distributed as dist

    tag = tag or train_checkpoint.read_latest(load_dir)
    if tag is None:
        raise CheckpointError(f"no checkpoint in {load_dir} (no `latest` file)")
    manifest = train_checkpoint.verify(load_dir, tag)
    where = os.path.join(load_dir, tag)
    saved, ours = dict(manifest.get("model", {})), model_meta(engine.module)
    check_same_model(saved, ours, where)
    same_layout = manifest["world_size"] == dist.get_world_size() and saved["ep_size"] == ours["ep_size"]
    if manifest.get("precision") != _precision(engine):
        raise CheckpointError(f"checkpoint {where} was written in {manifest.get('precision')}; this engine runs "
                              f"{_precision(engine)}")
    if module_only or same_layout:
        train_checkpoint.load(engine, load_dir, tag, manifest, module_only=module_only)
        return manifest
    layout = (f"checkpoint {where} was written with world size {manifest['world_size']} and ep_size "
              f"{saved['ep_size']}; this engine has world size {dist.get_world_size()} and ep_size {ours['ep_size']}")
    states = _read_states(engine, where, manifest, layout)
    train_checkpoint.load(engine, load_dir, tag, manifest, module_only=True)
    _install_states(engine, states, where, saved["num_experts"] // ours["ep_size"])
    return manifest


def _saved_zero_stage(manifest: Dict[str, Any]) -> Optional[int]:
    """The ZeRO stage the checkpoint was written under, from its DeepSpeed config (None if not recorded)."""
    ds_config = manifest.get("ds_config")
    if not isinstance(ds_config, dict):
        return None
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


def _read_states(engine: Any, tag_dir: str, manifest: Dict[str, Any], layout: str) -> Dict[str, Any]:
    """Every source shard's optimizer state joined by global name, with the LR scheduler and step counters. Each
    rank reads the same files and decides alike, before any collective, whether they can be resharded."""
    from ..train.optimizer_state import read_engine_counters, read_full_states
    hint = "pass module_only=True to load the weights only (the optimizer starts afresh)"
    saved_stage, our_stage = _saved_zero_stage(manifest), engine.zero_optimization_stage()
    if saved_stage not in (None, 1, 2):
        raise CheckpointError(f"{layout}: its optimizer state, saved under ZeRO stage {saved_stage}, loads only at "
                              f"that layout (resharding takes ZeRO stage 1 or 2); {hint}")
    if our_stage not in (1, 2):
        raise CheckpointError(f"{layout}: this engine runs ZeRO stage {our_stage}, and resharded optimizer state "
                              f"loads into ZeRO stage 1 or 2 only; {hint}")
    try:
        return {**read_full_states(tag_dir, manifest, one_lr=False), **read_engine_counters(tag_dir, manifest)}
    except CheckpointError as e:
        raise CheckpointError(f"{layout}, and its optimizer state cannot be resharded: {e}; {hint}") from e


def _install_states(engine: Any, states: Dict[str, Any], where: str, num_local: int) -> None:
    """Collective: each rank installs its share of `states`; all raise alike if a rank failed or a checkpoint entry
    found no parameter on any rank."""
    import torch.distributed as dist

    from ..train.optimizer_state import install_full_states
    from .convert import converted_blocks, expert_parallel_rank
    error, used = None, []
    try:
        ep_rank = expert_parallel_rank(converted_blocks(engine.module)[0][1].moe)
        used = install_full_states(engine, states, ep_rank, num_local)
    except Exception as e:  # reported to every rank below, so that none is left waiting in a later collective
        error = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"
    results: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(results, (error, used))
    errors = [f"rank {rank}: {message}" for rank, (message, _) in enumerate(results) if message]
    if errors:
        raise CheckpointError(f"could not install the optimizer state of {where} at this layout: "
                              + "; ".join(errors[:3]))
    unused = sorted(set(states["params"]) - {name for _, names in results for name in names})
    if unused:
        raise CheckpointError(f"checkpoint {where} has optimizer state for {len(unused)} entries no parameter of this "
                              f"model took, e.g. {unused[:3]}")
