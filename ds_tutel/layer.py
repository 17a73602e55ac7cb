"""`ds_tutel.MoE`: a drop-in for `deepspeed.moe.layer.MoE` that routes sparsely.

The class subclasses DeepSpeed's MoE (the engine finds MoE layers by isinstance) and keeps its constructor,
return value, attribute names and parameter names; only the computation inside `deepspeed_moe` is ours.

Shape legend: S tokens, M model dim, E experts, W expert-parallel ranks, L local experts (E = W * L), C capacity.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any, Callable, Optional, Tuple

import deepspeed.moe.layer as ds_layer
import torch
import torch.nn.functional as F
from deepspeed.utils import groups
from torch import nn

from . import strategies
from .dispatch.rows import kept_counts
from .experts import Experts, local_experts, mark_expert_params
from .kernels import resolve_dispatch_backend
from .options import (ConfigSource, RouterOptions, auto_threshold, check_backend, check_capacity_factor,
                      check_constructor, check_exchange, check_forward_input, check_k, check_parallel_setup,
                      moe_kwargs)
from .parallel.alltoall import agree_max
from .parallel.exchange import exchange_counts, exchange_counts_once
from .routing.gate import Gate
from .routing.types import Routing
from .stats import RoutingStats, routing_stats


class MOELayer(nn.Module):
    """route -> dispatch -> (exchange ->) experts (-> exchange) -> combine, in DeepSpeed's module layout.

    The stages between routing and the output are one named strategy (strategies.py), chosen per call from the
    options and the device's dispatch backend.
    """

    def __init__(self, gate: Gate, experts: Experts, ep_group_name: str, ep_size: int, num_local_experts: int,
                 a2a_algorithm: str = "flat", a2a_ffn_overlap_degree: int = 1, dispatch_backend: str = "auto",
                 a2a_auto_threshold: Optional[int] = None, a2a_send: str = "kept") -> None:
        super().__init__()
        self.exchange = strategies.ExchangeOptions(algorithm=a2a_algorithm, overlap_degree=a2a_ffn_overlap_degree,
                                                   auto_threshold=a2a_auto_threshold, send=a2a_send)
        self.dispatch_backend = dispatch_backend
        self.gate = gate
        self.experts = experts
        self.ep_group = None
        self.ep_group_name = ep_group_name
        self.ep_size = ep_size
        self.num_local_experts = num_local_experts
        self.l_aux: Optional[torch.Tensor] = None
        self.exp_counts: Optional[torch.Tensor] = None
        self.last_routing: Optional[Routing] = None
        # Read by DeepSpeed's engine when it prints its wall-clock breakdown.
        self.wall_clock_breakdown = False
        self.time_falltoall = self.time_salltoall = self.time_moe = 0.0

    def __deepcopy__(self, memo: dict) -> "MOELayer":
        """A copy shares the expert-parallel process group (a process group cannot be copied) and keeps the expert
        parameters' DeepSpeed marks (torch's deepcopy of a Parameter drops its attributes); all else is copied as
        nn.Module copies it."""
        if self.ep_group is not None:
            memo[id(self.ep_group)] = self.ep_group
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for name, value in self.__dict__.items():
            copied.__dict__[name] = copy.deepcopy(value, memo)
        mark_expert_params(copied.experts, copied.ep_group_name)
        return copied

    def _set_ep_group(self, ep_group) -> None:
        if self.ep_group is not None and ep_group is not self.ep_group:
            raise RuntimeError(f"MoE layer already has an expert-parallel group ({self.ep_group_name})")
        self.ep_group = ep_group

    def _agree_capacity(self, device: torch.device):
        if self.ep_size == 1:
            return None
        return lambda capacity: agree_max(capacity, self.ep_group, device)

    def _exchange_counts(self, routing: Routing, backend: str):
        """(filled_WL, capacity_W, sent_E): the kept counts every rank sends this rank's experts, every rank's
        capacity, and (device plan only, else None) this rank's kept counts, read in the same transfer."""
        options = dict(algorithm=self.exchange.algorithm, auto_threshold=self.exchange.auto_threshold)
        if backend == "torch":
            return (*exchange_counts(routing.kept_per_expert(), routing.capacity, self.ep_group,
                                     self.num_local_experts, **options), None)
        return exchange_counts_once(kept_counts(routing), routing.capacity, self.ep_group, self.num_local_experts,
                                    **options)

    def _backend_and_strategy(self, device: torch.device) -> Tuple[str, str]:
        backend = resolve_dispatch_backend(self.dispatch_backend, device)
        return backend, strategies.choose(self.ep_size, self.exchange)

    def strategy(self, device: torch.device) -> str:
        """The forward strategy for tokens on `device` (strategies.py)."""
        return self._backend_and_strategy(device)[1]

    def forward(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None, *,
                capacity_factor: Optional[float] = None, k: Optional[int] = None,
                on_logits: Optional[Callable[[torch.Tensor], object]] = None) -> torch.Tensor:
        # Drop the previous step's loss and routing before this step allocates anything: the loss holds that
        # step's autograd graph, and with it a leaf input and its gradient, which can sit at the top of the heap
        # and keep glibc from returning the memory zero_grad has freed below them.
        self.l_aux = self.last_routing = None
        M = hidden_states.shape[-1]
        x_SM = hidden_states.reshape(-1, M)
        used_S = None if used_token is None else used_token.reshape(-1)
        backend, strategy = self._backend_and_strategy(x_SM.device)
        strategies.warn_ineffective(strategy, self.ep_size, self.exchange)

        def route(agree, on_logits=None):  # the dispatch gathers from the tokens the router passes on
            return self.gate.route_tokens(x_SM, used_S, agree, capacity_factor=capacity_factor, k=k,
                                          tutel_router=strategies.tutel_router(backend), on_logits=on_logits)

        # With expert parallelism every rank must route with one capacity. Where it follows from the token count
        # alone, each rank routes with its own and the capacities ride along with the kept counts' exchange:
        # only when they differ (unequal token counts) does every rank route again with the largest. Dropless
        # routing keeps every choice at any capacity from its own largest count up: each rank routes with its own,
        # and the largest one is taken afterwards. Otherwise (dynamic capacity) the capacity is agreed by an
        # all-reduce before routing.
        keeps_all = self.ep_size > 1 and self.gate.keeps_every_token(capacity_factor)
        speculative = keeps_all or (self.ep_size > 1 and self.gate.capacity_from_token_count(capacity_factor))
        # on_logits sees the first routing's logits only (routing again computes the same ones).
        routing, self.l_aux, tokens_SM = route(None if speculative else self._agree_capacity(x_SM.device),
                                               on_logits)
        filled_WL = sent_E = None
        if self.ep_size > 1:
            filled_WL, capacity_W, sent_E = self._exchange_counts(routing, backend)
            if speculative and len(set(capacity_W)) > 1:
                agreed = max(capacity_W)
                if keeps_all:  # the same slots at the larger capacity
                    routing = dataclasses.replace(routing, capacity=agreed)
                else:
                    routing, self.l_aux, tokens_SM = route(lambda capacity: agreed)
                    filled_WL, _, sent_E = self._exchange_counts(routing, backend)
        self.exp_counts = routing.counts_E.detach()
        self.last_routing = routing.detached()

        y_SM = strategies.run(strategy, tokens_SM, routing, self.experts, backend=backend, group=self.ep_group,
                              num_local_experts=self.num_local_experts, exchange=self.exchange, filled_WL=filled_WL,
                              sent_E=sent_E)
        return y_SM.reshape(hidden_states.shape)


class MoE(ds_layer.MoE):
    """Drop-in for `deepspeed.moe.layer.MoE` (same arguments, returns, parameter names and engine behaviour).

    Positional arguments are DeepSpeed's; `use_tutel` is accepted for compatibility and ignored (this layer is
    the Tutel-style implementation). `expert` is copied once per local expert, as DeepSpeed does; a
    ds_tutel.stacked_experts.GLUExpert is instead stacked (one parameter per weight for all local experts, the
    same per-expert state-dict entries). Keyword-only arguments add Tutel's features; their defaults keep
    DeepSpeed's behaviour:
      capacity_mode, batch_prioritized_routing, normalize_gate, gate_noise, input_dropout, input_jitter,
        aux_loss, z_loss_coef, expert_bias, expert_bias_rate: routing features (see ds_tutel.options).
      routing_rule, n_group, topk_group, routed_scaling_factor, router_bias, sparsemixer_eps:
        (capacity_mode="tutel") how logits become choices and gates, for models that route otherwise than
        softmax-then-top-k (DeepSeek-V3's group-limited sigmoid rule, GPT-OSS's top-k-then-softmax with a router
        bias, Phi-MoE's sparsemixer; ds_tutel.routing.rules).
      a2a_algorithm: "flat" | "2dh" | "auto", the all-to-all over the expert-parallel group.
      a2a_ffn_overlap_degree: split the dispatched buffer into this many capacity chunks so that the
        all-to-all of one chunk overlaps the experts of another.
      a2a_auto_threshold: with a2a_algorithm="auto", 2dh for messages up to this many bytes per rank (default:
        $DS_TUTEL_A2A_AUTO_THRESHOLD, else 0 = always flat; measure it with benchmarks/bench_alltoall.py).
      a2a_send: "kept" (default): with a flat all-to-all in one piece (auto at threshold 0 is flat), on every
        device and dispatch backend, send each expert exactly its kept rows (all-to-alls sized by the routing);
        "capacity": always send whole capacity buffers [E, C, M], as DeepSpeed does (fixed message sizes). Where
        "kept" cannot apply, the layer warns once and sends capacity buffers.
      dispatch_backend: "auto" (Triton kernels for tensors on a GPU, torch on the CPU) | "triton" | "torch".
    """

    def __init__(self,
                 hidden_size: int,
                 expert: nn.Module,
                 num_experts: int = 1,
                 ep_size: int = 1,
                 k: int = 1,
                 capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0,
                 min_capacity: int = 4,
                 use_residual: bool = False,
                 noisy_gate_policy: Optional[str] = None,
                 drop_tokens: bool = True,
                 use_rts: bool = True,
                 use_tutel: bool = False,
                 enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True,
                 *,
                 capacity_mode: str = "deepspeed",
                 batch_prioritized_routing: bool = False,
                 normalize_gate: bool = True,
                 gate_noise: float = 0.0,
                 input_dropout: float = 0.0,
                 input_jitter: float = 0.0,
                 aux_loss: str = "gshard",
                 z_loss_coef: float = 0.0,
                 expert_bias: bool = False,
                 expert_bias_rate: float = 1e-3,
                 routing_rule: str = "softmax_topk",
                 n_group: int = 1,
                 topk_group: int = 1,
                 routed_scaling_factor: float = 1.0,
                 router_bias: bool = False,
                 sparsemixer_eps: float = 0.01,
                 a2a_algorithm: str = "flat",
                 a2a_ffn_overlap_degree: int = 1,
                 a2a_auto_threshold: Optional[int] = None,
                 a2a_send: str = "kept",
                 dispatch_backend: str = "auto") -> None:
        options = RouterOptions(capacity_mode=capacity_mode, batch_prioritized_routing=batch_prioritized_routing,
                                normalize_gate=normalize_gate, gate_noise=gate_noise, input_dropout=input_dropout,
                                input_jitter=input_jitter, aux_loss=aux_loss, z_loss_coef=z_loss_coef,
                                expert_bias=expert_bias, expert_bias_rate=expert_bias_rate,
                                routing_rule=routing_rule, n_group=n_group, topk_group=topk_group,
                                routed_scaling_factor=routed_scaling_factor, router_bias=router_bias,
                                sparsemixer_eps=sparsemixer_eps)
        check_constructor(hidden_size=hidden_size, expert=expert, num_experts=num_experts, ep_size=ep_size, k=k,
                          capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                          min_capacity=min_capacity, noisy_gate_policy=noisy_gate_policy, capacity_mode=capacity_mode)
        check_exchange(a2a_algorithm, a2a_ffn_overlap_degree, a2a_send)
        auto_threshold(a2a_auto_threshold)
        check_backend(dispatch_backend)
        # DeepSpeed's own __init__ would build its layer only for us to replace it: initialise nn.Module directly.
        nn.Module.__init__(self)
        self.hidden_size = hidden_size
        self.use_residual = use_residual
        self.enable_expert_tensor_parallelism = enable_expert_tensor_parallelism
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        self.k = k

        gate = Gate(hidden_size, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                    noisy_gate_policy, drop_tokens, use_rts, top2_2nd_expert_sampling, options)
        experts = local_experts(expert, self.num_local_experts, self.expert_group_name)
        self.deepspeed_moe = MOELayer(gate, experts, self.expert_group_name, ep_size, self.num_local_experts,
                                      a2a_algorithm=a2a_algorithm, a2a_ffn_overlap_degree=a2a_ffn_overlap_degree,
                                      dispatch_backend=dispatch_backend, a2a_auto_threshold=a2a_auto_threshold,
                                      a2a_send=a2a_send)
        if use_residual:
            self.mlp = expert
            self.coefficient = nn.Linear(hidden_size, 2)

    @classmethod
    def from_config(cls, config: ConfigSource, hidden_size: int, expert: nn.Module, **overrides: Any) -> "MoE":
        """Builds the layer from the "ds_tutel" section of a DeepSpeed config (dict or JSON path).

        Explicit keyword arguments win over the config, so code can fix what must not change.
        """
        return cls(hidden_size, expert, **moe_kwargs(config, inspect.signature(cls.__init__), **overrides))

    def routing_stats(self) -> Optional[RoutingStats]:
        """Statistics of the last forward's routing (None before the first forward)."""
        routing = self.deepspeed_moe.last_routing
        return None if routing is None else routing_stats(routing)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Creates (or reuses) DeepSpeed's expert-parallel groups for this layer's ep_size."""
        check_parallel_setup(self.ep_size, groups.mpu, self.enable_expert_tensor_parallelism)
        super().set_deepspeed_parallelism(use_data_before_expert_parallel_)

    def forward(self,
                hidden_states: torch.Tensor,
                used_token: Optional[torch.Tensor] = None,
                *,
                capacity_factor: Optional[float] = None,
                k: Optional[int] = None,
                on_logits: Optional[Callable[[torch.Tensor], object]] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output shaped like hidden_states, l_aux, exp_counts) as DeepSpeed's layer does.

        capacity_factor and k switch capacity and top-k for this call only, without rebuilding anything.
        on_logits, where given, is called once with this call's fp32 router logits [S, E] (with autograd), e.g. to
        record them for a model's own auxiliary loss without computing them again.
        """
        check_forward_input(hidden_states, self.hidden_size, used_token)
        if k is not None:
            check_k(k, self.num_experts)
        if capacity_factor is not None:
            check_capacity_factor("capacity_factor", capacity_factor, self.deepspeed_moe.gate.options.capacity_mode)
        if self.ep_size > 1 and self.deepspeed_moe.ep_group is None:
            raise RuntimeError(
                f"MoE layer with ep_size={self.ep_size} has no expert-parallel group: pass the model to "
                "deepspeed.initialize(...) or call layer.set_deepspeed_parallelism() after "
                "deepspeed.init_distributed()")
        output = self.deepspeed_moe(hidden_states, used_token, capacity_factor=capacity_factor, k=k,
                                    on_logits=on_logits)
        if self.use_residual:
            output_mlp = self.mlp(hidden_states)
            if isinstance(output_mlp, tuple):
                output_mlp = output_mlp[0]
            coef = F.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + output_mlp * coef[..., 1:]
        return output, self.deepspeed_moe.l_aux, self.deepspeed_moe.exp_counts
