"""The MoE layer, forward+backward: ds_tutel.MoE against DeepSpeed's installed MoE and the two floors.

    python benchmarks/bench_layer.py --quick            small grid, a few minutes on a small CPU machine
    python benchmarks/bench_layer.py --full             the issue's whole grid (k 1,2,4; cf 1.0,1.25;
                                                        E 4..64; M 256..2048; fp32 and bf16)
    python benchmarks/bench_layer.py --smoke            two tiny points: the harness runs (seconds)
    python benchmarks/bench_layer.py --gpu --device cuda  GPU-sized points (S x M up to 2^27; layer_impls.gpu_grid)
    python benchmarks/bench_layer.py --correctness      tiny sizes: every implementation gives the same
                                                        output and gradients on the same weights (exit 1 if not)
    python benchmarks/bench_layer.py --profile          where each layer's time goes on one point (--point)
    python benchmarks/bench_layer.py --redraw F.json    rewrite the markdown and PNG of a saved result
    ... --device cuda                                   the same on a GPU (CUDA events, allocator peaks)
    ... --dtypes fp32                                   only the grid's fp32 points (on CPUs without AVX-512 BF16,
                                                        bf16 matmuls run in ATen's own loops and a step takes seconds)

Per point, both layers hold identical weights and the same expert module (Linear(M, 2M) -> GELU ->
Linear(2M, M)), see the same tokens and output gradient, and run interleaved (ours, deepspeed, floor, ours,
...) after warm-up; medians are reported, and every ratio is taken within one run. Floors (benchmarks/floors.py):
the expert FFNs alone on exactly the routed tokens, and the bytes dispatch must move at the measured copy
bandwidth. Peak memory per implementation comes from separate processes (benchmarks/memory.py), step time on
2 and 4 expert-parallel CPU ranks from spawned gloo ranks (benchmarks/layer_multirank.py). The grids and the
layers live in benchmarks/layer_impls.py, the environment record and the reports in benchmarks/layer_report.py.

Writes benchmarks/results/<tag>.json, <tag>.md and <tag>.png (tag: layer_quick, layer_full, ...; a cuda run
appends _cuda). Methodology and how to read the table: docs/BENCHMARKS.md.

Shape legend: S tokens, M model dim, E experts, K choices per token.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
from dataclasses import asdict, replace
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.fresh_process import FreshProcesses  # noqa: E402
from benchmarks.floors import copy_bandwidth, dispatch_bytes, floor_output, router_products_seconds  # noqa: E402
from benchmarks.layer_impls import (DTYPES, IMPLEMENTATIONS, OURS_OPTIONS_ENV, Grid, Point,  # noqa: E402, F401
                                    build_layers, full_grid, gpu_grid, layer_step, make_inputs, ours_options,
                                    parse_point, quick_grid, smoke_grid, timed_steps, tokens_for)
from benchmarks.layer_report import RESULTS_DIR, environment  # noqa: E402
from benchmarks.timing import geomean, interleaved, median, paired_ratio, ratio_quartiles  # noqa: E402


def only_dtypes(grid: Grid, dtypes: List[str]) -> Grid:
    """The grid less its points in other dtypes (timing, memory and multi-rank alike); the grid itself where that
    leaves out none."""
    unknown = set(dtypes) - set(DTYPES)
    if unknown or not dtypes:
        raise SystemExit(f"--dtypes: unknown {sorted(unknown)}; choose among {sorted(DTYPES)}")
    if {p.dtype for p in grid.points} <= set(dtypes):
        return grid
    return _points_kept(grid, lambda p: p.dtype in dtypes, dtypes=list(dtypes))


def _points_kept(grid: Grid, keep: Callable[[Point], bool], **changes) -> Grid:
    """The grid with only the points `keep` accepts, in timing, memory and multi-rank alike, and `changes`."""
    def kept(points: List[Point]) -> List[Point]:
        return [p for p in points if keep(p)]
    return replace(grid, points=kept(grid.points), memory_points=kept(grid.memory_points),
                   multirank_points=kept(grid.multirank_points), **changes)


def parse_options(pairs: List[str]) -> Dict:
    """["a2a_send=capacity", "a2a_auto_threshold=0"] -> {...}; a value is JSON where it parses, else a
    string. The keys are checked when ours is built (ds_tutel.MoE rejects unknown or bad ones)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--ours-option: expected KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def only_matching(grid: Grid, pattern: str) -> Grid:
    """The grid less its points whose key (k2_cf1_E16_M256_S2048_bf16, ...) does not match the regular expression
    `pattern` (re.search), in timing, memory and multi-rank alike: a subset rerun with more rounds."""
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise SystemExit(f"--only: {pattern!r} is not a regular expression ({err})")
    cut = _points_kept(grid, lambda p: regex.search(p.key) is not None, only=pattern)
    if not (cut.points or cut.memory_points or cut.multirank_points):
        raise SystemExit(f"--only: no point of the grid matches {pattern!r}")
    return cut


def correctness_points() -> List[Point]:
    """Tiny shapes for the correctness mode (and the test suite)."""
    fp32 = [Point(k, cf, E, model_dim=16, tokens=64) for k, cf, E in itertools.product([1, 2, 4], [1.0, 1.25], [4, 8])]
    bf16 = [Point(k, 1.0, 8, model_dim=16, tokens=64, dtype="bf16") for k in (1, 2, 4)]
    return fp32 + bf16


def measure_point(point: Point, device: torch.device, grid: Grid, bandwidth_Bps: float) -> Dict:
    """Interleaved median step times of both layers and the expert-FFN floor, plus the bytes floor."""
    steps = timed_steps(point, device, tokens=grid.tokens)
    times = interleaved(steps.fns, device, warmup=grid.warmup, reps=grid.reps, budget_s=grid.budget_s,
                        min_reps=min(5, grid.reps), prepare=steps.prepare, before_round=steps.before_round,
                        orders=steps.orders)
    med = {name: median(t) for name, t in times.items()}
    kept_choices = int(median(steps.kept_choices))
    bytes_floor_s = dispatch_bytes(kept_choices, point.model_dim, point.torch_dtype) / bandwidth_Bps
    floor_plus_bytes = [f + bytes_floor_s for f in times["floor"]]
    router_floor_s = router_products_seconds(point.tokens, point.model_dim, point.num_experts, point.torch_dtype,
                                             device)
    return {"key": point.key, "point": asdict(point), "capacity": steps.routing.capacity, "tokens": grid.tokens,
            "kept_choices": kept_choices, "times_s": times, "median_s": med, "bytes_floor_s": bytes_floor_s,
            "router_floor_s": router_floor_s, "ours_over_deepspeed": paired_ratio(times["ours"], times["deepspeed"]),
            "ours_over_deepspeed_quartiles": ratio_quartiles(times["ours"], times["deepspeed"]),
            "ours_over_floor": paired_ratio(times["ours"], times["floor"]),
            "deepspeed_over_floor": paired_ratio(times["deepspeed"], times["floor"]),
            "ours_over_floor_plus_bytes": paired_ratio(times["ours"], floor_plus_bytes), "pid": os.getpid()}


def check_point(point: Point) -> List[str]:
    """Differences between the implementations (and the floor's recombined output) on one tiny point."""
    device = torch.device("cpu")
    layers = build_layers(point, device, share_experts=False)
    x_SM, dy_SM = make_inputs(point, device)
    runs = {}
    for name, layer in layers.items():
        y_SM, l_aux, dx_SM = layer_step(layer, x_SM, dy_SM)
        grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.grad is not None}
        runs[name] = {"output": y_SM, "l_aux": l_aux, "input grad": dx_SM, **{f"grad {n}": g for n, g in grads.items()}}
    tol = dict(atol=1e-5, rtol=1e-4) if point.dtype == "fp32" else dict(atol=1e-2, rtol=2e-2)
    problems = []
    reference = runs["deepspeed"]
    for name, run in runs.items():
        if run.keys() != reference.keys():
            problems.append(f"{point.key}: {name} has gradients for {sorted(run.keys() ^ reference.keys())} "
                            "where deepspeed differs")
        for what in reference.keys() & run.keys():
            if not torch.allclose(run[what].float(), reference[what].float(), **tol):
                err = (run[what].float() - reference[what].float()).abs().max().item()
                problems.append(f"{point.key}: {name} {what} differs from deepspeed's (max abs err {err:.3g})")
    ours = layers["ours"]
    y_floor_SM = floor_output(list(ours.deepspeed_moe.experts.deepspeed_experts), ours.deepspeed_moe.last_routing,
                              x_SM)
    if not torch.allclose(y_floor_SM.float(), runs["ours"]["output"].float(), **tol):
        problems.append(f"{point.key}: the floor's experts on the routed tokens do not recombine to the output")
    return problems


def correctness(points: Optional[List[Point]] = None, multirank: bool = False, log=print) -> List[str]:
    """Checks every point (and, with multirank, 2 expert-parallel ranks); returns the problems found.

    Runs on one thread: at these sizes a second thread only adds synchronisation on a busy machine.
    """
    problems = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for point in points or correctness_points():
            problems += check_point(point)
    finally:
        torch.set_num_threads(threads)
    if multirank:
        from benchmarks.layer_multirank import multirank_times
        rows = multirank_times([Point(2, 1.0, 4, model_dim=16, tokens=32)], [2], warmup=1, reps=1, log=log)
        problems += [f"ranks {r['world_size']} {r['key']}: outputs differ" for r in rows if not r["equal"]]
    return problems


def run(grid: Grid, device: torch.device, memory: bool, multirank: bool, same_process: bool = False,
        log=print) -> Dict:
    """Measures the whole grid; returns the result document (see docs/BENCHMARKS.md for its fields).

    Each point runs in a fresh process unless same_process: on the CPU the allocator's state left by earlier
    points moves a layer's time, differently for each layer (docs/BENCHMARKS.md).
    """
    env = environment(device, torch.get_num_threads())  # at the start: the revision the children import
    bandwidth = copy_bandwidth(device)
    log(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    processes = None if same_process else FreshProcesses()
    rows = []
    for i, point in enumerate(grid.points):
        if processes is None:
            row = measure_point(point, device, grid, bandwidth)
        else:
            row = processes.call_on_point(measure_point, point, torch.get_num_threads(), device, grid,
                                          bandwidth, what=f"point {point.key}")
        rows.append(row)
        med = row["median_s"]
        log(f"[{i + 1}/{len(grid.points)}] {point.key}: ours {1e3 * med['ours']:.1f} ms, deepspeed "
            f"{1e3 * med['deepspeed']:.1f} ms, floor {1e3 * med['floor']:.1f} ms, bytes floor "
            f"{1e3 * row['bytes_floor_s']:.2f} ms | ours/ds {row['ours_over_deepspeed']:.3f} ours/floor "
            f"{row['ours_over_floor']:.3f} ds/floor {row['deepspeed_over_floor']:.3f}")
    doc = {"environment": env, "copy_bandwidth_Bps": bandwidth,
           "same_process": same_process, "tokens": grid.tokens,
           "rows": rows, "geomean_ours_over_deepspeed": geomean([r["ours_over_deepspeed"] for r in rows])}
    if memory and grid.memory_points:
        from benchmarks.memory import peak_memory
        doc["memory"] = peak_memory(grid.memory_points, list(IMPLEMENTATIONS), device.type, log=log)
    if multirank and grid.multirank_points and device.type == "cpu":
        from benchmarks.layer_multirank import multirank_times
        doc["multirank"] = multirank_times(grid.multirank_points, grid.world_sizes, warmup=grid.warmup,
                                           reps=grid.reps, log=log)
    return doc


FFN_OPS = ("aten::mm", "aten::addmm", "aten::gelu", "aten::gelu_backward")


def _profile_once(fn, device: torch.device) -> Tuple[Dict[str, Tuple[float, int]], object]:
    """{op name: (self time in ms, calls)} of one call of fn, and the profiler."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        fn()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {e.key: (getattr(e, attr) / 1e3, e.count) for e in prof.key_averages()}, prof


def profile(point: Point, device: torch.device, steps: int = 5, top: int = 15) -> str:
    """Where each layer's time goes on one point: the operators whose self time most exceeds the expert-FFN
    floor's (per step, medians over `steps` interleaved profiled steps), then torch.profiler's own table of each
    layer's last step."""
    fns = timed_steps(point, device).fns
    wall = {name: median(t) for name, t in interleaved(fns, device, warmup=2, reps=steps, min_reps=steps).items()}
    samples: Dict[str, List[Dict[str, Tuple[float, int]]]] = {name: [] for name in fns}
    profs = {}
    for _ in range(steps):
        for name, fn in fns.items():
            ops, profs[name] = _profile_once(fn, device)
            samples[name].append(ops)
    names = set().union(*(ops for runs in samples.values() for ops in runs))
    ops = {impl: {op: (median([run.get(op, (0.0, 0))[0] for run in runs]), runs[-1].get(op, (0.0, 0))[1])
                  for op in names} for impl, runs in samples.items()}
    total = {impl: median([sum(t for t, _ in run.values()) for run in runs]) for impl, runs in samples.items()}
    ffn = {impl: sum(ops[impl][op][0] for op in FFN_OPS if op in ops[impl]) for impl in ops}
    calls = {impl: sum(c for _, c in ops[impl].values() if c) for impl in ops}
    report = [f"profile of {point.key}, median of {steps} interleaved steps, {torch.get_num_threads()} thread(s), "
              f"device {device}",
              "wall time per step, unprofiled (ms): " + ", ".join(f"{n} {1e3 * t:.1f}" for n, t in wall.items()),
              "operator self time per step (ms): " + ", ".join(f"{n} {t:.1f}" for n, t in total.items()),
              f"  of which expert FFN operators ({', '.join(FFN_OPS)}): "
              + ", ".join(f"{n} {t:.1f}" for n, t in ffn.items()),
              "  all other operators: " + ", ".join(f"{n} {total[n] - ffn[n]:.1f}" for n in total),
              "operator calls per step: " + ", ".join(f"{n} {c}" for n, c in calls.items()), "",
              "operators by excess over the floor (ms per step; calls per step):",
              f"{'operator':<55} {'ours':>8} {'deepspeed':>10} {'floor':>8}   calls o/d/f"]
    excess = sorted(names, key=lambda n: ops["floor"][n][0] - max(ops["ours"][n][0], ops["deepspeed"][n][0]))
    for name in excess[:top]:
        o, d, f = (ops[k][name] for k in ("ours", "deepspeed", "floor"))
        report.append(f"{name[:55]:<55} {o[0]:>8.2f} {d[0]:>10.2f} {f[0]:>8.2f}   {o[1]}/{d[1]}/{f[1]}")
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name in ("ours", "deepspeed"):
        report += [f"\n== {name} ==", profs[name].key_averages().table(sort_by=sort_key, row_limit=top)]
    return "\n".join(report)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small grid (the default)")
    mode.add_argument("--full", action="store_true", help="the issue's whole grid")
    mode.add_argument("--smoke", action="store_true", help="two tiny points, no memory or multi-rank parts: checks "
                      "that the harness runs (seconds)")
    mode.add_argument("--gpu", action="store_true", help="GPU-sized points (S x M up to 2^27), for --device cuda")
    mode.add_argument("--correctness", action="store_true", help="equal outputs on equal weights, tiny sizes")
    mode.add_argument("--profile", action="store_true", help="profile both layers on one point")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on CPU (default 1: on a shared machine a multi-threaded region stalls "
                             "whenever one of its threads is descheduled; 0 = torch's choice)")
    parser.add_argument("--reps", type=int, default=0, help="timed rounds per point, all of them (default: the "
                        "grid's, cut short once a point has taken its time budget)")
    parser.add_argument("--ours-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a ds_tutel.MoE keyword argument for ours alone (repeatable; VALUE read as JSON where it "
                             "parses, else as a string), e.g. a2a_send=capacity")
    parser.add_argument("--only", default="", metavar="REGEX",
                        help="only the grid's points whose key matches (e.g. 'k2_cf1_.*bf16'), in every part")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-process peak memory probes")
    parser.add_argument("--no-multirank", action="store_true", help="skip the expert-parallel runs")
    parser.add_argument("--same-process", action="store_true",
                        help="time every point in this process (default: a fresh process per point)")
    parser.add_argument("--fixed-tokens", action="store_true",
                        help="one batch of tokens for every step (default: a new batch every round, as in training, "
                             "so per-expert row counts change from step to step)")
    parser.add_argument("--max-layer-gb", type=float, default=2.5,
                        help="--full skips points whose expert weights + gradients exceed this (default 2.5)")
    parser.add_argument("--dtypes", default="fp32,bf16",
                        help="only the grid's points in these dtypes (comma-separated; default both): on a CPU "
                             "without AVX-512 BF16 a bf16 step takes seconds, and the full grid would take hours")
    parser.add_argument("--point", default="2,1.0,16,512,fp32", help="--profile's point: k,cf,E,M,dtype")
    parser.add_argument("--tag", default="", help="output name under benchmarks/results (default: layer_<mode>)")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--redraw", metavar="JSON", help="rewrite the markdown and PNG of a saved result")
    args = parser.parse_args(argv)
    if args.ours_option:
        os.environ[OURS_OPTIONS_ENV] = json.dumps(parse_options(args.ours_option))
    # Before anything imports DeepSpeed (it picks its accelerator once, at import).
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    suffix = "_cuda" if device.type == "cuda" else ""

    if args.redraw:
        from benchmarks.layer_report import write_outputs
        with open(args.redraw) as f:
            doc = json.load(f)
        tag = os.path.splitext(os.path.basename(args.redraw))[0]
        print("wrote " + ", ".join(write_outputs(doc, os.path.dirname(os.path.abspath(args.redraw)), tag)))
        return 0
    if args.correctness:
        problems = correctness(multirank=device.type == "cpu")
        print("\n".join(problems) if problems else f"all implementations agree on {len(correctness_points())} "
              "points (and on 2 expert-parallel ranks)")
        return 1 if problems else 0
    if args.profile:
        text = profile(parse_point(args.point), device)
        print(text)
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, f"{args.tag or 'layer_profile'}{suffix}.txt"), "w") as f:
            f.write(text + "\n")
        return 0
    if args.full:
        grid = full_grid(int(args.max_layer_gb * (1 << 30)))
    elif args.smoke:
        grid = smoke_grid()
    elif args.gpu:
        grid = gpu_grid()
    else:
        grid = quick_grid()
    grid = only_dtypes(grid, [d for d in args.dtypes.split(",") if d])
    if args.only:
        grid = only_matching(grid, args.only)
    if args.reps:
        grid.reps, grid.budget_s = args.reps, None
    if args.fixed_tokens:
        grid.tokens = "fixed"
    doc = run(grid, device, memory=not args.no_memory, multirank=not args.no_multirank,
              same_process=args.same_process)
    doc["mode"] = "full" if args.full else "smoke" if args.smoke else "gpu" if args.gpu else "quick"
    if grid.dtypes:
        doc["dtypes"] = grid.dtypes
    if grid.only:
        doc["only"] = grid.only
    if ours_options():
        doc["ours_options"] = ours_options()
    from benchmarks.layer_report import write_outputs
    default_tag = (f"layer_{doc['mode']}" + "".join(f"_{d}" for d in grid.dtypes)
                   + ("_" + re.sub(r"\W+", "_", grid.only).strip("_") if grid.only else "")
                   + "".join(f"_{k}_{v}" for k, v in ours_options().items()))
    paths = write_outputs(doc, args.out_dir, (args.tag or default_tag) + suffix)
    print("wrote " + ", ".join(os.path.relpath(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
