"""Validation loss and greedy samples that do not depend on the world size or on the training RNG.

Validation runs the same fixed groups of windows through the model whatever the layout: group g (windows
g*b .. g*b+b-1) goes to rank g % W, and each group's forward is seeded by g alone (random token selection in an
overflowing expert draws from the seed), so the loss is a function of the weights; the training RNG is saved
and restored around it. Every forward is collective under expert parallelism, so ranks with no group left run
a zero-weight copy of group 0 to keep in step.

Shape legend: N validation windows, B windows per forward, T sequence, V vocab.
"""
from __future__ import annotations

from typing import Any, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import mix_seed
from .model import greedy_generate


def _world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def validation_loss(engine: Any, x_NT: torch.Tensor, y_NT: torch.Tensor, batch: int, seed: int) -> float:
    """Mean next-byte cross-entropy over all windows (nats per byte), identical on every rank."""
    rank, world = _world()
    N = x_NT.shape[0]
    if N % batch:
        raise ValueError(f"eval_windows ({N}) must be a multiple of eval_batch ({batch})")
    groups = N // batch
    rounds = -(-groups // world)
    total = torch.zeros(2, dtype=torch.float64)
    was_training = engine.module.training
    engine.module.eval()
    with torch.random.fork_rng(devices=[]):
        for r in range(rounds):
            g = r * world + rank
            weight = 1.0 if g < groups else 0.0
            g = g if g < groups else 0
            torch.manual_seed(mix_seed(seed, "validation", g))
            x_BT, y_BT = x_NT[g * batch:(g + 1) * batch], y_NT[g * batch:(g + 1) * batch]
            logits_BTV, _ = engine(x_BT)
            loss = F.cross_entropy(logits_BTV.float().reshape(-1, logits_BTV.shape[-1]), y_BT.reshape(-1),
                                   reduction="sum")
            total += torch.tensor([weight * float(loss), weight * y_BT.numel()], dtype=torch.float64)
    engine.module.train(was_training)
    if world > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1])


@torch.no_grad()
def sample_text(engine: Any, prompt_T: torch.Tensor, new_tokens: int, seq_len: int, seed: int) -> torch.Tensor:
    """Greedy continuation of a prompt; every rank must call it (the MoE forwards are collective)."""
    was_training = engine.module.training
    engine.module.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed, "sample"))
        tokens_T = greedy_generate(engine.module, prompt_T, new_tokens, seq_len)
    engine.module.train(was_training)
    return tokens_T
