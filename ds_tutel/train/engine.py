"""From the repository's DeepSpeed JSON config and a model to a DeepSpeed engine (ZeRO, precision, MoE groups).

The config file is DeepSpeed's own, plus one section ("ds_tutel_train") that DeepSpeed ignores and the
training job reads. `"bf16": {"enabled": "auto"}` is resolved here, at run time, to bf16 where the hardware
has it (a GPU that reports bf16, or a CPU with native bf16 instructions) and fp32 elsewhere.
"""
from __future__ import annotations

import copy
import datetime
import json
import logging
import os
from typing import Any, Dict, List, Optional

import torch
from torch import nn

SECTION = "ds_tutel_train"
PRECISIONS = ("auto", "bf16", "fp32")


class ConfigError(ValueError):
    """A config that cannot run (missing file, invalid JSON, bad values); the message says what to change."""


def load_config(path: str) -> Dict[str, Any]:
    """The JSON config at `path` as a dict, with a clear error when it is missing or not JSON."""
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config not found: {path}")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"DeepSpeed config {path} must be a JSON object")
    return config


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def hardware_has_bf16() -> bool:
    """bf16 on a GPU that supports it, or on a CPU with native bf16 arithmetic (AVX512-BF16 or AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    from deepspeed.accelerator import get_accelerator
    if not get_accelerator().is_bf16_supported():
        return False
    flags = _cpu_flags()
    if flags:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(requested: str) -> str:
    """"auto" -> "bf16" or "fp32" for this machine; explicit choices pass through (bf16 checked)."""
    if requested not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested == "auto":
        return "bf16" if hardware_has_bf16() else "fp32"
    return requested


def deepspeed_dict(config: Dict[str, Any], precision: str, total_steps: int) -> Dict[str, Any]:
    """DeepSpeed's part of the config for this run: our section removed, bf16 decided, schedule length set."""
    ds = copy.deepcopy({k: v for k, v in config.items() if k != SECTION})
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds.pop("fp16", None)
    scheduler = ds.get("scheduler", {})
    if scheduler.get("type") == "WarmupDecayLR":
        scheduler.setdefault("params", {})["total_num_steps"] = total_steps
    zero = ds.get("zero_optimization", {})
    if zero.get("stage", 0) not in (0, 1, 2):
        raise ConfigError("zero_optimization.stage must be 0, 1 or 2 for MoE training (DeepSpeed's MoE does not "
                          "support ZeRO-3)")
    return ds


def param_groups(model: nn.Module, weight_decay: Optional[float] = None) -> List[Dict[str, Any]]:
    """AdamW groups (matrices decay, vectors do not), then split so experts get their own MoE groups.

    The expert groups carry `moe=True` and the expert group name; DeepSpeed reduces their gradients over the
    expert-data-parallel ranks and partitions their optimizer state there.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    decay_group: Dict[str, Any] = {"name": "decay", "params": decay}
    if weight_decay is not None:
        decay_group["weight_decay"] = weight_decay
    groups = [decay_group, {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def init_distributed(timeout_s: float) -> None:
    """Starts DeepSpeed's communication (gloo on CPU, the accelerator's backend elsewhere) unless it is up.

    The timeout bounds every collective, so a rank whose peer died fails instead of waiting forever.
    """
    import deepspeed
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:  # a plain `python -m ds_tutel.train`: a world of one
        from ..ranks import free_port
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    from deepspeed.accelerator import get_accelerator
    backend = "gloo" if get_accelerator().device_name() == "cpu" else None
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s), verbose=False)


def quiet_deepspeed() -> None:
    """DeepSpeed logs every step of its set-up at INFO; keep warnings and errors only."""
    from deepspeed.utils import logger
    logger.setLevel(logging.WARNING)


def build_engine(model: nn.Module, ds_config: Dict[str, Any]):
    """deepspeed.initialize with the MoE parameter groups; returns the engine."""
    import deepspeed
    groups = param_groups(model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    return engine


def set_cpu_threads() -> None:
    """Shares the CPU cores among the local ranks (unless OMP_NUM_THREADS says otherwise)."""
    if "OMP_NUM_THREADS" in os.environ or torch.cuda.is_available():
        return
    local = max(1, int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
