"""Routing rules: how a model turns fp32 router logits into each token's expert choices and gate weights.

A rule decides *which* experts a token goes to and *with what weight*; Tutel's slot assignment (tutel.py) then
decides *where* each choice sits in its expert's queue (dropless, or a capacity mode). Rules by name:

  softmax_topk        softmax over the experts, top-k of the probabilities, optionally renormalised (Qwen-MoE,
                      Mixtral, OLMoE; the layer's built-in default, which tutel.py computes itself)
  sigmoid_group_topk  DeepSeek-V3 / GLM-4-MoE: sigmoid scores; the selection adds a per-expert bias and keeps
                      only the experts of the topk_group best of n_group groups (a group scores the sum of its two
                      best); gates are the unbiased scores of the chosen experts, optionally renormalised
  topk_softmax        GPT-OSS, Granite-MoE: top-k of the logits, softmax over the k chosen logits
  sparsemixer         Phi-MoE: two picks; each keeps the experts whose logit is within a relative 2 * eps of the
                      best one still open, takes the best of them (in training: samples one, Gumbel-max, and
                      scales its gate by 1 or 0.3333 with a gradient as if unscaled), gate = its softmax share

Every rule then multiplies the gates by `scaling` (DeepSeek-V3's routed_scaling_factor) when it is not 1. Gates
carry autograd from the logits; choices never do.

Shape legend: S tokens, E experts, K choices per token, G expert groups, P experts per group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..options import ROUTING_RULES, RouterOptions, check_routing_rule


@dataclass(frozen=True, kw_only=True)
class RuleParams:
    """What a rule reads besides the logits: normalize (top-k gates renormalised to sum to 1), n_group and
    topk_group (group-limited selection), scaling (gate multiplier), sparsemixer_eps (sparsemixer's candidate
    margin), sample (sparsemixer samples its picks: training)."""

    normalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0
    sparsemixer_eps: float = 0.01
    sample: bool = False

    @classmethod
    def of(cls, options: RouterOptions, sample: bool = False) -> "RuleParams":
        """The parameters the routing options give a rule; sample: sparsemixer samples (training)."""
        return cls(normalize=options.normalize_gate, n_group=options.n_group, topk_group=options.topk_group,
                   scaling=options.routed_scaling_factor, sparsemixer_eps=options.sparsemixer_eps, sample=sample)


@dataclass(frozen=True)
class Choices:
    """A rule's decision for S tokens.

    indices_SK: int64 chosen experts. gates_SK: fp32 weights of the choices (autograd from the logits).
    scores_SE: fp32 per-expert scores the gates were read from (Routing.probs_SE: statistics, losses).
    priority_S: each token's first-choice score, detached (the order of batch-prioritized routing).
    """

    indices_SK: torch.Tensor
    gates_SK: torch.Tensor
    scores_SE: torch.Tensor
    priority_S: torch.Tensor


Rule = Callable[[torch.Tensor, int, RuleParams, Optional[torch.Tensor], Optional[torch.Tensor]], Choices]


def _renormalized(gates_SK: torch.Tensor) -> torch.Tensor:
    return gates_SK / torch.clamp(gates_SK.sum(dim=1, keepdim=True), min=torch.finfo(gates_SK.dtype).eps)


def _scaled(gates_SK: torch.Tensor, scaling: float) -> torch.Tensor:
    return gates_SK if scaling == 1.0 else gates_SK * scaling


def softmax_topk(logits_SE: torch.Tensor, k: int, params: RuleParams, bias_E: Optional[torch.Tensor] = None,
                 noisy_logits_SE: Optional[torch.Tensor] = None) -> Choices:
    """Top-k of softmax(logits) (of the noisy logits plus bias_E where given: selection only); gates are the
    chosen probabilities, renormalised if params.normalize."""
    probs_SE = F.softmax(logits_SE, dim=1)
    select_SE = probs_SE if noisy_logits_SE is None else F.softmax(noisy_logits_SE, dim=1)
    if bias_E is not None:
        select_SE = select_SE + bias_E
    indices_SK = torch.topk(select_SE.detach(), k=k, dim=1).indices
    top_SK = probs_SE.gather(1, indices_SK)
    gates_SK = _renormalized(top_SK) if params.normalize else top_SK
    return Choices(indices_SK, _scaled(gates_SK, params.scaling), probs_SE, top_SK[:, 0].detach())


def sigmoid_group_topk(logits_SE: torch.Tensor, k: int, params: RuleParams, bias_E: Optional[torch.Tensor] = None,
                       noisy_logits_SE: Optional[torch.Tensor] = None) -> Choices:
    """DeepSeek-V3's router: selection by sigmoid(logits) + bias_E among the experts of the topk_group best
    groups; gates are the chosen experts' sigmoid scores, divided by their sum + 1e-20 if params.normalize,
    times params.scaling. The operations are the model's own, in its order, so the choices are bitwise its."""
    scores_SE = torch.sigmoid(logits_SE)
    with torch.no_grad():
        select_SE = scores_SE if noisy_logits_SE is None else torch.sigmoid(noisy_logits_SE)
        if bias_E is not None:
            select_SE = select_SE + bias_E
        S, E = select_SE.shape
        G = params.n_group
        if G > 1:
            group_score_SG = select_SE.view(S, G, E // G).topk(2, dim=-1).values.sum(dim=-1)
            best_groups = torch.topk(group_score_SG, k=params.topk_group, dim=-1, sorted=False).indices
            in_best_SG = torch.zeros_like(group_score_SG, dtype=torch.bool).scatter_(1, best_groups, True)
            in_best_SE = in_best_SG.unsqueeze(-1).expand(S, G, E // G).reshape(S, E)
            select_SE = select_SE.masked_fill(~in_best_SE, float("-inf"))
        indices_SK = torch.topk(select_SE, k=k, dim=-1, sorted=False).indices
    top_SK = scores_SE.gather(1, indices_SK)
    gates_SK = top_SK / (top_SK.sum(dim=-1, keepdim=True) + 1e-20) if params.normalize else top_SK
    priority_S = top_SK.detach().max(dim=1).values
    return Choices(indices_SK, _scaled(gates_SK, params.scaling), scores_SE, priority_S)


def topk_softmax(logits_SE: torch.Tensor, k: int, params: RuleParams, bias_E: Optional[torch.Tensor] = None,
                 noisy_logits_SE: Optional[torch.Tensor] = None) -> Choices:
    """GPT-OSS's router: the k largest logits (of the noisy logits plus bias_E where given: selection only);
    gates are the softmax over the chosen (clean) logits, so they sum to 1 already (params.normalize is moot)."""
    with torch.no_grad():
        select_SE = logits_SE if noisy_logits_SE is None else noisy_logits_SE
        if bias_E is not None:
            select_SE = select_SE + bias_E
        indices_SK = torch.topk(select_SE, k=k, dim=-1).indices
    gates_SK = F.softmax(logits_SE.gather(1, indices_SK), dim=1)
    scores_SE = F.softmax(logits_SE, dim=1)
    return Choices(indices_SK, _scaled(gates_SK, params.scaling), scores_SE, scores_SE.detach().max(dim=1).values)


class _ScaledGate(torch.autograd.Function):
    """gate * scale forward; backward as if it were the gate alone (sparsemixer's estimate of the routing
    gradient: the scale stands for a midpoint of the sampling, not a factor to differentiate through)."""

    @staticmethod
    def forward(ctx, gate_S1: torch.Tensor, scale_S1: torch.Tensor) -> torch.Tensor:
        return gate_S1 * scale_S1

    @staticmethod
    def backward(ctx, grad_S1: torch.Tensor):
        return grad_S1, None


def _sparsemixer_pick(logits_SE: torch.Tensor, open_SE: torch.Tensor, eps: float, sample: bool,
                      redraw: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """One pick among the experts open_SE leaves open (logits, or -inf where taken): (index_S1, gate_S1).

    Candidates: open experts whose logit is below the best open one by at most 2 * eps relative to
    max(|logit|, best). Without sampling the best is taken; with it, one candidate is drawn (Gumbel-max over the
    candidates' logits) and its gate scaled by 1 where it is the most probable candidate or a uniform draw
    exceeds 0.75, else by 0.3333. The model's second pick draws that uniform number twice and keeps the second
    (redraw), which this repeats so that a seed routes as it does."""
    with torch.no_grad():
        best_S1, best_at_S1 = open_SE.max(dim=1, keepdim=True)
        far_SE = (best_S1 - logits_SE) / logits_SE.abs().clamp(min=best_S1) > 2 * eps
    candidates_SE = open_SE.masked_fill(far_SE, float("-inf"))
    if sample:
        gumbel_SE = torch.empty_like(candidates_SE).exponential_().log()
        index_S1 = (candidates_SE - gumbel_SE).argmax(dim=1, keepdim=True)
    else:
        index_S1 = best_at_S1
    probs_SE = F.softmax(candidates_SE, dim=1)
    gate_S1 = probs_SE.gather(1, index_S1)
    if not sample:
        return index_S1, gate_S1
    with torch.no_grad():
        on_top_S1 = index_S1 == probs_SE.argmax(dim=1, keepdim=True)
        uniform_S1 = torch.rand_like(gate_S1)
        if redraw:
            uniform_S1.uniform_()
        scale_S1 = 0.3333 + 0.6667 * (on_top_S1 | (uniform_S1 > 0.75)).to(gate_S1.dtype)
    return index_S1, _ScaledGate.apply(gate_S1, scale_S1)


def sparsemixer(logits_SE: torch.Tensor, k: int, params: RuleParams, bias_E: Optional[torch.Tensor] = None,
                noisy_logits_SE: Optional[torch.Tensor] = None) -> Choices:
    """Phi-MoE's router: two picks (_sparsemixer_pick), the second among the experts the first left; gates are
    not renormalised (params.normalize is moot). Sampled where params.sample (training)."""
    if k != 2:
        raise ValueError(f"routing_rule='sparsemixer' picks 2 experts per token, got k={k}")
    if bias_E is not None or noisy_logits_SE is not None:
        raise ValueError("routing_rule='sparsemixer' takes no selection bias or gate noise")
    eps, sample = params.sparsemixer_eps, params.sample
    first_S1, first_gate_S1 = _sparsemixer_pick(logits_SE, logits_SE, eps, sample, redraw=False)
    second_S1, second_gate_S1 = _sparsemixer_pick(logits_SE, logits_SE.scatter(1, first_S1, float("-inf")), eps,
                                                  sample, redraw=True)
    gates_SK = torch.cat([first_gate_S1, second_gate_S1], dim=1)
    scores_SE = F.softmax(logits_SE, dim=1)
    return Choices(torch.cat([first_S1, second_S1], dim=1), _scaled(gates_SK, params.scaling), scores_SE,
                   gates_SK[:, 0].detach())


RULES: Dict[str, Rule] = {
    "softmax_topk": softmax_topk,
    "sigmoid_group_topk": sigmoid_group_topk,
    "topk_softmax": topk_softmax,
    "sparsemixer": sparsemixer,
}
assert tuple(RULES) == ROUTING_RULES, "options.ROUTING_RULES and rules.RULES must name the same rules"


def rule_for(name: str) -> Rule:
    """The rule called `name`, or ValueError naming the known ones."""
    check_routing_rule(name)
    return RULES[name]


def choose(name: str, logits_SE: torch.Tensor, k: int, params: Optional[RuleParams] = None,
           bias_E: Optional[torch.Tensor] = None, noisy_logits_SE: Optional[torch.Tensor] = None) -> Choices:
    """Applies rule `name` to fp32 logits [S, E]: each token's k choices and their gates."""
    return rule_for(name)(logits_SE.float(), k, params or RuleParams(), bias_E, noisy_logits_SE)
