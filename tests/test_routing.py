"""Properties of ds_tutel.route and the Tutel routing features of the layer (issue: Tutel routing)."""
import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ds_tutel
from ds_tutel.routing import losses
from ds_tutel.routing.tutel import padded_capacity
from helpers import expert_ffn

M = 8


@st.composite
def routing_cases(draw):
    S = draw(st.integers(1, 40))
    E = draw(st.integers(1, 9))
    k = draw(st.integers(1, E))
    cf = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, -0.5, -1.0]))
    seed = draw(st.integers(0, 2 ** 16))
    logits = torch.randn(S, E, generator=torch.Generator().manual_seed(seed)) * draw(st.sampled_from([0.1, 1.0, 5.0]))
    return logits, k, cf


def _kept_slots_valid(r: ds_tutel.Routing):
    kept = r.kept_SK
    assert torch.all(r.locations_SK[kept] < r.capacity) and torch.all(r.locations_SK[kept] >= 0)
    assert torch.all(r.locations_SK[~kept] == -1) and torch.all(r.gates_SK[~kept] == 0)
    slots = r.indices_SK[kept] * max(r.capacity, 1) + r.locations_SK[kept]
    assert slots.unique().numel() == slots.numel(), "two choices share a slot"
    assert torch.all(r.kept_per_expert() <= r.capacity)
    # Filled slots form a prefix of each expert's buffer.
    for e in range(r.num_experts):
        locs = r.locations_SK[kept & (r.indices_SK == e)]
        assert sorted(locs.tolist()) == list(range(locs.numel()))
    # Each token picks distinct experts.
    for row in r.indices_SK.tolist():
        assert len(set(row)) == len(row)


@settings(max_examples=150, deadline=None)
@given(routing_cases(), st.booleans(), st.booleans())
def test_tutel_routing_properties(case, bpr, normalize):
    logits, k, cf = case
    r = ds_tutel.route(logits, k=k, capacity_factor=cf, capacity_mode="tutel", batch_prioritized_routing=bpr,
                       normalize_gate=normalize, min_capacity=0)
    S, E = logits.shape
    _kept_slots_valid(r)
    assert torch.equal(r.counts_E, torch.bincount(r.indices_SK.reshape(-1), minlength=E))
    if cf == 0:
        assert bool(r.kept_SK.all()), "dropless dropped a choice"
        assert r.capacity == int(r.counts_E.max())
    if cf < 0:
        assert r.capacity <= padded_capacity(S, E, k, cf) and r.capacity <= int(r.counts_E.max())
    if normalize and cf == 0:
        torch.testing.assert_close(r.gates_SK.sum(dim=1), torch.ones(S))
    if not bpr:  # earlier tokens win: a dropped choice has only kept choices of the same rank before it
        for e in range(E):
            for j in range(k):
                mask = r.indices_SK[:, j] == e
                kept = r.kept_SK[:, j][mask].tolist()
                assert kept == sorted(kept, reverse=True)
    else:  # higher top-1 scores win within one choice rank
        top1 = r.probs_SE.max(dim=1).values
        for e in range(E):
            for j in range(k):
                mask = r.indices_SK[:, j] == e
                kept, dropped = top1[mask & r.kept_SK[:, j]], top1[mask & ~r.kept_SK[:, j]]
                if kept.numel() and dropped.numel():
                    assert kept.min() >= dropped.max()


@settings(max_examples=100, deadline=None)
@given(routing_cases(), st.booleans())
def test_deepspeed_routing_properties(case, drop_tokens):
    logits, k, cf = case
    r = ds_tutel.route(logits, k=k, capacity_factor=abs(cf), drop_tokens=drop_tokens, min_capacity=1)
    _kept_slots_valid(r)
    if not drop_tokens:
        assert bool(r.kept_SK.all())


def test_bpr_keeps_scores_and_position_order_keeps_first_tokens():
    # Every token wants expert 0; scores rise with position.
    logits = torch.stack([torch.linspace(0, 4, 10), torch.zeros(10)], dim=1)
    by_position = ds_tutel.route(logits, k=1, capacity_factor=0.2, capacity_mode="tutel", min_capacity=0)
    by_score = ds_tutel.route(logits, k=1, capacity_factor=0.2, capacity_mode="tutel", min_capacity=0,
                              batch_prioritized_routing=True)
    assert by_position.capacity == by_score.capacity == 1
    kept_pos = by_position.kept_SK[:, 0].nonzero().flatten().tolist()
    kept_score = by_score.kept_SK[:, 0].nonzero().flatten().tolist()
    # Token 0 has logits (0, 0): it prefers expert 0 only by the tie rule, so count tokens 1.. for expert 0.
    assert kept_pos == [0] or kept_pos == [0, 1]
    assert kept_score[-1] == 9


def _layer(**kwargs):
    torch.manual_seed(0)
    return ds_tutel.MoE(M, expert_ffn(M), **{"num_experts": 4, **kwargs})


def test_per_call_overrides_take_effect_without_rebuilding():
    layer = _layer(k=1, capacity_mode="tutel", capacity_factor=1.0)
    x = torch.randn(32, M)
    layer(x)
    base = layer.deepspeed_moe.last_routing
    layer(x, k=3, capacity_factor=0)
    over = layer.deepspeed_moe.last_routing
    assert base.k == 1 and over.k == 3 and bool(over.kept_SK.all())
    layer(x)
    assert layer.deepspeed_moe.last_routing.k == 1 and layer.deepspeed_moe.last_routing.capacity == base.capacity
    layer(x, capacity_factor=-0.25)
    assert layer.deepspeed_moe.last_routing.capacity <= padded_capacity(32, 4, 1, 0.25)
    with pytest.raises(ValueError, match="k must be"):
        layer(x, k=5)


@pytest.mark.parametrize("feature", [dict(gate_noise=1.0), dict(input_dropout=0.5), dict(input_jitter=0.3),
                                     dict(noisy_gate_policy="Jitter")])
def test_exploration_noise_only_in_training(feature):
    layer = _layer(k=2, capacity_mode="tutel", capacity_factor=0, **feature)
    x = torch.randn(64, M)
    layer.eval()
    a, b = layer(x)[0], layer(x)[0]
    assert torch.equal(a, b)
    layer.train()
    outs = [layer(x)[0] for _ in range(3)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_switch_and_z_loss_match_hand_computation():
    layer = _layer(k=2, aux_loss="switch", z_loss_coef=0.1, capacity_mode="tutel")
    x = torch.randn(20, M)
    _, l_aux, _ = layer(x)
    logits = x @ layer.deepspeed_moe.gate.wg.weight.t()
    probs = torch.softmax(logits, dim=1)
    top2 = probs.topk(2, dim=1).indices
    share = torch.stack([(top2 == e).sum() for e in range(4)]).float() / top2.numel()
    switch = 4 * (probs.mean(0) * share).sum()
    zl = (torch.logsumexp(logits, dim=1) ** 2).mean()
    torch.testing.assert_close(l_aux, switch + 0.1 * zl)
    torch.testing.assert_close(losses.z_loss(logits), zl)


def test_aux_loss_none_and_gshard_default():
    x = torch.randn(20, M)
    assert float(_layer(k=2, aux_loss="none")(x)[1]) == 0.0
    layer = _layer(k=2, capacity_mode="tutel")
    _, l_aux, _ = layer(x)
    r = layer.deepspeed_moe.last_routing
    first = torch.bincount(r.indices_SK[:, 0], minlength=4).float() / 20
    torch.testing.assert_close(l_aux, 4 * (r.probs_SE.mean(0) * first).sum())


def test_expert_bias_moves_load_toward_balance():
    layer = _layer(k=1, capacity_mode="tutel", capacity_factor=0, expert_bias=True, expert_bias_rate=0.02,
                   normalize_gate=False)
    with torch.no_grad():  # a router skewed toward expert 0
        layer.deepspeed_moe.gate.wg.weight.mul_(0.3)
        layer.deepspeed_moe.gate.wg.weight[0, 0] = 3.0
    x = torch.randn(256, M).abs() * 0.5
    layer.train()
    imbalance = []
    for _ in range(60):
        layer(x)
        imbalance.append(layer.routing_stats().imbalance)
    assert imbalance[0] > 2.0 and imbalance[-1] < 0.6 * imbalance[0]
    bias = layer.deepspeed_moe.gate.selection_bias
    assert bias[0] < 0 and bool((bias[1:] > bias[0]).all())
    # The bias only steers selection: gates are still the unbiased softmax values of the chosen experts.
    r = layer.deepspeed_moe.last_routing
    torch.testing.assert_close(r.gates_SK, r.probs_SE.gather(1, r.indices_SK))
    assert not torch.equal(r.indices_SK[:, 0], r.probs_SE.argmax(dim=1))


def test_selection_bias_stays_out_of_deepspeeds_expert_keys_and_loads_under_its_old_name():
    """DeepSpeed's engine files every MoE state-dict key holding "expert" as an expert's (and cannot save one that
    sits in no expert): every such key of a layer with all the gate's extras is an expert's. A state dict from
    when the bias buffer was `expert_bias` loads into `selection_bias`."""
    import re

    layer = _layer(k=2, capacity_mode="tutel", expert_bias=True)
    layer.deepspeed_moe.gate.configure(dataclasses.replace(layer.deepspeed_moe.gate.options, router_bias=True))
    state = layer.state_dict()
    assert "deepspeed_moe.gate.selection_bias" in state
    for key in state:  # as the engine sees them: under the layer's module name
        if "expert" in key and "moe.gate.wg.weight" not in key:
            assert re.match(r".*\.deepspeed_moe\.experts\.deepspeed_experts\.[0-9]+\.", "moe." + key), key
    with torch.no_grad():
        state["deepspeed_moe.gate.selection_bias"] = torch.arange(4.0)
    old = {("deepspeed_moe.gate.expert_bias" if k.endswith("selection_bias") else k): v for k, v in state.items()}
    fresh = _layer(k=2, capacity_mode="tutel", expert_bias=True)
    fresh.deepspeed_moe.gate.configure(dataclasses.replace(fresh.deepspeed_moe.gate.options, router_bias=True))
    fresh.load_state_dict(old, strict=True)
    assert torch.equal(fresh.deepspeed_moe.gate.selection_bias, torch.arange(4.0))


def test_router_is_fp32_for_every_model_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        layer = _layer(k=2, capacity_mode="tutel").to(dtype)
        out, l_aux, _ = layer(torch.randn(12, M, dtype=dtype))
        r = layer.deepspeed_moe.last_routing
        assert out.dtype == dtype and l_aux.dtype == torch.float32
        assert r.probs_SE.dtype == torch.float32 and r.gates_SK.dtype == torch.float32


def test_tutel_options_rejected_in_deepspeed_mode():
    with pytest.raises(ValueError, match="capacity_mode='tutel'"):
        _layer(batch_prioritized_routing=True)
    with pytest.raises(ValueError, match="capacity_mode='tutel'"):
        _layer(capacity_factor=-1.0)
    with pytest.raises(ValueError, match="aux_loss"):
        _layer(aux_loss="l2")


def test_from_config_reads_the_json_section(tmp_path):
    import json
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 8, "ds_tutel": {
        "num_experts": 4, "k": 2, "capacity_mode": "tutel", "capacity_factor": 0, "aux_loss": "switch"}}))
    layer = ds_tutel.MoE.from_config(str(path), M, expert_ffn(M), k=1)
    gate = layer.deepspeed_moe.gate
    assert layer.num_experts == 4 and gate.k == 1 and gate.options.aux_loss == "switch"
    assert gate.options.capacity_mode == "tutel" and gate.capacity_factor == 0
    with pytest.raises(ValueError, match="unknown keys"):
        ds_tutel.MoE.from_config({"ds_tutel": {"num_expert": 4}}, M, expert_ffn(M))


def test_stats_collector_jsonl_plot_and_monitor(tmp_path):
    import json
    from torch import nn

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = _layer(k=2)
            self.b = _layer(k=1, capacity_factor=0.5)

    model = Two()
    collector = ds_tutel.StatsCollector(model)
    events = []

    class Monitor:
        enabled = True

        def write_events(self, ev):
            events.extend(ev)

    for step in range(3):
        x = torch.randn(16, M)
        model.a(x), model.b(x)
        rows = collector.collect(step)
        collector.to_monitor(Monitor(), rows)
    assert [r["layer"] for r in collector.rows[:2]] == ["a", "b"]
    row_b = collector.rows[1]
    assert row_b["dropped_fraction"] > 0 and sum(row_b["load"]) <= 16
    assert math.isclose(row_b["dropped_fraction"], 1 - sum(row_b["load"]) / 16)
    collector.write_jsonl(str(tmp_path / "stats.jsonl"))
    lines = (tmp_path / "stats.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[-1])["step"] == 2
    collector.plot(str(tmp_path / "load.png"))
    assert (tmp_path / "load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ("ds_tutel/b/dropped_fraction", row_b["dropped_fraction"], 0) in events
    unkept = collector.collect(3, keep=False)  # what a monitor-only job collects: nothing stored
    assert [r["layer"] for r in unkept] == ["a", "b"] and len(collector.rows) == 6
