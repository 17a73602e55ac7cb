"""A GPT-style decoder whose every `moe_every`-th block has a `ds_tutel.MoE` feed-forward layer.

The shape follows the seed's MoE language model: pre-LayerNorm blocks of causal self-attention and a
feed-forward layer 4x the model dimension; in MoE blocks that feed-forward layer is a set of experts spread over
the expert-parallel ranks. Sizes come from `ModelConfig`, so the tiny default and the 1.1e12-parameter preset
are the same code (see presets.py).

Shape legend: B batch, T sequence, D model dim, H heads, A head dim (D = H * A), F feed-forward dim, V vocab,
S tokens (B * T).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layer import MoE


@dataclass
class ModelConfig:
    """Sizes and routing options of the language model; everything a checkpoint must agree on but ep_size."""

    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_mult: int = 4
    moe_every: int = 2
    num_experts: int = 4
    ep_size: Optional[int] = None  # None: every rank of the job (one expert group spans the world)
    k: int = 1
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "ffn_mult", "moe_every",
                     "num_experts", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model config: {name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model config: d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.ep_size is not None and (not isinstance(self.ep_size, int) or self.ep_size < 1):
            raise ValueError(f"model config: ep_size must be a positive int or null, got {self.ep_size!r}")
        if self.k > self.num_experts:
            raise ValueError(f"model config: k ({self.k}) must not exceed num_experts ({self.num_experts})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return self.ffn_mult * self.d_model

    def is_moe_block(self, index: int) -> bool:
        """Blocks moe_every-1, 2*moe_every-1, ... are MoE (every second block by default, as GShard/Switch)."""
        return index % self.moe_every == self.moe_every - 1

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_block(i) for i in range(self.n_layers))

    def resolved(self, world_size: int) -> "ModelConfig":
        """This config with ep_size fixed for a job of `world_size` ranks, checked to divide evenly."""
        ep_size = world_size if self.ep_size is None else self.ep_size
        check_parallel_layout(self.num_experts, ep_size, world_size)
        return dataclasses.replace(self, ep_size=ep_size)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"model config: unknown keys {unknown}; valid keys: {sorted(known)}")
        return cls(**values)


def check_parallel_layout(num_experts: int, ep_size: int, world_size: int) -> None:
    """Experts must split evenly over the expert-parallel ranks, and those groups must tile the world."""
    if num_experts % ep_size:
        raise ValueError(f"num_experts ({num_experts}) is not divisible by ep_size ({ep_size}): every "
                         f"expert-parallel rank must hold the same number of experts")
    if world_size % ep_size:
        raise ValueError(f"ep_size ({ep_size}) does not divide the world size ({world_size}): choose an ep_size "
                         f"that divides the number of ranks (e.g. --ep-size {math.gcd(num_experts, world_size)})")


class Attention(nn.Module):
    """Causal multi-head self-attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        qkv_BT3HA = self.qkv(x_BTD).view(B, T, 3, self.n_heads, D // self.n_heads)
        q_BHTA, k_BHTA, v_BHTA = qkv_BT3HA.permute(2, 0, 3, 1, 4)
        y_BHTA = F.scaled_dot_product_attention(q_BHTA, k_BHTA, v_BHTA, is_causal=True)
        return self.proj(y_BHTA.transpose(1, 2).reshape(B, T, D))


def feed_forward(d_model: int, ffn_dim: int) -> nn.Sequential:
    """The dense FFN, also the template each expert is copied from."""
    return nn.Sequential(nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, d_model))


class Block(nn.Module):
    """x + attn(ln(x)), then x + ffn(ln(x)) where ffn is dense or an MoE layer."""

    def __init__(self, cfg: ModelConfig, moe: bool) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln_ffn = nn.LayerNorm(cfg.d_model)
        self.is_moe = moe
        if moe:
            # Deterministic gate options: routing is then a function of weights and tokens (plus the per-step
            # seed for random token selection), which resume and reshard equality rely on.
            self.ffn = MoE(cfg.d_model, feed_forward(cfg.d_model, cfg.ffn_dim), num_experts=cfg.num_experts,
                           ep_size=cfg.ep_size, k=cfg.k, capacity_factor=cfg.capacity_factor,
                           eval_capacity_factor=cfg.eval_capacity_factor, min_capacity=cfg.min_capacity,
                           top2_2nd_expert_sampling=False)
        else:
            self.ffn = feed_forward(cfg.d_model, cfg.ffn_dim)

    def forward(self, x_BTD: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x_BTD = x_BTD + self.attn(self.ln_attn(x_BTD))
        if self.is_moe:
            y_BTD, l_aux, _ = self.ffn(self.ln_ffn(x_BTD))
            return x_BTD + y_BTD, l_aux
        return x_BTD + self.ffn(self.ln_ffn(x_BTD)), None


class GPTMoE(nn.Module):
    """Token + position embeddings, blocks, final LayerNorm, head tied to the token embedding."""

    def __init__(self, cfg: ModelConfig, ep_rank: int = 0, seed: int = 0) -> None:
        super().__init__()
        if cfg.ep_size is None:
            raise ValueError("resolve ep_size first: ModelConfig.resolved(world_size)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg, cfg.is_moe_block(i)) for i in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.d_model)
        if self.tok_emb.weight.device.type != "meta":
            initialize(self, ep_rank, seed)

    def moe_layers(self) -> List[MoE]:
        return [block.ffn for block in self.blocks if block.is_moe]

    def forward(self, idx_BT: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits_BTV, summed l_aux of the MoE layers)."""
        B, T = idx_BT.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's seq_len {self.cfg.seq_len}")
        pos_T = torch.arange(T, device=idx_BT.device)
        x_BTD = self.tok_emb(idx_BT) + self.pos_emb(pos_T)
        l_aux = x_BTD.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x_BTD, block_aux = block(x_BTD)
            if block_aux is not None:
                l_aux = l_aux + block_aux.float()
        x_BTD = self.ln_f(x_BTD)
        logits_BTV = F.linear(x_BTD, self.tok_emb.weight)
        return logits_BTV, l_aux


def _expert_generator(seed: int, moe_index: int, global_expert: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + (moe_index + 1) * 65_537 + global_expert)


def initialize(model: GPTMoE, ep_rank: int, seed: int) -> None:
    """GPT-2-style init (N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers)).

    Each expert is drawn from a generator keyed by its global id, so the model is the same function whatever the
    expert-parallel layout: rank r's local expert j of a layer is global expert r * L + j in every layout.
    """
    cfg = model.cfg
    dense_gen = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layers)

    def init_module(module: nn.Module, gen: torch.Generator) -> None:
        for name, sub in module.named_modules():
            if isinstance(sub, nn.Linear):
                std = residual_std if name.endswith(("proj", "2")) else 0.02
                with torch.no_grad():
                    sub.weight.copy_(torch.randn(sub.weight.shape, generator=gen) * std)
                    if sub.bias is not None:
                        sub.bias.zero_()
            elif isinstance(sub, nn.Embedding):
                with torch.no_grad():
                    sub.weight.copy_(torch.randn(sub.weight.shape, generator=gen) * 0.02)
            elif isinstance(sub, nn.LayerNorm):
                nn.init.ones_(sub.weight)
                nn.init.zeros_(sub.bias)

    for name, module in model.named_children():
        if name != "blocks":
            init_module(module, dense_gen)
    moe_index = 0
    for block in model.blocks:
        for name, module in block.named_children():
            if name != "ffn" or not block.is_moe:
                init_module(module, dense_gen)
                continue
            init_module(module.deepspeed_moe.gate, dense_gen)
            experts = module.deepspeed_moe.experts.deepspeed_experts
            for local, expert in enumerate(experts):
                init_module(expert, _expert_generator(seed, moe_index, ep_rank * len(experts) + local))
            moe_index += 1


def dropped_fraction(model: GPTMoE) -> torch.Tensor:
    """Per MoE layer, the fraction of this rank's (token, choice) pairs that the last forward dropped."""
    rows = [1.0 - layer.deepspeed_moe.last_routing.kept_SK.float().mean() for layer in model.moe_layers()]
    return torch.stack(rows) if rows else torch.zeros(0)


def expert_counts(model: GPTMoE) -> torch.Tensor:
    """int64 [num MoE layers, E]: choices that wanted each expert in the last forward (this rank's tokens)."""
    rows = [layer.deepspeed_moe.last_routing.counts_E for layer in model.moe_layers()]
    return torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.int64)


@torch.no_grad()
def greedy_generate(model: nn.Module, prompt_T: torch.Tensor, new_tokens: int, seq_len: int) -> torch.Tensor:
    """Appends `new_tokens` argmax tokens to a 1-D prompt; the context is cropped to the last seq_len tokens.

    With expert parallelism every rank must call this with the same arguments (each forward is collective).
    """
    tokens_T = prompt_T.clone()
    for _ in range(new_tokens):
        logits_BTV, _ = model(tokens_T[-seq_len:].unsqueeze(0))
        tokens_T = torch.cat([tokens_T, logits_BTV[0, -1].float().argmax().view(1)])
    return tokens_T
