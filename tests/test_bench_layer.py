"""The layer benchmark's correctness mode and outputs: equal results on equal weights, honest floors, well-formed
reports. Timings are never asserted."""
import json
import os

import pytest
import torch

import ds_tutel

from benchmarks import bench_layer
from benchmarks.floors import (dispatch_bytes, expert_work, floor_output, floor_step, router_products_seconds,
                               tokens_per_expert)
from benchmarks.layer_impls import Point, build_layers, layer_step, make_inputs
from benchmarks.layer_report import (ideal_over_deepspeed, ideal_over_floor, markdown, multirank_lines, router_share,
                                     targets, write_outputs)
from benchmarks.timing import interleaved, paired_ratio, ratio_quartiles

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_correctness_mode_every_implementation_agrees():
    """ours == DeepSpeed (outputs, l_aux, input and parameter gradients) on every tiny point, fp32 and bf16, the
    floor's experts recombine to the layer's output, and both layers agree on 2 expert-parallel ranks."""
    assert bench_layer.correctness(multirank=True, log=lambda *_: None) == []


def test_correctness_mode_notices_a_difference(monkeypatch):
    original = bench_layer.build_layers

    def perturbed(*args, **kwargs):
        built = original(*args, **kwargs)
        with torch.no_grad():
            built["ours"].deepspeed_moe.experts.deepspeed_experts[0][0].weight.mul_(1.01)
        return built

    monkeypatch.setattr(bench_layer, "build_layers", perturbed)
    problems = bench_layer.check_point(Point(2, 1.0, 4, model_dim=16, tokens=64))
    assert any("ours output differs" in p for p in problems)
    assert any("ours grad deepspeed_moe.gate.wg.weight differs" in p for p in problems)


def test_shared_experts_are_the_same_tensors_and_give_the_same_output():
    point = Point(2, 1.25, 4, model_dim=16, tokens=48)
    layers = build_layers(point, CPU)
    ours_params = dict(layers["ours"].named_parameters())
    for name, param in layers["deepspeed"].named_parameters():
        if ".experts." in name:
            assert ours_params[name] is param
    x_SM, dy_SM = make_inputs(point, CPU)
    torch.testing.assert_close(layer_step(layers["ours"], x_SM, dy_SM)[0],
                               layer_step(layers["deepspeed"], x_SM, dy_SM)[0])


def test_floor_runs_exactly_the_kept_choices():
    point = Point(2, 1.0, 8, model_dim=16, tokens=64)  # capacity 16 < some experts' demand: some choices drop
    layers = build_layers(point, CPU)
    ours = layers["ours"]
    x_SM, dy_SM = make_inputs(point, CPU)
    layer_step(ours, x_SM, dy_SM)
    routing = ours.deepspeed_moe.last_routing
    kept_E = routing.kept_per_expert()
    assert int(kept_E.sum()) < point.tokens * point.k
    tokens = tokens_per_expert(routing, point.num_experts)
    assert [t.numel() for t in tokens] == kept_E.tolist()
    work = expert_work(list(ours.deepspeed_moe.experts.deepspeed_experts), routing, x_SM, dy_SM)
    assert work.kept_choices == int(kept_E.sum())
    assert sum(x.shape[0] for x in work.inputs_nM) == work.kept_choices
    floor_step(work)
    assert all(x.grad is not None for x in work.inputs_nM)
    assert all(p.grad is not None for e in work.experts for p in e.parameters())
    y_SM = layer_step(ours, x_SM, dy_SM)[0]
    torch.testing.assert_close(floor_output(list(ours.deepspeed_moe.experts.deepspeed_experts), routing, x_SM), y_SM)
    assert dispatch_bytes(work.kept_choices, 16, torch.float32) == 8 * work.kept_choices * 16 * 4


@pytest.mark.parametrize("tokens", ["fresh", "fixed"])
def test_token_modes_give_both_layers_and_the_floor_the_same_batch_per_round(monkeypatch, tokens):
    """Per round: both layers and the floor on one batch (a new one per round in fresh mode), the floor on
    exactly ours' kept tokens of that batch, and the two layers taking turns at being first on it."""
    from benchmarks import floors, layer_impls
    seen = []  # (who, x_SM or the floor's work, ours' routing or None) per call, in call order
    real_step, real_floor = layer_impls.layer_step, floors.floor_step

    def recording_step(layer, x_SM, dy_SM):
        result = real_step(layer, x_SM, dy_SM)
        is_ours = isinstance(layer, ds_tutel.MoE)
        seen.append(("ours" if is_ours else "deepspeed", x_SM, layer.deepspeed_moe.last_routing if is_ours else None))
        return result

    def recording_floor(work):
        seen.append(("floor", work, None))
        return real_floor(work)

    monkeypatch.setattr(layer_impls, "layer_step", recording_step)
    monkeypatch.setattr(floors, "floor_step", recording_floor)
    point = Point(2, 1.0, 4, model_dim=16, tokens=48)
    steps = layer_impls.timed_steps(point, CPU, tokens=tokens)
    seen.clear()
    interleaved(steps.fns, CPU, warmup=0, reps=4, min_reps=4, prepare=steps.prepare, before_round=steps.before_round,
                orders=steps.orders)
    per_round = 4 if tokens == "fresh" else 3  # fresh: the floor's untimed warm-up step on the new work too
    assert len(seen) == 4 * per_round
    rounds = [seen[i:i + per_round] for i in range(0, len(seen), per_round)]
    assert [[who for who, _, _ in r if who != "floor"] for r in rounds] == [["ours", "deepspeed"],
                                                                            ["deepspeed", "ours"]] * 2
    xs = []
    for r in rounds:
        (ours_x, routing), = [(x, routing) for who, x, routing in r if who == "ours"]
        (ds_x,) = [x for who, x, _ in r if who == "deepspeed"]
        assert ds_x is ours_x  # DeepSpeed's layer steps on the round's batch
        assert [who for who, _, _ in r[-(per_round - 2):]] == ["floor"] * (per_round - 2)  # floors come last
        expected = [ours_x.index_select(0, t) for t in tokens_per_expert(routing, point.num_experts)]
        expected = torch.cat([e for e in expected if e.shape[0]])
        for _, work, _ in r[2:]:
            # The floor's work (a warm-up step and the timed one in fresh mode) holds this round's kept tokens.
            torch.testing.assert_close(torch.cat([x.detach() for x in work.inputs_nM]), expected, atol=0, rtol=0)
        xs.append(ours_x)
    distinct = len({x.data_ptr() for x in xs}) == 4 and not torch.equal(xs[0], xs[1])
    assert distinct == (tokens == "fresh")
    assert len(steps.kept_choices) == (5 if tokens == "fresh" else 1)


def test_interleaved_rejects_an_order_that_misses_a_candidate():
    with pytest.raises(ValueError, match="each candidate once"):
        interleaved({"a": lambda: None, "b": lambda: None}, CPU, warmup=0, reps=1, orders=[["a"]])


def test_paired_ratio_takes_the_median_of_per_round_ratios():
    assert paired_ratio([2.0, 10.0, 3.0], [1.0, 10.0, 2.0]) == 1.5
    assert ratio_quartiles([1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 5) == [2.0, 4.0]


@pytest.mark.parametrize("same_process", [False, True])
def test_a_tiny_run_writes_json_markdown_and_png(tmp_path, same_process):
    points = [Point(1, 1.0, 4, model_dim=16, tokens=32), Point(2, 1.0, 4, model_dim=16, tokens=32)]
    grid = bench_layer.Grid(points, memory_points=[], multirank_points=[], warmup=1, reps=3)
    doc = bench_layer.run(grid, CPU, memory=False, multirank=False, same_process=same_process,
                          log=lambda *_: None)
    pids = [row["pid"] for row in doc["rows"]]
    if same_process:
        assert pids == [os.getpid()] * len(points)
    else:  # every point in a process of its own
        assert os.getpid() not in pids and len(set(pids)) == len(points)
    doc["mode"] = "test"
    json_path, md_path, png_path = write_outputs(doc, str(tmp_path), "layer_test")
    saved = json.loads(open(json_path).read())
    assert [r["key"] for r in saved["rows"]] == [p.key for p in points]
    for row in saved["rows"]:
        assert set(row["median_s"]) == {"ours", "deepspeed", "floor"}
        assert all(len(t) == 3 for t in row["times_s"].values())
        assert row["bytes_floor_s"] > 0 and row["router_floor_s"] > 0 and row["ours_over_deepspeed"] > 0
    assert saved["environment"]["deepspeed"] and saved["environment"]["torch"]
    assert torch.backends.cpu.get_cpu_capability() in saved["environment"]["cpu_isa"]
    assert len(saved["targets"]) == 3 and all(isinstance(t["met"], bool) for t in saved["targets"])
    text = open(md_path).read()
    assert all(p.key in text for p in points) and "Geometric mean" in text
    assert open(png_path, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png_path) < 200_000


def test_a_grid_cut_to_one_dtype_keeps_only_its_points_and_says_so(tmp_path):
    full = bench_layer.full_grid(1 << 40)
    fp32 = bench_layer.only_dtypes(full, ["fp32"])
    for points, all_points in ((fp32.points, full.points), (fp32.memory_points, full.memory_points),
                               (fp32.multirank_points, full.multirank_points)):
        assert points == [p for p in all_points if p.dtype == "fp32"] and points
    assert len(fp32.points) * 2 == len(full.points)
    with pytest.raises(SystemExit, match="fp16"):
        bench_layer.only_dtypes(full, ["fp16"])
    assert bench_layer.main(["--smoke", "--dtypes", "fp32", "--same-process", "--out-dir", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "layer_smoke_fp32.json").read_text())
    assert saved["dtypes"] == ["fp32"] and [r["key"] for r in saved["rows"]] == [
        p.key for p in bench_layer.smoke_grid().points if p.dtype == "fp32"]
    assert "smoke grid, fp32 points only" in (tmp_path / "layer_smoke_fp32.md").read_text()


def test_a_grid_cut_to_matching_keys_keeps_only_those_points_everywhere(tmp_path):
    full = bench_layer.full_grid(1 << 40)
    cut = bench_layer.only_matching(full, r"k2_cf1_.*bf16")
    for points, all_points in ((cut.points, full.points), (cut.memory_points, full.memory_points),
                               (cut.multirank_points, full.multirank_points)):
        assert points == [p for p in all_points if p.k == 2 and p.capacity_factor == 1.0 and p.dtype == "bf16"]
    assert cut.points and cut.memory_points and not cut.multirank_points and cut.only == r"k2_cf1_.*bf16"
    with pytest.raises(SystemExit, match="not a regular expression"):
        bench_layer.only_matching(full, "k2_cf1_(")
    with pytest.raises(SystemExit, match="no point"):
        bench_layer.only_matching(full, "k3_")
    assert bench_layer.main(["--smoke", "--only", "bf16$", "--same-process", "--out-dir", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "layer_smoke_bf16.json").read_text())
    assert saved["only"] == "bf16$" and [r["key"] for r in saved["rows"]] == [
        p.key for p in bench_layer.smoke_grid().points if p.dtype == "bf16"]
    assert "points matching 'bf16$' only" in (tmp_path / "layer_smoke_bf16.md").read_text()


def test_ours_options_reach_ours_alone_and_are_said_in_the_report(monkeypatch, tmp_path):
    from benchmarks.layer_impls import OURS_OPTIONS_ENV, build_layer
    assert bench_layer.parse_options(["dispatch_backend=torch", "a2a_auto_threshold=0", 'a2a_send="capacity"']) == {
        "dispatch_backend": "torch", "a2a_auto_threshold": 0, "a2a_send": "capacity"}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        bench_layer.parse_options(["dispatch_backend"])
    point = bench_layer.smoke_grid().points[0]
    monkeypatch.setenv(OURS_OPTIONS_ENV, '{"dispatch_backend": "torch"}')
    ours, reference = build_layer("ours", point, CPU), build_layer("deepspeed", point, CPU)
    assert ours.deepspeed_moe.dispatch_backend == "torch"
    assert not hasattr(reference.deepspeed_moe, "dispatch_backend")
    # ours_extra goes over the run's options
    assert build_layer("ours", point, CPU, ours_extra={"dispatch_backend": "auto"}).deepspeed_moe.dispatch_backend \
        == "auto"
    monkeypatch.setenv(OURS_OPTIONS_ENV, "")  # main sets it for its children: undone after the test
    assert bench_layer.main(["--smoke", "--same-process", "--ours-option", "dispatch_backend=torch",
                             "--out-dir", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "layer_smoke_dispatch_backend_torch.json").read_text())
    assert saved["ours_options"] == {"dispatch_backend": "torch"}
    assert "Ours built with {'dispatch_backend': 'torch'}" in (
        tmp_path / "layer_smoke_dispatch_backend_torch.md").read_text()


def test_explicit_reps_run_every_round_whatever_the_time_budget(monkeypatch, tmp_path):
    grids = []
    monkeypatch.setattr(bench_layer, "run", lambda grid, *a, **kw: grids.append(grid) or {"rows": []})
    monkeypatch.setattr("benchmarks.layer_report.write_outputs", lambda doc, out_dir, tag: [])
    bench_layer.main(["--smoke", "--out-dir", str(tmp_path)])
    bench_layer.main(["--smoke", "--reps", "4", "--out-dir", str(tmp_path)])
    assert grids[0].budget_s == bench_layer.smoke_grid().budget_s and grids[0].reps == 3
    assert grids[1].budget_s is None and grids[1].reps == 4


def test_targets_read_memory_and_floor_rows():
    row = {"key": "a", "point": {"k": 2, "capacity_factor": 1.0}, "ours_over_deepspeed": 0.8,
           "ours_over_floor": 1.05, "deepspeed_over_floor": 1.3}
    doc = {"rows": [row], "memory": {"a": {"ours": {"layer_MB": 90.0}, "deepspeed": {"layer_MB": 100.0}}}}
    assert [t["met"] for t in targets(doc)] == [True, True, True, True]
    doc["rows"].append(dict(row, key="b", ours_over_deepspeed=1.1, ours_over_floor=1.2))
    doc["memory"]["b"] = {"ours": {"layer_MB": 101.0}, "deepspeed": {"layer_MB": 100.0}}
    assert [t["met"] for t in targets(doc)] == [False, False, False, False]


def test_never_slower_counts_the_points_slower_beyond_their_round_noise():
    def row(key, ratio, quartiles):
        return {"key": key, "point": {"k": 1, "capacity_factor": 1.0}, "ours_over_deepspeed": ratio,
                "ours_over_deepspeed_quartiles": quartiles, "ours_over_floor": 1.0}
    doc = {"rows": [row("a", 0.9, [0.85, 0.95]), row("b", 1.003, [0.96, 1.02]), row("c", 1.05, [1.01, 1.08])]}
    never_slower = targets(doc)[1]
    assert not never_slower["met"]  # the verdict reads the median ratio, noise or not
    assert "slower on 2 of 3 points, 1 of them with the first quartile" in never_slower["value"]


def test_ideal_layer_adds_the_routers_arithmetic_and_the_dispatch_bytes_to_the_floor():
    # Rows from before the router was measured: E=16, k=2, H=2*256, so the router's S*M*E multiply-adds
    # against k*S*2*M*H for the experts, at the experts' rate.
    point = {"k": 2, "num_experts": 16, "model_dim": 256, "hidden_mult": 2}
    assert router_share(point) == 1 / 128
    row = {"point": point, "median_s": {"floor": 0.080, "deepspeed": 0.100}, "bytes_floor_s": 0.001}
    assert abs(ideal_over_deepspeed(row) - (0.080 * (1 + 1 / 128) + 0.001) / 0.100) < 1e-12
    # With the router's products measured in the run, those seconds replace the estimate.
    row["router_floor_s"] = 0.004
    assert abs(ideal_over_deepspeed(row) - (0.080 + 0.004 + 0.001) / 0.100) < 1e-12
    assert abs(ideal_over_floor(row) - (0.080 + 0.004 + 0.001) / 0.080) < 1e-12
    cf1_k2 = {"key": "k2_cf1", "point": {**point, "capacity_factor": 1.0}, "ours_over_deepspeed": 0.9,
              "ours_over_floor": 1.2, **{name: row[name] for name in ("median_s", "bytes_floor_s", "router_floor_s")}}
    assert "an ideal layer: 1.062-1.062" in targets({"rows": [cf1_k2]})[2]["value"]


def test_router_products_take_longer_with_more_experts():
    small = router_products_seconds(512, 64, 2, torch.bfloat16, CPU, reps=5)
    large = router_products_seconds(512, 64, 256, torch.bfloat16, CPU, reps=5)
    assert 0 < small < large


def test_memory_probes_run_in_their_own_processes():
    """A baseline child and one child per implementation, a new interpreter each, round r under hash seed r (the
    heap layout the steps start on); the step's live peak includes the expert gradients. One implementation
    only: every new interpreter costs seconds, and DeepSpeed's layer runs the same probe (engine and RSS tests)."""
    from benchmarks.memory import peak_memory
    point = Point(2, 1.0, 4, model_dim=128, tokens=64)
    result = peak_memory([point], ["ours"], repeats=2, log=lambda *_: None)
    assert list(result) == [point.key] and list(result[point.key]) == ["ours"]
    for impl in ("ours",):
        probe = result[point.key][impl]
        assert set(probe) == {"layer_MB", "step_MB", "peak_MB", "live_MB", "layer_MB_range", "hash_seeds"}
        assert probe["hash_seeds"] == ["0", "1"]
        assert probe["live_MB"] >= point.expert_param_bytes() / 2**20
        assert probe["peak_MB"] > probe["layer_MB"] > 0
        low, high = probe["layer_MB_range"]
        assert low <= probe["layer_MB"] <= high


def test_engine_memory_trains_each_layer_through_deepspeed_in_a_process_of_its_own():
    from benchmarks.engine_memory import engine_memory
    from ds_tutel.launch.shm import deepspeed_shm_buffers
    point = Point(2, 1.0, 4, model_dim=16, tokens=32)
    results = engine_memory([point], ["ours", "deepspeed"], seeds=1, log=lambda *_: None)
    pids = set()
    for impl, row in results[point.key].items():
        (sample,) = row["samples"]
        assert sample["parameters_changed"] == sample["parameters"] > 0, impl  # every parameter took a step
        assert sample["peak_bytes"] >= sample["before_step_bytes"] > 0 and row["step_MB"] >= 0
        assert sample["hash_seed"] == "0"
        assert not deepspeed_shm_buffers("127.0.0.1", sample["master_port"])  # the child removed its buffers
        pids.add(sample["pid"])
    assert os.getpid() not in pids and len(pids) == 2


def test_spawned_children_get_their_own_hash_seed_and_forked_ones_refuse_one():
    """The seed reaches the child's environment and only its; forked children cannot have one (they share their
    server's heap), so asking is an error rather than a silently ignored setting."""
    from benchmarks.fresh_process import FreshProcesses
    before = os.environ.get("PYTHONHASHSEED")
    assert FreshProcesses(spawn=True).call(os.getenv, "PYTHONHASHSEED", hash_seed=7) == "7"
    assert os.environ.get("PYTHONHASHSEED") == before
    forked = FreshProcesses()
    if not forked.spawn:
        with pytest.raises(ValueError, match="spawn=True"):
            forked.call(os.getenv, "PYTHONHASHSEED", hash_seed=1)


def test_multirank_table_shows_the_capacity_column_only_where_it_was_measured():
    new = {"world_size": 2, "key": "k2_cf1_E8_M256_S512_fp32", "equal": True,
           "times": {"ours": [0.030, 0.032, 0.031], "ours_capacity": [0.036, 0.035, 0.034],
                     "deepspeed": [0.040, 0.040, 0.040]}}
    old = {"world_size": 4, "key": "k2_cf1_E8_M256_S512_fp32", "equal": False,
           "times": {"ours": [0.050], "deepspeed": [0.040]}}
    lines = multirank_lines([new])
    assert "ours sends the kept rows" in lines[0]
    assert lines[-1] == "| 2 | k2_cf1_E8_M256_S512_fp32 | 31.0 | 35.0 | 40.0 | 0.775 | 0.875 | yes |"
    lines = multirank_lines([old])
    assert "kept rows" not in lines[0]
    assert lines[-1] == "| 4 | k2_cf1_E8_M256_S512_fp32 | 50.0 |  | 40.0 | 1.250 |  | **no** |"
