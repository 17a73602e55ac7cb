"""Checks of user input, run before any collective so that bad input fails loudly instead of hanging."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .options import A2A_ALGORITHMS, A2A_SENDS, DISPATCH_BACKENDS


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_constructor(*, hidden_size: Any, expert: Any, num_experts: Any, ep_size: Any, k: Any,
                      capacity_factor: Any, eval_capacity_factor: Any, min_capacity: Any,
                      noisy_gate_policy: Any, allowed_policies: Sequence[Optional[str]],
                      capacity_mode: str = "deepspeed") -> None:
    """Validates the constructor arguments shared with DeepSpeed's MoE."""
    _positive_int("hidden_size", hidden_size)
    _positive_int("num_experts", num_experts)
    _positive_int("ep_size", ep_size)
    if not isinstance(expert, nn.Module):
        raise TypeError(f"expert must be a torch.nn.Module, got {type(expert).__name__}")
    if num_experts % ep_size != 0:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by ep_size ({ep_size})")
    check_k(k, num_experts)
    for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
        check_capacity_factor(name, value, capacity_mode)
    if isinstance(min_capacity, bool) or not isinstance(min_capacity, int) or min_capacity < 0:
        raise ValueError(f"min_capacity must be an int >= 0, got {min_capacity!r}")
    if noisy_gate_policy not in allowed_policies:
        raise ValueError(f"noisy_gate_policy must be one of {list(allowed_policies)}, got {noisy_gate_policy!r}")


def check_capacity_factor(name: str, value: Any, capacity_mode: str) -> None:
    """Any number in Tutel's capacity mode (negative = bounded, 0 = dropless); >= 0 in DeepSpeed's."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if capacity_mode == "deepspeed" and value < 0:
        raise ValueError(f"{name} must be >= 0 with capacity_mode='deepspeed' (negative values are Tutel's "
                         f"bounded capacity: pass capacity_mode='tutel'), got {value!r}")


def check_k(k: Any, num_experts: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"k must be an int in [1, num_experts={num_experts}], got {k!r}")


def check_exchange(a2a_algorithm: Any, overlap_degree: Any, a2a_send: Any = "kept") -> None:
    if a2a_send not in A2A_SENDS:
        raise ValueError(f"a2a_send must be one of {A2A_SENDS}, got {a2a_send!r}")
    if a2a_algorithm not in A2A_ALGORITHMS:
        raise ValueError(f"a2a_algorithm must be one of {A2A_ALGORITHMS}, got {a2a_algorithm!r}")
    if isinstance(overlap_degree, bool) or not isinstance(overlap_degree, int) or overlap_degree < 1:
        raise ValueError(f"a2a_ffn_overlap_degree must be an int >= 1, got {overlap_degree!r}")


def check_backend(dispatch_backend: Any) -> None:
    if dispatch_backend not in DISPATCH_BACKENDS:
        raise ValueError(f"dispatch_backend must be one of {DISPATCH_BACKENDS}, got {dispatch_backend!r}")


def check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_parallel_setup(ep_size: int, mpu: Any, expert_tensor_parallel: bool) -> None:
    """ep_size must divide the world; tensor-parallel models are not supported yet."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised: call deepspeed.init_distributed() first")
    world_size = dist.get_world_size()
    if world_size % ep_size != 0:
        raise ValueError(f"ep_size ({ep_size}) must divide the world size ({world_size})")
    if mpu is not None and mpu.get_tensor_model_parallel_world_size() > 1:
        raise NotImplementedError("ds_tutel.MoE does not support tensor-parallel models (mpu with tensor-parallel "
                                  "size > 1) yet; use deepspeed.moe.layer.MoE for them")


def check_forward_input(hidden_states: Any, hidden_size: int, used_token: Optional[Any]) -> None:
    """hidden_states must be a floating tensor [..., hidden_size]; used_token one value per token."""
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    if not hidden_states.is_floating_point():
        raise TypeError(f"hidden_states must be floating point, got {hidden_states.dtype}")
    if hidden_states.dim() < 1 or hidden_states.shape[-1] != hidden_size:
        raise ValueError(f"hidden_states must have last dimension hidden_size={hidden_size}, "
                         f"got shape {tuple(hidden_states.shape)}")
    if used_token is not None:
        num_tokens = hidden_states.numel() // hidden_size
        if not isinstance(used_token, torch.Tensor) or used_token.numel() != num_tokens:
            raise ValueError(f"used_token must be a tensor with one value per token ({num_tokens})")
