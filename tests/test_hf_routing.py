"""The routing rules (ds_tutel.routing.rules) against the transformers routers they reproduce, the slot assignment
of precomputed choices (route_tutel(choices=...)), the rule options and the gate's use of them.

The HF routers are built from a plain namespace config (they read a few attributes), with random weights and
biases; the rule sees the same fp32 logits. Choices must be the router's (as sets: the order of a token's k
choices is not part of the routing), gates and their gradients equal to fp32 rounding.

Shape legend: S tokens, M model dim, E experts, K choices per token.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from ds_tutel.options import RouterOptions, check_expert_groups
from ds_tutel.routing import rules
from ds_tutel.routing.gate import Gate
from ds_tutel.routing.tutel import route_tutel

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter  # noqa: E402
from transformers.models.phimoe.modeling_phimoe import PhimoeTopKRouter  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter  # noqa: E402

M = 16
ATOL = 1e-6


def _config(E: int, k: int, **fields) -> types.SimpleNamespace:
    return types.SimpleNamespace(num_experts_per_tok=k, num_local_experts=E, num_experts=E, hidden_size=M, **fields)


def _by_expert(indices_SK: torch.Tensor, gates_SK: torch.Tensor):
    """(indices, gates) with each token's choices in expert order: routings compared as sets."""
    order_SK = indices_SK.argsort(dim=1)
    return indices_SK.gather(1, order_SK), gates_SK.gather(1, order_SK)


def _assert_same_choices(ref_indices_SK, ref_gates_SK, choices: rules.Choices, router_w: torch.Tensor,
                         ours_w: torch.Tensor) -> None:
    """Same experts, same gates, and the same gradient of one weighted sum of the gates w.r.t. the router."""
    ref_i, ref_g = _by_expert(ref_indices_SK, ref_gates_SK)
    got_i, got_g = _by_expert(choices.indices_SK, choices.gates_SK)
    assert torch.equal(ref_i, got_i)
    assert (ref_g - got_g).abs().max() < ATOL
    weights_SK = torch.linspace(-1.0, 1.0, ref_g.numel()).view_as(ref_g)
    (ref_grad,) = torch.autograd.grad((ref_g * weights_SK).sum(), router_w)
    (got_grad,) = torch.autograd.grad((got_g * weights_SK).sum(), ours_w)
    assert (ref_grad - got_grad).abs().max() < ATOL



def _run_randomized(router, S: int, **bias_stds: float):
    """(x_SM, the router's outputs on x_SM, a trainable copy of its weight): the weight drawn with std 0.3 and each
    named bias tensor with its std, so that every part of the router's rule counts."""
    with torch.no_grad():
        router.weight.normal_(0.0, 0.3)
        for name, std in bias_stds.items():
            getattr(router, name).normal_(0.0, std)
    x_SM = torch.randn(S, M)
    return x_SM, router(x_SM), router.weight.detach().clone().requires_grad_(True)

@settings(max_examples=40, deadline=None)
@given(S=st.integers(1, 24), groups=st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4), (8, 3)]),
       per_group=st.sampled_from([2, 3]), k=st.integers(1, 4), normalize=st.booleans(),
       scaling=st.sampled_from([1.0, 2.5]), seed=st.integers(0, 2 ** 16))
def test_sigmoid_group_topk_is_deepseek_v3s_router(S, groups, per_group, k, normalize, scaling, seed):
    n_group, topk_group = groups
    E = n_group * per_group
    k = min(k, topk_group * per_group)
    torch.manual_seed(seed)
    router = DeepseekV3TopkRouter(_config(E, k, routed_scaling_factor=scaling, n_group=n_group,
                                          topk_group=topk_group, norm_topk_prob=normalize))
    x_SM, (logits_SE, ref_gates_SK, ref_indices_SK), w_EM = _run_randomized(router, S, e_score_correction_bias=0.1)
    params = rules.RuleParams(normalize=normalize, n_group=n_group, topk_group=topk_group, scaling=scaling)
    choices = rules.choose("sigmoid_group_topk", F.linear(x_SM, w_EM), k, params, router.e_score_correction_bias)
    _assert_same_choices(ref_indices_SK, ref_gates_SK, choices, router.weight, w_EM)
    assert torch.equal(choices.scores_SE, torch.sigmoid(logits_SE.detach()))


def test_sigmoid_group_topk_keeps_to_the_best_groups():
    """A token whose best single expert sits in a weak group does not get it (the rule is group-limited), and the
    bias steers the choice without entering the gates."""
    logits_SE = torch.tensor([[3.0, -5.0, 1.0, 0.9, -4.0, -4.0]])  # groups (0, 1), (2, 3), (4, 5)
    params = rules.RuleParams(normalize=False, n_group=3, topk_group=1)
    assert rules.choose("sigmoid_group_topk", logits_SE, 2, params).indices_SK.sort().values.tolist() == [[2, 3]]
    bias_E = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, 5.0])
    choices = rules.choose("sigmoid_group_topk", logits_SE, 2, params, bias_E)
    assert choices.indices_SK.sort().values.tolist() == [[4, 5]]
    assert torch.allclose(choices.gates_SK, torch.sigmoid(torch.tensor([[-4.0, -4.0]])))


@settings(max_examples=30, deadline=None)
@given(S=st.integers(1, 24), E=st.sampled_from([2, 4, 8]), k=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_topk_softmax_is_gpt_osss_router(S, E, k, seed):
    k = min(k, E)
    torch.manual_seed(seed)
    router = GptOssTopKRouter(_config(E, k))
    x_SM, (_, ref_gates_SK, ref_indices_SK), w_EM = _run_randomized(router, S, bias=0.3)
    choices = rules.choose("topk_softmax", F.linear(x_SM, w_EM, router.bias.detach()), k)
    _assert_same_choices(ref_indices_SK, ref_gates_SK, choices, router.weight, w_EM)


@settings(max_examples=30, deadline=None)
@given(S=st.integers(1, 24), E=st.sampled_from([2, 4, 8]), k=st.integers(1, 4), normalize=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_softmax_topk_is_qwen3_moes_router(S, E, k, normalize, seed):
    k = min(k, E)
    torch.manual_seed(seed)
    router = Qwen3MoeTopKRouter(_config(E, k, norm_topk_prob=normalize))
    with torch.no_grad():
        router.weight.normal_(0.0, 0.3)
    x_SM = torch.randn(S, M)
    _, ref_gates_SK, ref_indices_SK = router(x_SM)
    w_EM = router.weight.detach().clone().requires_grad_(True)
    choices = rules.choose("softmax_topk", F.linear(x_SM, w_EM), k, rules.RuleParams(normalize=normalize))
    _assert_same_choices(ref_indices_SK, ref_gates_SK, choices, router.weight, w_EM)


@settings(max_examples=40, deadline=None)
@given(S=st.integers(1, 24), E=st.sampled_from([2, 4, 8]), eps=st.sampled_from([0.0, 0.01, 0.3, 2.0]),
       training=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_sparsemixer_is_phi_moes_router(S, E, eps, training, seed):
    """Phi-MoE's two picks, in training sampled: from the same seed, the same random draws in the same order give
    the same experts, gates (scaled by 1 or 0.3333) and gradient estimate."""
    torch.manual_seed(seed)
    router = PhimoeTopKRouter(types.SimpleNamespace(hidden_size=M, num_local_experts=E, num_experts_per_tok=2,
                                                    router_jitter_noise=eps, input_jitter_noise=0.0))
    router.train(training)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.3)
    x_SM = torch.randn(S, M)
    w_EM = router.weight.detach().clone().requires_grad_(True)
    torch.manual_seed(seed + 1)
    _, ref_gates_SK, ref_indices_SK = router(x_SM)
    torch.manual_seed(seed + 1)
    params = rules.RuleParams(normalize=False, sparsemixer_eps=eps, sample=training)
    choices = rules.choose("sparsemixer", F.linear(x_SM, w_EM), 2, params)
    assert torch.equal(choices.indices_SK, ref_indices_SK)  # the order of the two picks is the model's too
    _assert_same_choices(ref_indices_SK, ref_gates_SK, choices, router.weight, w_EM)


def test_sparsemixer_samples_among_close_experts_in_training_only():
    """Two experts within the margin, one far below: evaluation always takes the best; training also takes the
    close one (never the far one), with the gate scaled to 0.3333 where it is not the most probable."""
    logits_SE = torch.tensor([[2.0, 1.9, -6.0, -6.5]]).repeat(400, 1)
    params = rules.RuleParams(sparsemixer_eps=0.05)
    evaluated = rules.choose("sparsemixer", logits_SE, 2, params)
    assert evaluated.indices_SK[:, 0].eq(0).all() and evaluated.indices_SK[:, 1].eq(1).all()
    torch.manual_seed(0)
    sampled = rules.choose("sparsemixer", logits_SE, 2, rules.RuleParams(sparsemixer_eps=0.05, sample=True))
    firsts = sampled.indices_SK[:, 0]
    assert 0.3 < firsts.eq(1).float().mean() < 0.7 and firsts.lt(2).all()
    close_gate = torch.softmax(torch.tensor([2.0, 1.9]), dim=0)[1]
    scaled = sampled.gates_SK[firsts.eq(1), 0]
    assert torch.isclose(scaled, close_gate * 0.3333).any() and torch.isclose(scaled, close_gate).any()
    with pytest.raises(ValueError, match="picks 2 experts"):
        rules.choose("sparsemixer", logits_SE, 3, params)


@settings(max_examples=40, deadline=None)
@given(S=st.integers(1, 40), E=st.sampled_from([2, 4, 8]), k=st.integers(1, 3), normalize=st.booleans(),
       capacity_factor=st.sampled_from([0.0, 1.0, 0.5, -0.5, -1.5]), prioritized=st.booleans(),
       unused=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_precomputed_softmax_topk_choices_route_as_the_builtin_rule(S, E, k, normalize, capacity_factor,
                                                                    prioritized, unused, seed):
    """Tutel's slot assignment of the softmax_topk rule's choices is route_tutel's own routing, in every
    capacity mode, with batch-prioritized routing and unused tokens."""
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    logits_SE = torch.randn(S, E, generator=g)
    used_S = (torch.rand(S, generator=g) > 0.3).to(torch.int64) if unused else None
    kw = dict(k=k, capacity_factor=capacity_factor, min_capacity=0, batch_prioritized_routing=prioritized,
              normalize_gate=normalize, used_token_S=used_S)
    ref = route_tutel(logits_SE, **kw)
    choices = rules.choose("softmax_topk", logits_SE, k, rules.RuleParams(normalize=normalize))
    got = route_tutel(logits_SE, **kw, choices=choices)
    assert got.capacity == ref.capacity
    for name in ("indices_SK", "locations_SK", "counts_E"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert torch.allclose(got.gates_SK, ref.gates_SK, atol=ATOL) and torch.allclose(got.probs_SE, ref.probs_SE)


def test_dropless_group_routing_keeps_every_choice_and_capacity_drops():
    torch.manual_seed(0)
    logits_SE = torch.randn(64, 8)
    params = rules.RuleParams(n_group=4, topk_group=2, scaling=2.0)
    choices = rules.choose("sigmoid_group_topk", logits_SE, 2, params)
    dropless = route_tutel(logits_SE, capacity_factor=0.0, choices=choices)
    assert bool((dropless.locations_SK >= 0).all()) and dropless.capacity == int(dropless.counts_E.max())
    assert torch.equal(dropless.gates_SK, choices.gates_SK) and torch.allclose(
        dropless.gates_SK.sum(dim=1), torch.full((64,), 2.0))
    capped = route_tutel(logits_SE, capacity_factor=0.5, choices=choices)
    assert capped.capacity < dropless.capacity and bool((capped.locations_SK < 0).any())
    assert bool((capped.gates_SK[capped.locations_SK < 0] == 0).all())


# ----------------------------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize("bad, match", [
    (dict(routing_rule="sigmoid_topk"), "unknown routing_rule 'sigmoid_topk'"),
    (dict(routing_rule=None), "unknown routing_rule"),
    (dict(n_group=2), "need routing_rule='sigmoid_group_topk'"),
    (dict(routing_rule="sigmoid_group_topk", n_group=2, topk_group=3), "topk_group"),
    (dict(routing_rule="sigmoid_group_topk", n_group=0), "n_group"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(router_bias=1), "router_bias"),
    (dict(capacity_mode="deepspeed", routing_rule="topk_softmax"), "capacity_mode='tutel'"),
    (dict(capacity_mode="deepspeed", routed_scaling_factor=2.0), "capacity_mode='tutel'"),
    (dict(routing_rule="sparsemixer", expert_bias=True), "samples its own choices"),
    (dict(routing_rule="sparsemixer", gate_noise=1.0), "samples its own choices"),
    (dict(sparsemixer_eps=-0.1), "sparsemixer_eps"),
])
def test_bad_rule_options_raise_clearly(bad, match):
    with pytest.raises(ValueError, match=match):
        RouterOptions(**{"capacity_mode": "tutel", **bad})


def test_unknown_rule_names_the_known_ones():
    with pytest.raises(ValueError) as err:
        rules.rule_for("nope")
    assert all(name in str(err.value) for name in rules.RULES)


def test_defaults_use_no_rule_and_add_nothing():
    opts = RouterOptions()
    assert opts.routing_rule == "softmax_topk" and not opts.uses_rule and not opts.has_selection_bias
    gate = Gate(M, 4, 2)
    assert [n for n, _ in gate.named_parameters()] == ["wg.weight"] and not dict(gate.named_buffers())
    assert not RouterOptions(capacity_mode="deepspeed", router_bias=True).uses_rule  # a bias is not a rule


def test_expert_groups_must_fit():
    with pytest.raises(ValueError, match="groups of >= 2 experts"):
        check_expert_groups(8, 2, 3, 1)
    with pytest.raises(ValueError, match="groups of >= 2 experts"):
        check_expert_groups(4, 1, 4, 1)
    with pytest.raises(ValueError, match="k \\(5\\) exceeds"):
        check_expert_groups(8, 5, 4, 2)
    gate = Gate(M, 8, 3, options=RouterOptions(capacity_mode="tutel"))
    with pytest.raises(ValueError, match="k \\(3\\) exceeds"):
        gate.configure(RouterOptions(capacity_mode="tutel", routing_rule="sigmoid_group_topk", n_group=4,
                                     topk_group=1))


# ----------------------------------------------------------------------------------------------------------------
# The gate


def _rule_gate(**options) -> Gate:
    gate = Gate(M, 8, 2, capacity_factor=0.0, eval_capacity_factor=0.0, min_capacity=0,
                options=RouterOptions(capacity_mode="tutel"))
    gate.configure(RouterOptions(capacity_mode="tutel", **options))
    return gate


def test_a_rule_never_goes_through_the_backend_router():
    """The Triton gate computes only the default rule: with another rule the gate places the rule's choices with
    the torch slot assignment, whatever router the backend offers."""
    def backend_router(*args, **kwargs):
        raise AssertionError("a non-default rule reached the backend's Tutel router")

    gate = _rule_gate(routing_rule="sigmoid_group_topk", n_group=4, topk_group=2, routed_scaling_factor=2.0)
    x_SM = torch.randn(10, M)
    routing, _ = gate(x_SM, tutel_router=backend_router)
    params = rules.RuleParams.of(gate.options, gate.training)
    expected = rules.choose("sigmoid_group_topk", gate.logits(x_SM), 2, params, gate.selection_bias)
    assert torch.equal(routing.indices_SK, expected.indices_SK) and torch.equal(routing.gates_SK, expected.gates_SK)
    with pytest.raises(AssertionError, match="backend"):
        Gate(M, 8, 2, options=RouterOptions(capacity_mode="tutel"))(x_SM, tutel_router=backend_router)


def test_router_bias_is_part_of_the_logits():
    gate = _rule_gate(routing_rule="topk_softmax", router_bias=True)
    assert [n for n, _ in gate.named_parameters()] == ["wg.weight", "wg.bias"]
    with torch.no_grad():
        gate.wg.bias.normal_()
    x_SM = torch.randn(5, M)
    assert torch.equal(gate.logits(x_SM), F.linear(x_SM, gate.wg.weight, gate.wg.bias))
    routing, _ = gate(x_SM)
    weights_SK = torch.tensor([1.0, -2.0]).expand(5, 2)
    (routing.gates_SK * weights_SK).sum().backward()
    b_E = gate.wg.bias.detach().clone().requires_grad_(True)
    ref_gates_SK = F.softmax(F.linear(x_SM, gate.wg.weight.detach(), b_E).gather(1, routing.indices_SK), dim=1)
    (ref_grad_E,) = torch.autograd.grad((ref_gates_SK * weights_SK).sum(), b_E)
    assert ref_grad_E.abs().max() > 1e-3 and torch.allclose(gate.wg.bias.grad, ref_grad_E, atol=ATOL)


def test_group_rule_always_has_its_selection_bias_but_moves_it_only_when_asked():
    gate = _rule_gate(routing_rule="sigmoid_group_topk", n_group=2, topk_group=1)
    assert torch.equal(gate.selection_bias, torch.zeros(8))
    gate.train()
    gate(torch.randn(12, M))
    assert torch.equal(gate.selection_bias, torch.zeros(8))

    gate = _rule_gate(routing_rule="sigmoid_group_topk", n_group=2, topk_group=1, expert_bias=True,
                      expert_bias_rate=0.5)
    routing, _ = gate(torch.randn(12, M))
    load_E = routing.counts_E.float()
    assert torch.equal(gate.selection_bias, 0.5 * torch.sign(load_E.mean() - load_E))


def test_checkpoint_recomputation_moves_no_bias():
    """Under activation checkpointing the gate's forward runs again in the backward: that run must route as the
    first did, so the bias moves once per step."""
    from torch.utils.checkpoint import checkpoint

    gate = _rule_gate(routing_rule="sigmoid_group_topk", n_group=2, topk_group=1, expert_bias=True,
                      expert_bias_rate=0.5)
    x_SM = torch.randn(12, M, requires_grad=True)

    def gates_sum(x_SM):  # a tensor saved after the routing: recomputation runs past the gate's update
        gates_SK = gate(x_SM)[0].gates_SK
        return (gates_SK * torch.sin(2 * x_SM[:, :2])).sum()

    loss = checkpoint(gates_sum, x_SM, use_reentrant=False)
    after_forward_E = gate.selection_bias.clone()
    assert not torch.equal(after_forward_E, torch.zeros(8))
    loss.backward()
    assert torch.equal(gate.selection_bias, after_forward_E) and x_SM.grad is not None


def test_public_route_takes_a_rule():
    """ds_tutel.route(logits, routing_rule=...): the rule's choices in Tutel's slots; bad combinations raise."""
    from ds_tutel.routing.gate import route

    torch.manual_seed(0)
    logits_SE = torch.randn(20, 8)
    bias_E = torch.linspace(-0.2, 0.2, 8)
    routing = route(logits_SE, k=2, capacity_factor=0.0, capacity_mode="tutel", routing_rule="sigmoid_group_topk",
                    n_group=4, topk_group=2, routed_scaling_factor=2.5, selection_bias_E=bias_E)
    expected = rules.choose("sigmoid_group_topk", logits_SE, 2, rules.RuleParams(n_group=4, topk_group=2,
                                                                                 scaling=2.5), bias_E)
    assert torch.equal(routing.indices_SK, expected.indices_SK) and torch.equal(routing.gates_SK, expected.gates_SK)
    assert bool((routing.locations_SK >= 0).all())
    default = route(logits_SE, k=2, capacity_factor=0.0, capacity_mode="tutel")
    assert torch.equal(route(logits_SE, k=2, capacity_factor=0.0, capacity_mode="tutel",
                             selection_bias_E=torch.zeros(8)).indices_SK, default.indices_SK)
    with pytest.raises(ValueError, match="capacity_mode='tutel'"):
        route(logits_SE, k=2, routing_rule="topk_softmax")
    with pytest.raises(ValueError, match="capacity_mode='tutel'"):
        route(logits_SE, k=2, selection_bias_E=bias_E)
    with pytest.raises(ValueError, match="unknown routing_rule"):
        route(logits_SE, k=2, capacity_mode="tutel", routing_rule="softmax")
    with pytest.raises(ValueError, match="exceeds"):
        route(logits_SE, k=4, capacity_mode="tutel", routing_rule="sigmoid_group_topk", n_group=4, topk_group=1)
    for sample in (False, True):  # sparsemixer's margin and sampling reach the rule
        torch.manual_seed(1)
        routing = route(logits_SE, k=2, capacity_factor=0.0, capacity_mode="tutel", routing_rule="sparsemixer",
                        sparsemixer_eps=0.4, sample=sample)
        torch.manual_seed(1)
        expected = rules.choose("sparsemixer", logits_SE, 2, rules.RuleParams(sparsemixer_eps=0.4, sample=sample))
        assert torch.equal(routing.indices_SK, expected.indices_SK)
        assert torch.equal(routing.gates_SK, expected.gates_SK)


def test_the_layer_and_its_json_section_take_the_rule_options():
    """ds_tutel.MoE and MoE.from_config accept the rule options and route as the gate alone does."""
    import ds_tutel

    rule = dict(capacity_mode="tutel", capacity_factor=0.0, routing_rule="sigmoid_group_topk", n_group=4,
                topk_group=2, routed_scaling_factor=2.5, router_bias=True)
    torch.manual_seed(0)
    layer = ds_tutel.MoE(M, torch.nn.Linear(M, M), num_experts=8, k=2, **rule)
    json_layer = ds_tutel.MoE.from_config({"ds_tutel": {key: value for key, value in rule.items()
                                                        if key != "capacity_factor"}},
                                          M, torch.nn.Linear(M, M), num_experts=8, k=2, capacity_factor=0.0)
    for built in (layer, json_layer):
        opts = built.deepspeed_moe.gate.options
        assert (opts.routing_rule, opts.n_group, opts.topk_group, opts.routed_scaling_factor, opts.router_bias) == \
            ("sigmoid_group_topk", 4, 2, 2.5, True)
        assert {"deepspeed_moe.gate.wg.bias"} <= {n for n, _ in built.named_parameters()}
    x_SM = torch.randn(6, M)
    layer(x_SM)
    gate = layer.deepspeed_moe.gate
    params = rules.RuleParams.of(gate.options, gate.training)
    expected = rules.choose("sigmoid_group_topk", gate.logits(x_SM), 2, params, gate.selection_bias)
    routing = layer.deepspeed_moe.last_routing
    assert torch.equal(routing.indices_SK, expected.indices_SK)
    assert torch.allclose(routing.gates_SK, expected.gates_SK.detach(), atol=ATOL)
    with pytest.raises(ValueError, match="routing_rule"):
        ds_tutel.MoE(M, torch.nn.Linear(M, M), num_experts=8, k=2, capacity_mode="tutel", routing_rule="nope")


def test_layer_config_skips_the_hf_object():
    """One JSON file configures both converted models ("hf") and ds_tutel.MoE.from_config layers."""
    import ds_tutel

    config = {"ds_tutel": {"capacity_mode": "tutel", "hf": {"ep_size": 1, "capacity_factor": 1.25}}}
    layer = ds_tutel.MoE.from_config(config, M, torch.nn.Linear(M, M), num_experts=4)
    assert layer.deepspeed_moe.gate.options.capacity_mode == "tutel"
    with pytest.raises(ValueError, match="unknown keys"):
        ds_tutel.MoE.from_config({"ds_tutel": {"capacity_mod": "tutel"}}, M, torch.nn.Linear(M, M), num_experts=4)
