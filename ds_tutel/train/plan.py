"""Dry run: build one rank's model on PyTorch's meta device and report parameter counts and a memory plan.

Nothing is allocated (meta tensors have shapes, no storage), so the 1.1e12-parameter preset is checked on a
laptop. The plan counts model states under ZeRO stage 2 with Adam: every rank holds its weights (dense and its
own experts) in the training dtype; gradients and the fp32 master weights plus Adam's two moments are
partitioned, the dense ones over all ranks, the expert ones over the ranks that hold copies of the same experts
(world_size / ep_size). Activations and communication buffers depend on the batch and are not included.
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from .model import GPTMoE, ModelConfig

GIB = 1024 ** 3


def _is_expert(param: torch.nn.Parameter) -> bool:
    return getattr(param, "allreduce", True) is False


def memory_plan(cfg: ModelConfig, world_size: int, precision: str = "bf16") -> Dict[str, Any]:
    """Parameter counts of the whole model and per-rank bytes of model states, from a meta-device build."""
    cfg = cfg.resolved(world_size)
    with torch.device("meta"):
        model = GPTMoE(cfg)
    dense = sum(p.numel() for p in model.parameters() if not _is_expert(p))
    local_expert = sum(p.numel() for p in model.parameters() if _is_expert(p))
    assert all(p.is_meta for p in model.parameters())
    total = dense + local_expert * cfg.ep_size
    weight_bytes = 2 if precision == "bf16" else 4
    expert_replicas = world_size // cfg.ep_size
    per_rank = {
        "weights": weight_bytes * (dense + local_expert),
        "gradients": weight_bytes * (dense / world_size + local_expert / expert_replicas),
        "fp32_master_and_adam": 12 * (dense / world_size + local_expert / expert_replicas),
    }
    per_rank["total"] = sum(per_rank.values())
    return {
        "model": cfg.to_dict(),
        "world_size": world_size,
        "precision": precision,
        "parameters": {"total": total, "dense": dense, "experts": local_expert * cfg.ep_size,
                       "per_rank": dense + local_expert, "experts_per_rank": local_expert},
        "per_rank_gib": {k: float(f"{v / GIB:.3g}") for k, v in per_rank.items()},
        "note": "model states under ZeRO-2 + Adam; activations and buffers excluded",
    }


def format_plan(plan: Dict[str, Any]) -> str:
    """A few human-readable lines of a memory_plan() result."""
    p, m = plan["parameters"], plan["per_rank_gib"]
    cfg = plan["model"]
    return "\n".join([
        f"model: {cfg['n_layers']} layers, d_model {cfg['d_model']} ({cfg['n_heads']} heads of "
        f"{cfg['d_model'] // cfg['n_heads']}), FFN {cfg['ffn_mult']}x, MoE ({cfg['num_experts']} experts, top-{cfg['k']}) "
        f"in 1 of every {cfg['moe_every']} blocks, ep_size {cfg['ep_size']}, world size {plan['world_size']}",
        f"parameters: total {p['total']:.4g} (experts {p['experts']:.4g}, dense {p['dense']:.4g}); "
        f"per rank {p['per_rank']:.4g}",
        f"per-rank memory ({plan['precision']}, {plan['note']}): weights {m['weights']} GiB, gradients "
        f"{m['gradients']} GiB, fp32 master + Adam {m['fp32_master_and_adam']} GiB, total {m['total']} GiB",
    ])
