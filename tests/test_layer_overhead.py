"""benchmarks/layer_overhead.py: the stand-in really replaces the experts, and a child run end to end."""
import pytest
import torch

from benchmarks.layer_impls import build_layers, layer_step, make_inputs
from benchmarks.layer_impls import timed_steps
from benchmarks.layer_overhead import experts_passed_through, measure, summarize, table, untimed_preparations
from benchmarks.onednn_cache import parse_point


@pytest.mark.parametrize("name", ["ours", "deepspeed"])
def test_the_stand_in_skips_the_experts_only_within_its_block(name):
    point = parse_point("2,1.0,4,16,fp32", tokens=32)
    layers = build_layers(point, torch.device("cpu"), share_experts=False)
    layer = layers[name]
    x_SM, dy_SM = make_inputs(point, torch.device("cpu"))
    y_SM, _, _ = layer_step(layer, x_SM, dy_SM)
    expert_params = list(layer.deepspeed_moe.experts.parameters())
    assert all(p.grad is not None for p in expert_params)
    with experts_passed_through(layer):
        y_through_SM, _, dx_SM = layer_step(layer, x_SM, dy_SM)
    assert all(p.grad is None for p in expert_params) and dx_SM is not None
    layer_step(layers["ours"], x_SM, dy_SM)  # both layers route alike; ours' routing says which rows were kept
    routing = layers["ours"].deepspeed_moe.last_routing
    kept_SK = routing.locations_SK >= 0
    expected_SM = (routing.gates_SK * kept_SK).sum(1, keepdim=True) * x_SM  # every kept row comes back as it went
    torch.testing.assert_close(y_through_SM, expected_SM.to(y_through_SM.dtype))
    assert not {"_run_grouped", "forward"} & set(vars(layer.deepspeed_moe.experts))
    y_again_SM, _, _ = layer_step(layer, x_SM, dy_SM)
    assert torch.equal(y_again_SM, y_SM)


def test_the_stand_ins_steps_do_not_pay_for_freeing_the_experts_gradients():
    point = parse_point("2,1.0,4,16,fp32", tokens=32)
    steps = timed_steps(point, torch.device("cpu"), tokens="fresh")
    prepare = untimed_preparations(steps)
    assert prepare["floor"] is steps.prepare["floor"]
    for name in ("ours", "deepspeed"):
        steps.fns[name]()
        expert_params = list(steps.layers[name].deepspeed_moe.experts.parameters())
        assert all(p.grad is not None for p in expert_params)
        prepare[f"{name}_without_experts"]()
        assert all(p.grad is None for p in expert_params)


def test_summary_takes_medians_and_per_round_shares():
    times = {"ours": [0.012, 0.011, 0.030], "ours_without_experts": [0.002, 0.003, 0.003],
             "deepspeed": [0.015, 0.013, 0.040], "deepspeed_without_experts": [0.004, 0.004, 0.004],
             "floor": [0.010, 0.010, 0.020]}
    row = summarize(times)
    assert row["ours_ms"] == pytest.approx(12.0) and row["floor_ms"] == pytest.approx(10.0)
    assert row["deepspeed_without_experts_ms"] == pytest.approx(4.0)
    assert row["ours_besides_experts_over_floor"] == pytest.approx(0.2)  # median of 0.2, 0.3, 0.15
    assert row["deepspeed_besides_experts_over_floor"] == pytest.approx(0.4)  # median of 0.4, 0.4, 0.2
    assert row["ours_over_floor"] == pytest.approx(1.2)  # median of 1.2, 1.1, 1.5
    assert row["deepspeed_over_floor"] == pytest.approx(1.5)  # median of 1.5, 1.3, 2.0


def test_a_child_times_every_candidate():
    point = parse_point("2,1.0,4,32,bf16", tokens=64)
    results = measure([point], warmup=1, rounds=2, timeout=300)
    row = results[point.key]
    for name in ("ours", "ours_without_experts", "deepspeed", "deepspeed_without_experts", "floor"):
        assert row[f"{name}_ms"] > 0
    assert row["ours_besides_experts_over_floor"] > 0 and row["deepspeed_over_floor"] > 0
    assert point.key in table(results)
