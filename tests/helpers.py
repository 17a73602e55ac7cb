"""Shared builders for the layer tests: an expert FFN, paired DeepSpeed/ds_tutel layers with equal weights."""
from __future__ import annotations

import copy
from typing import Tuple

import torch
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import nn

import ds_tutel


def expert_ffn(model_dim: int, hidden_dim: int = 0) -> nn.Module:
    hidden_dim = hidden_dim or 2 * model_dim
    return nn.Sequential(nn.Linear(model_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, model_dim))


def paired_layers(model_dim: int, seed: int = 0, **kwargs) -> Tuple[nn.Module, nn.Module]:
    """(DeepSpeed's layer, ours) built from the same arguments, ours holding DeepSpeed's weights."""
    torch.manual_seed(seed)
    expert = expert_ffn(model_dim)
    reference = DeepSpeedMoE(model_dim, expert, **kwargs)
    ours = ds_tutel.MoE(model_dim, copy.deepcopy(expert), **kwargs)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def grads(module: nn.Module) -> dict:
    return {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}


def run_step(layer: nn.Module, x: torch.Tensor, seed: int = 1):
    """Forward + backward of a scalar loss that uses the output and l_aux; returns everything to compare."""
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    out, l_aux, counts = layer(x)
    loss = (out.float() * torch.linspace(-1, 1, out.shape[-1])).square().sum() + 0.1 * l_aux
    loss.backward()
    return out.detach(), l_aux.detach(), counts, x.grad.detach(), grads(layer)


EXPERT_PREFIX = "deepspeed_moe.experts.deepspeed_experts."


def local_expert_state(state: dict, first: int, count: int) -> dict:
    """A full layer's state (or grads) restricted to experts first .. first+count-1, renumbered from 0."""
    out = {}
    for name, value in state.items():
        if name.startswith(EXPERT_PREFIX):
            index, rest = name[len(EXPERT_PREFIX):].split(".", 1)
            if first <= int(index) < first + count:
                out[f"{EXPERT_PREFIX}{int(index) - first}.{rest}"] = value
        else:
            out[name] = value
    return out
