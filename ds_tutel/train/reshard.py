"""Expert checkpoint resharding: a checkpoint written at one world size / ep_size, rewritten for another.

What changes with the layout, and how each part is converted:
  - expert weights: DeepSpeed names the per-expert files and keys by global expert id, so they do not depend on
    the layout; they are loaded by the new ranks like any other weight (stacked experts, ds_tutel.stacked_experts,
    show per-expert entries in their state dict, so their files are the same);
  - ZeRO optimizer shards (fp32 master weights, Adam's exp_avg and exp_avg_sq, step): joined into one tensor per
    parameter by global name (optimizer_state.read_full_states), installed into a DeepSpeed engine built at the
    new layout (optimizer_state.install_full_states), and saved by DeepSpeed;
  - LR scheduler state, step counters and the learning rate of the optimizer groups are copied.
The new ranks run as local CPU processes (gloo), so the whole model must fit in this machine's memory. The
source is only read; the destination must not exist. Supported: ZeRO stage 1 and 2 checkpoints of the training
job (GPT-MoE or --hf) from ds_tutel.train.checkpoint.save (the manifest gives the source layout). Checkpoints of
ds_tutel.hf.save_checkpoint are refused here, as their parameter groups are the caller's, which the new engines
could not rebuild: ds_tutel.hf.load_checkpoint reshards them at load time, into the caller's engine, with the
same two functions.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional

import torch

from . import checkpoint
from .checkpoint import CheckpointError
from .hf_model import is_hf_job
from .model import ModelConfig, check_parallel_layout
from .optimizer_state import install_full_states, read_engine_counters, read_full_states


def _rebuild_rank(rank: int, world_size: int, job: Dict[str, Any]) -> List[str]:
    """One rank of the new layout: build the engine, install the full states, save with DeepSpeed."""
    from .engine import build_engine, quiet_deepspeed
    from .model import GPTMoE
    quiet_deepspeed()
    if is_hf_job(job["model"]):
        from .hf_model import HFJobConfig, HFLanguageModel
        cfg = HFJobConfig.from_dict(job["model"])
        model = HFLanguageModel(cfg, seed=0)
    else:
        cfg = ModelConfig.from_dict(job["model"])
        model = GPTMoE(cfg, ep_rank=rank % cfg.ep_size)
    engine = build_engine(model, job["ds_config"])
    states = torch.load(job["states_path"], map_location="cpu", weights_only=True, mmap=True)
    used = install_full_states(engine, states, rank % cfg.ep_size, cfg.num_experts // cfg.ep_size)
    checkpoint.save(engine, job["dst_dir"], job["tag"], job["meta"])
    return used


def reshard(src_dir: str, dst_dir: str, world_size: int, ep_size: Optional[int] = None, tag: Optional[str] = None,
            timeout: float = 1800.0) -> Dict[str, Any]:
    """Writes `tag` (default: the latest) of `src_dir` into the new directory `dst_dir` for `world_size` ranks."""
    from ..ranks import run_local_ranks
    if os.path.exists(dst_dir):
        raise CheckpointError(f"destination {dst_dir} already exists; refusing to overwrite it")
    if not os.path.isdir(src_dir):
        raise CheckpointError(f"source checkpoint directory {src_dir} does not exist")
    tag = tag or checkpoint.read_latest(src_dir)
    if tag is None:
        raise CheckpointError(f"no checkpoint in {src_dir} (no `latest` file); pass --tag")
    manifest = checkpoint.verify(src_dir, tag)
    if "hf_config" in manifest.get("model", {}):
        raise CheckpointError(f"{src_dir} holds a converted HF model saved by ds_tutel.hf.save_checkpoint, whose "
                              f"parameter groups are the caller's: load it at the new layout with "
                              f"ds_tutel.hf.load_checkpoint(engine, dir), which reshards it into the caller's engine")
    ep_size = world_size if ep_size is None else ep_size
    if world_size < 1 or ep_size < 1:
        raise ValueError("world size and ep_size must be positive")
    model = {**manifest["model"], "ep_size": ep_size}
    check_parallel_layout(model["num_experts"], ep_size, world_size)

    src_tag_dir = os.path.join(src_dir, tag)
    states = {**read_full_states(src_tag_dir, manifest), **read_engine_counters(src_tag_dir, manifest)}

    ds_config = dict(manifest["ds_config"])
    if "train_micro_batch_size_per_gpu" in ds_config:
        ds_config.pop("train_batch_size", None)  # derived again from the new world size
    meta = {k: v for k, v in manifest.items() if k not in ("format", "tag", "files")}
    meta.update(model=model, world_size=world_size, ds_config=ds_config,
                resharded_from={"world_size": manifest["world_size"], "ep_size": manifest["model"]["ep_size"],
                                "tag": tag})

    parent = os.path.dirname(os.path.abspath(dst_dir))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".reshard-", dir=parent)
    try:
        states_path = os.path.join(work, "states.pt")
        torch.save(states, states_path)
        job = {"model": model, "ds_config": ds_config, "states_path": states_path, "meta": meta,
               "dst_dir": os.path.join(work, "out"), "tag": tag}
        used = run_local_ranks(_rebuild_rank, world_size, job, timeout=timeout)
        missing = sorted(set(states["params"]) - {name for names in used for name in names})
        if missing:
            raise CheckpointError(f"the new layout has no parameter for checkpoint entries {missing[:5]}")
        if os.path.exists(dst_dir):
            raise CheckpointError(f"destination {dst_dir} appeared during the conversion; refusing to overwrite it")
        os.rename(job["dst_dir"], dst_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"src": src_dir, "dst": dst_dir, "tag": tag, "step": meta["step"],
            "from": {"world_size": manifest["world_size"], "ep_size": manifest["model"]["ep_size"]},
            "to": {"world_size": world_size, "ep_size": ep_size}, "parameters": len(states["params"])}
