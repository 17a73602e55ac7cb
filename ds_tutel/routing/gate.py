"""The router module and the routing entry point: `Gate` owns the router weight `wg` (DeepSpeed's name), computes
fp32 logits and hands them to DeepSpeed's semantics (deepspeed.py, the default) or Tutel's (tutel.py). With a
routing rule other than the default (options.routing_rule, rules.py) the rule makes the choices and gates and
Tutel's torch slot assignment places them, on every backend (a Triton gate computes only the default rule).

Shape legend: S tokens, M model dim, E experts, K choices per token, C capacity.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..options import RouterOptions, check_expert_groups
from . import losses, noise, rules
from .deepspeed import route_deepspeed
from .router_linear import router_linear, router_linear_passing
from .softmax import router_softmax
from .tutel import route_tutel
from .types import CapacityAgreement, Routing


def route(logits_SE: torch.Tensor,
          k: int = 1,
          capacity_factor: float = 1.0,
          capacity_mode: str = "deepspeed",
          batch_prioritized_routing: bool = False,
          normalize_gate: bool = True,
          min_capacity: int = 4,
          drop_tokens: bool = True,
          use_rts: bool = False,
          used_token_S: Optional[torch.Tensor] = None,
          selection_scores_SE: Optional[torch.Tensor] = None,
          agree_capacity: Optional[CapacityAgreement] = None,
          routing_rule: str = "softmax_topk",
          n_group: int = 1,
          topk_group: int = 1,
          routed_scaling_factor: float = 1.0,
          selection_bias_E: Optional[torch.Tensor] = None,
          sparsemixer_eps: float = 0.01,
          sample: bool = False) -> Routing:
    """The routing of one batch from gate logits [S, E]; the layer uses this same function.

    capacity_mode="deepspeed" follows DeepSpeed's gates (use_rts draws random numbers; drop_tokens=False is
    dropless); "tutel" follows Tutel's (capacity_factor > 0 fixed, 0 dropless, < 0 bounded; optional
    batch-prioritized routing and gate normalisation; selection_scores_SE may steer the choice). A routing rule
    other than the default (rules.py; with n_group, topk_group, routed_scaling_factor and a per-expert
    selection_bias_E) makes the choices and gates, which Tutel's slot assignment places (capacity_mode="tutel");
    "sparsemixer" reads sparsemixer_eps and samples its picks where `sample` (as in training).
    """
    logits_SE = logits_SE.float()
    # The layer's checks of these values (a rule needs capacity_mode="tutel"), and whether they name a rule.
    rule = RouterOptions(capacity_mode=capacity_mode, normalize_gate=normalize_gate, routing_rule=routing_rule,
                         n_group=n_group, topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
                         sparsemixer_eps=sparsemixer_eps)
    if rule.uses_rule or selection_bias_E is not None:
        if capacity_mode != "tutel":
            raise ValueError("a selection bias (selection_bias_E) needs capacity_mode='tutel'")
        if selection_scores_SE is not None:
            raise ValueError("selection_scores_SE steers the default rule only; pass selection_bias_E to a rule")
        check_expert_groups(logits_SE.shape[1], k, n_group, topk_group)
        return route_tutel(logits_SE, capacity_factor=capacity_factor, min_capacity=min_capacity,
                           batch_prioritized_routing=batch_prioritized_routing, used_token_S=used_token_S,
                           agree_capacity=agree_capacity,
                           choices=rules.choose(routing_rule, logits_SE, k, rules.RuleParams.of(rule, sample),
                                                selection_bias_E))
    if capacity_mode == "deepspeed":
        if batch_prioritized_routing or selection_scores_SE is not None:
            raise ValueError("batch_prioritized_routing and selection scores need capacity_mode='tutel'")
        routing, _ = route_deepspeed(logits_SE, k=k, capacity_factor=capacity_factor, min_capacity=min_capacity,
                                     drop_tokens=drop_tokens, use_rts=use_rts, used_token_S=used_token_S,
                                     agree_capacity=agree_capacity)
        return routing
    if capacity_mode == "tutel":
        return route_tutel(logits_SE, k=k, capacity_factor=capacity_factor, min_capacity=min_capacity,
                           batch_prioritized_routing=batch_prioritized_routing, normalize_gate=normalize_gate,
                           used_token_S=used_token_S, agree_capacity=agree_capacity,
                           selection_scores_SE=selection_scores_SE)
    raise ValueError(f"capacity_mode must be 'deepspeed' or 'tutel', got {capacity_mode!r}")


class Gate(nn.Module):
    """The router: owns `wg` (named as DeepSpeed's TopKGate names it) and turns tokens into a Routing.

    DeepSpeed's arguments come first; `options` adds Tutel's routing features (defaults change nothing).
    """

    def __init__(self, model_dim: int, num_experts: int, k: int = 1, capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0, min_capacity: int = 4, noisy_gate_policy: Optional[str] = None,
                 drop_tokens: bool = True, use_rts: bool = True, top2_2nd_expert_sampling: bool = True,
                 options: Optional[RouterOptions] = None) -> None:
        super().__init__()
        self.wg = nn.Linear(model_dim, num_experts, bias=False)
        self.num_experts = num_experts
        self.k = k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.noisy_gate_policy = noisy_gate_policy
        self.drop_tokens = drop_tokens
        self.use_rts = use_rts
        self.top2_2nd_expert_sampling = top2_2nd_expert_sampling
        self.options = RouterOptions()
        self.configure(options or self.options)
        self._register_load_state_dict_pre_hook(_renamed_selection_bias)

    def configure(self, options: RouterOptions) -> None:
        """Takes `options` as this gate's routing options, adding what they need: a bias of `wg` (router_bias, zero
        where new), the selection bias buffer `selection_bias` (zero where new). Neither is ever removed. Call it
        before the gate is handed to an optimizer or engine (a new bias is a new parameter).

        The buffer's name holds no "expert": DeepSpeed's engine takes every MoE state-dict key that does for an
        expert's, and fails to save a checkpoint on one that sits in no expert."""
        if options.routing_rule == "sigmoid_group_topk":
            check_expert_groups(self.num_experts, self.k, options.n_group, options.topk_group)
        if options.routing_rule == "sparsemixer" and self.k != 2:
            raise ValueError(f"routing_rule='sparsemixer' picks 2 experts per token, got k={self.k}")
        weight = self.wg.weight
        if options.router_bias and self.wg.bias is None:
            self.wg.bias = nn.Parameter(torch.zeros(self.num_experts, device=weight.device, dtype=weight.dtype))
        if options.has_selection_bias and not hasattr(self, "selection_bias"):
            self.register_buffer("selection_bias", torch.zeros(self.num_experts, device=weight.device))
        self.options = options


    def logits(self, x_SM: torch.Tensor) -> torch.Tensor:
        """fp32 router logits [S, E], whatever the model dtype or an enclosing autocast."""
        return self._logits_and_tokens(x_SM, pass_tokens=False)[0]

    def _logits_and_tokens(self, x_SM: torch.Tensor, pass_tokens: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits_SE, tokens_SM): with pass_tokens, and where the router sees the tokens themselves (no input
        noise), tokens_SM is x_SM passed on through the router's linear map (router_linear_passing); else x_SM."""
        opts = self.options
        with torch.autocast(device_type=x_SM.device.type, enabled=False):
            # Input noise works on an fp32 copy (.float() is free once the copy exists); without noise the tokens
            # go to router_linear as they are, which keeps no fp32 copy for the backward.
            router_in_SM = x_SM
            if self.training:
                if opts.input_dropout > 0:
                    router_in_SM = F.dropout(router_in_SM.float(), p=opts.input_dropout, training=True)
                if opts.input_jitter > 0:
                    router_in_SM = noise.multiplicative_jitter(router_in_SM.float(), opts.input_jitter)
                if self.noisy_gate_policy == "Jitter":
                    router_in_SM = noise.multiplicative_jitter(router_in_SM.float())
            w_EM = self.wg.weight.float()
            if self.wg.bias is not None:  # the model's biased linear map, as its router computes it
                return F.linear(router_in_SM.float(), w_EM, self.wg.bias.float()), x_SM
            if pass_tokens and router_in_SM is x_SM:
                return router_linear_passing(x_SM, w_EM)
            return router_linear(router_in_SM, w_EM), x_SM

    def keeps_every_token(self, capacity_factor: Optional[float] = None) -> bool:
        """True when this call's routing drops nothing whatever capacity the expert-parallel group agrees on (Tutel's
        dropless mode: each rank's largest expert count already keeps all its choices, and a larger agreed capacity
        moves no slot): ranks may route with their own capacity and agree on the largest afterwards."""
        if capacity_factor is None:
            capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return self.options.capacity_mode == "tutel" and capacity_factor == 0

    def capacity_from_token_count(self, capacity_factor: Optional[float] = None) -> bool:
        """True when this call's capacity follows from the token count alone and routing changes no state:
        then ranks with equal token counts route with equal capacities without a collective, and routing again
        with an agreed capacity gives what agreeing first would have (MOELayer checks the capacities after)."""
        if capacity_factor is None:
            capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.options.expert_bias and self.training:
            return False  # each routing moves the balancing bias
        if self.options.capacity_mode == "deepspeed":
            return self.drop_tokens
        return capacity_factor > 0

    def forward(self, x_SM: torch.Tensor, used_token_S: Optional[torch.Tensor] = None,
                agree_capacity: Optional[CapacityAgreement] = None, capacity_factor: Optional[float] = None,
                k: Optional[int] = None, tutel_router: Callable[..., Routing] = route_tutel
                ) -> Tuple[Routing, torch.Tensor]:
        """Routes tokens [S, M]; capacity_factor and k override the configured ones for this call only.

        tutel_router computes capacity_mode="tutel" routings (route_tutel, or its Triton twin on GPUs) of the
        default rule; another routing rule always places its choices with route_tutel (torch).
        """
        routing, l_aux, _ = self.route_tokens(x_SM, used_token_S, agree_capacity, capacity_factor, k, tutel_router,
                                              pass_tokens=False)
        return routing, l_aux

    def route_tokens(self, x_SM: torch.Tensor, used_token_S: Optional[torch.Tensor] = None,
                     agree_capacity: Optional[CapacityAgreement] = None, capacity_factor: Optional[float] = None,
                     k: Optional[int] = None, tutel_router: Callable[..., Routing] = route_tutel,
                     pass_tokens: bool = True, on_logits: Optional[Callable[[torch.Tensor], object]] = None
                     ) -> Tuple[Routing, torch.Tensor, torch.Tensor]:
        """forward's (routing, l_aux), and the tokens for the dispatch to gather from: x_SM passed on through
        the router's linear map, so that both of its gradients are summed in one backward call (see
        router_linear.py). Values are x_SM's. Feed them to the dispatch alone: the router adds its share to
        their gradient in place.

        on_logits: called with the fp32 logits [S, E] the routing is made from (with autograd, before any
        gate noise), e.g. for a model that records its router's logits: no second router matmul."""
        opts = self.options
        k = self.k if k is None else k
        if capacity_factor is None:
            capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        logits_SE, tokens_SM = self._logits_and_tokens(x_SM, pass_tokens)
        if on_logits is not None:
            on_logits(logits_SE)
        with torch.autocast(device_type=x_SM.device.type, enabled=False):
            noisy_SE = logits_SE
            if opts.gate_noise > 0 and self.training:
                noisy_SE = logits_SE + torch.randn_like(logits_SE) * (opts.gate_noise / self.num_experts)
            if opts.capacity_mode == "deepspeed":
                routing, l_aux = route_deepspeed(
                    noisy_SE, k=k, capacity_factor=capacity_factor, min_capacity=self.min_capacity,
                    drop_tokens=self.drop_tokens, use_rts=self.use_rts,
                    rsample=self.noisy_gate_policy == "RSample" and self.training,
                    second_expert_sampling=self.top2_2nd_expert_sampling, used_token_S=used_token_S,
                    agree_capacity=agree_capacity)
            elif opts.uses_rule:
                if opts.routing_rule == "sigmoid_group_topk" and k != self.k:
                    check_expert_groups(self.num_experts, k, opts.n_group, opts.topk_group)
                choices = rules.choose(opts.routing_rule, logits_SE, k, rules.RuleParams.of(opts, self.training),
                                       getattr(self, "selection_bias", None),
                                       None if noisy_SE is logits_SE else noisy_SE)
                routing = route_tutel(logits_SE, k=k, capacity_factor=capacity_factor,
                                      min_capacity=self.min_capacity,
                                      batch_prioritized_routing=opts.batch_prioritized_routing,
                                      used_token_S=used_token_S, agree_capacity=agree_capacity, choices=choices)
            else:
                scores_SE = None
                if noisy_SE is not logits_SE or opts.expert_bias:
                    scores_SE = router_softmax(noisy_SE)
                    if opts.expert_bias:
                        scores_SE = scores_SE + self.selection_bias
                routing = tutel_router(logits_SE, k=k, capacity_factor=capacity_factor,
                                      min_capacity=self.min_capacity,
                                      batch_prioritized_routing=opts.batch_prioritized_routing,
                                      normalize_gate=opts.normalize_gate, used_token_S=used_token_S,
                                      agree_capacity=agree_capacity, selection_scores_SE=scores_SE)
            if opts.capacity_mode != "deepspeed" and opts.aux_loss == "gshard":  # only the loss asked for
                l_aux = losses.gshard_loss(routing.probs_SE, routing.indices_SK)
            elif opts.aux_loss == "switch":
                l_aux = losses.switch_loss(routing.probs_SE, routing.indices_SK)
            elif opts.aux_loss == "none":
                l_aux = torch.zeros((), device=logits_SE.device)
            if opts.z_loss_coef > 0:
                l_aux = l_aux + opts.z_loss_coef * losses.z_loss(logits_SE)
            if opts.expert_bias and self.training and not _recomputing():
                self._update_expert_bias(routing.counts_E)
        return routing, l_aux, tokens_SM

    @torch.no_grad()
    def _update_expert_bias(self, counts_E: torch.Tensor) -> None:
        """Moves each expert's selection bias up if it was under-loaded, down if over-loaded (sign rule).

        The counts are summed over all ranks first so that every replica of the gate keeps the same bias.
        """
        load_E = counts_E.float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(load_E)
        self.selection_bias += self.options.expert_bias_rate * torch.sign(load_E.mean() - load_E)


def _renamed_selection_bias(state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    """Loads a state dict saved when the selection bias buffer was called `expert_bias`."""
    if prefix + "expert_bias" in state_dict and prefix + "selection_bias" not in state_dict:
        state_dict[prefix + "selection_bias"] = state_dict.pop(prefix + "expert_bias")


def _recomputing() -> bool:
    """True while autograd runs a backward, where a checkpointed forward is recomputed: the recomputation must
    route as the forward did, so it moves no balancing bias."""
    return torch._C._current_graph_task_id() != -1
