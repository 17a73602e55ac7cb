"""Full per-parameter ZeRO optimizer state: read from every rank's shard of a checkpoint, and installed into an
engine at any layout. The offline resharding (reshard.py) and ds_tutel.hf.load_checkpoint at another layout share
it.

  - read_full_states: each source shard's fp32 master weights and Adam's exp_avg / exp_avg_sq, through the
    parameter slice map DeepSpeed stores in it, joined into one tensor per parameter by global name (expert
    parameters renamed from local to global ids; a stacked expert parameter, ds_tutel.stacked_experts, split into
    its experts' parts);
  - read_engine_counters: the LR scheduler state and step counters kept beside the shards;
  - install_full_states: this rank's share of them put into a ZeRO stage 1 or 2 engine, which partitions them its
    own way (deepspeed.utils.safe_set_full_*).

Shape legend: P parameter elements (flattened).
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from typing import Any, Dict, List, Tuple

import torch

from .checkpoint import CheckpointError

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
