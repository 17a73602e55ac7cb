"""Expert checkpoint resharding: a checkpoint written at one world size / ep_size, rewritten for another.

What changes with the layout, and how each part is converted:
  - expert weights: DeepSpeed names the per-expert files and keys by global expert id, so they do not depend on
    the layout; they are loaded by the new ranks like any other weight (stacked experts, ds_tutel.stacked_experts,
    show per-expert entries in their state dict, so their files are the same);
  - ZeRO optimizer shards (fp32 master weights, Adam's exp_avg and exp_avg_sq, step): read from every source
    shard through the parameter slice map DeepSpeed stores in it, joined into one tensor per parameter (expert
    parameters renamed from local to global ids; read_full_states), then installed into a DeepSpeed engine built
    at the new layout, which partitions them its own way (install_full_states, through
    deepspeed.utils.safe_set_full_*), and saved by DeepSpeed; a stacked expert parameter's state is split into its
    experts' parts on reading and stacked again for the new ranks;
  - LR scheduler state, step counters and the learning rate of the optimizer groups are copied.
The new ranks run as local CPU processes (gloo), so the whole model must fit in this machine's memory. The
source is only read; the destination must not exist. Supported: ZeRO stage 1 and 2 checkpoints of the training
job (GPT-MoE or --hf) from ds_tutel.train.checkpoint.save (the manifest gives the source layout). Checkpoints of
ds_tutel.hf.save_checkpoint are refused here, as their parameter groups are the caller's, which the new engines
could not rebuild: ds_tutel.hf.load_checkpoint reshards them at load time, into the caller's engine, with the
same two functions.

Shape legend: P parameter elements (flattened).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import checkpoint
from .checkpoint import CheckpointError
from .hf_model import is_hf_job
from .model import ModelConfig, check_parallel_layout

EXPERT_NAME = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..+)$")
ZERO_SHARD = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
OPTIM_KEYS = ("exp_avg", "exp_avg_sq")


def global_name(name: str, ep_rank: int, num_local: int) -> str:
    """Local expert j on expert-parallel rank r is global expert r * num_local + j; other names are unchanged."""
    m = EXPERT_NAME.match(name)
    if m is None:
        return name
    return f"{m.group(1)}{ep_rank * num_local + int(m.group(2))}{m.group(3)}"


def expert_names(name: str, ep_rank: int, num_local: int) -> List[str]:
    """The global per-expert names an expert parameter's elements hold, in order: itself renumbered for one
    expert's parameter (`...deepspeed_experts.<j>.<name>`), or for a stacked parameter of the local experts
    (`...experts.<name>`, ds_tutel.stacked_experts: [num_local, ...]) the per-expert names its state dict shows,
    `...experts.deepspeed_experts.<g>.<name>` for each of its global experts g."""
    if EXPERT_NAME.match(name):
        return [global_name(name, ep_rank, num_local)]
    head, dot, tail = name.rpartition(".experts.")
    if not dot:
        raise CheckpointError(f"expert parameter {name} is neither one expert's nor the local experts' stacked one")
    return [f"{head}.experts.deepspeed_experts.{ep_rank * num_local + j}.{tail}" for j in range(num_local)]


def _zero_shards(tag_dir: str, manifest: Dict[str, Any]) -> List[str]:
    shards: Dict[int, str] = {}
    for rel in manifest["files"]:
        m = ZERO_SHARD.match(rel)
        if m:
            shards[int(m.group(2))] = os.path.join(tag_dir, rel)
    world = manifest["world_size"]
    if sorted(shards) != list(range(world)):
        raise CheckpointError(f"{tag_dir}: expected ZeRO optimizer shards for ranks 0..{world - 1}, found "
                              f"{sorted(shards)} (only ZeRO stage 1/2 checkpoints can be resharded)")
    return [shards[r] for r in range(world)]


def read_full_states(tag_dir: str, manifest: Dict[str, Any], one_lr: bool = True) -> Dict[str, Any]:
    """Per-parameter optimizer state, by global name: {"params": {name: {"fp32", "exp_avg", "exp_avg_sq"}},
    "lrs": {name: its group's lr}, "step": ..., "lr": ...}; every tensor 1-D (P).

    The groups must agree on the step; with one_lr (the training job's groups) on the lr too, which "lr" gives.
    Without it (a caller's groups, e.g. one without weight decay at its own lr) "lr" is None when they differ."""
    model = manifest["model"]
    ep_size = model["ep_size"]
    num_local = model["num_experts"] // ep_size
    # (name, ep rank) -> [(partition index, {key: fragment_P})]
    fragments: Dict[Tuple[str, int], List[Tuple[int, Dict[str, torch.Tensor]]]] = defaultdict(list)
    moe_params = set()
    group_lr: Dict[str, float] = {}
    steps, lrs = set(), set()
    step_value: Any = None
    for rank, path in enumerate(_zero_shards(tag_dir, manifest)):
        try:
            shard = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        except Exception as e:
            raise CheckpointError(f"cannot read ZeRO shard {path}: {type(e).__name__}: {e}") from e
        if "param_slice_mappings" not in shard or "single_partition_of_fp32_groups" not in shard:
            raise CheckpointError(f"{path} is not a ZeRO stage 1 or 2 optimizer shard (only those can be resharded)")
        base = shard["base_optimizer_state"]
        for g, group in enumerate(base["param_groups"]):
            moe = bool(group.get("moe", False))
            ep_rank, partition = (rank % ep_size, rank // ep_size) if moe else (0, rank)
            fp32_P = shard["single_partition_of_fp32_groups"][g]
            state = base["state"].get(g, {})
            if any(key not in state for key in OPTIM_KEYS):
                raise CheckpointError(f"{path}: optimizer group {g} has no {' and '.join(OPTIM_KEYS)} (only Adam's "
                                      f"state, after at least one step, can be resharded)")
            step = state.get("step", group.get("step"))
            steps.add(float(step) if step is not None else None)
            step_value = step
            lrs.add(group["lr"])
            for name, address in shard["param_slice_mappings"][g].items():
                piece = {"fp32": fp32_P.narrow(0, address.start, address.numel)}
                for key in OPTIM_KEYS:
                    piece[key] = state[key].narrow(0, address.start, address.numel)
                fragments[(name, ep_rank)].append((partition, piece))
                group_lr[name] = group["lr"]
                if moe:
                    moe_params.add(name)
    if len(steps) != 1 or (one_lr and len(lrs) != 1):
        raise CheckpointError(f"{tag_dir}: optimizer groups disagree on step {sorted(map(str, steps))} or lr {lrs}")
    params, params_lr = {}, {}
    for (name, ep_rank), pieces in fragments.items():
        pieces.sort(key=lambda item: item[0])
        full = {key: torch.cat([piece[key] for _, piece in pieces]) for key in ("fp32",) + OPTIM_KEYS}
        if name not in moe_params:
            params[name] = {key: value.clone() for key, value in full.items()}
            params_lr[name] = group_lr[name]
            continue
        names = expert_names(name, ep_rank, num_local)  # a stacked parameter splits into equal expert parts
        for j, global_expert_name in enumerate(names):
            params[global_expert_name] = {key: value.chunk(len(names))[j].clone() for key, value in full.items()}
            params_lr[global_expert_name] = group_lr[name]
    return {"params": params, "lrs": params_lr, "step": step_value, "lr": lrs.pop() if len(lrs) == 1 else None}


def read_engine_counters(tag_dir: str, manifest: Dict[str, Any]) -> Dict[str, Any]:
    """What the engine keeps outside the optimizer shards: {"lr_scheduler": its state dict or None,
    "global_steps", "global_samples"}, from the checkpoint's mp_rank_00_model_states.pt and manifest."""
    path = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    try:
        dense = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    return {"lr_scheduler": dense.get("lr_scheduler"), "global_steps": manifest["step"],
            "global_samples": dense.get("global_samples", 0)}


def install_full_states(engine: Any, states: Dict[str, Any], ep_rank: int, num_local: int) -> List[str]:
    """Installs read_full_states' states, with read_engine_counters' entries where present, into a ZeRO stage 1
    or 2 engine at any layout: each parameter's fp32 master weights (and the model's weights from them), Adam's
    exp_avg and exp_avg_sq and step, each optimizer group's lr as saved for its parameters (a group whose
    parameters were saved at several lrs keeps its own), the LR scheduler's state and the step counters.

    This rank holds local experts ep_rank * num_local ... of every MoE layer. Local, no collective; returns the
    checkpoint names this rank used (a caller checks that the ranks together used them all)."""
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if not hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        raise CheckpointError(f"the engine's optimizer ({type(engine.optimizer).__name__}) cannot take resharded "
                              f"optimizer state: that needs ZeRO stage 1 or 2")
    trainable = [(name, param) for name, param in engine.module.named_parameters() if param.requires_grad]
    names_of = {id(param): expert_names(name, ep_rank, num_local) if is_moe_param(param) else [name]
                for name, param in trainable}
    # torch's Adam creates its state at the first step and DeepSpeed links each parameter's view of it then;
    # create the state now (values are overwritten below) and link it the same way. An engine that has stepped
    # keeps its (linked) tensors.
    inner = engine.optimizer.optimizer
    # The model's parameters of each optimizer group: ZeRO 1/2's bit16_groups, the bf16 optimizer's bf16_groups.
    model_groups = getattr(engine.optimizer, "bit16_groups", None) or getattr(engine.optimizer, "bf16_groups")
    for group, params in zip(inner.param_groups, model_groups):
        saved_lrs = {states["lrs"][n] for p in params for n in names_of.get(id(p), []) if n in states["lrs"]}
        if len(saved_lrs) == 1:
            group["lr"] = saved_lrs.pop()
        for flat in group["params"]:
            state = inner.state[flat]
            state["step"] = states["step"].clone() if torch.is_tensor(states["step"]) else states["step"]
            for key in OPTIM_KEYS:
                state.setdefault(key, torch.zeros_like(flat))
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    used = []
    for name, param in trainable:
        names = names_of[id(param)]
        missing = [n for n in names if n not in states["params"]]
        if missing:
            raise CheckpointError(f"the checkpoint has no state for parameter {missing[0]}")
        full = {key: torch.cat([states["params"][n][key] for n in names]) for key in ("fp32",) + OPTIM_KEYS}
        if full["fp32"].numel() != param.numel():
            raise CheckpointError(f"parameter {name}: checkpoint has {full['fp32'].numel()} elements, the model "
                                  f"{param.numel()}")
        with torch.no_grad():
            param.data.copy_(full["fp32"].view(param.shape).to(param.dtype))
        safe_set_full_fp32_param(param, full["fp32"].view(param.shape))
        for key in OPTIM_KEYS:
            safe_set_full_optimizer_state(param, full[key].view(param.shape), key)
        used.extend(names)
    if engine.lr_scheduler is not None and states.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(states["lr_scheduler"])
    if "global_steps" in states:
        engine.global_steps = states["global_steps"]
        engine.global_samples = states["global_samples"]
    return used


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
