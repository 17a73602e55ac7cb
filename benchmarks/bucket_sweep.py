"""Peak memory (and optionally step time) of ours against DeepSpeed's layer for several row-bucket granularities.

Where torch runs CPU bf16/fp16 matmuls through oneDNN, ours rounds each expert's row count up to one of
BUCKETS_PER_OCTAVE sizes per octave (ds_tutel/row_buckets.py), and oneDNN keeps the primitives it compiles
for every size it meets. Fewer sizes per octave keep fewer primitives but run more zero pad rows. This sweep
measures both sides of that trade on one shape: for each granularity, benchmarks/memory.py's peak probe (a new
interpreter per probe, median over hash seeds) and, with --time, bench_layer's interleaved timing. DeepSpeed's
layer has no buckets (its experts always see C rows); it is measured next to each granularity all the same, so
each ratio comes from one round of probes.

    python benchmarks/bucket_sweep.py --point 2,1.0,16,512,bf16 --per-octave 16,8,4,2 --time

The granularity is set inside each child before anything runs (the module constant row_buckets reads); the
library itself has no switch for it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.fresh_process import FreshProcesses  # noqa: E402
from benchmarks.layer_impls import Point  # noqa: E402

_MB = 1 << 20


def check_per_octave(per_octave: int) -> None:
    if per_octave < 1 or per_octave & (per_octave - 1):
        raise ValueError(f"buckets per octave must be a power of two >= 1, got {per_octave}")


def use_buckets_per_octave(per_octave: int) -> None:
    """Makes ds_tutel.row_buckets round to `per_octave` sizes per octave in this process (a power of two)."""
    check_per_octave(per_octave)
    from ds_tutel import row_buckets
    row_buckets.BUCKETS_PER_OCTAVE = per_octave


def probe_with_buckets(point: Point, per_octave: int, impl: str) -> Dict[str, float]:
    """Runs in the child: benchmarks.memory.probe with the granularity set first."""
    from benchmarks.memory import probe
    use_buckets_per_octave(per_octave)
    return probe(point, impl, "cpu")


def time_with_buckets(point: Point, per_octave: int, warmup: int, reps: int, budget_s: float) -> Dict:
    """Runs in the child: bench_layer.measure_point (ours, DeepSpeed, floor interleaved) with the granularity set."""
    import torch

    from benchmarks.bench_layer import Grid, measure_point
    from benchmarks.floors import copy_bandwidth
    use_buckets_per_octave(per_octave)
    device = torch.device("cpu")
    grid = Grid([point], [], [], warmup=warmup, reps=reps, budget_s=budget_s)
    return measure_point(point, device, grid, copy_bandwidth(device))


def sweep(point: Point, per_octave: List[int], seeds: int = 3, time: bool = False, warmup: int = 2,
          reps: int = 7, budget_s: float = 6.0, timeout: float = 600.0) -> Dict[int, Dict[str, float]]:
    """{per_octave: {"ours_MB", "deepspeed_MB", "memory_ratio", and with time: "ours_over_deepspeed",
    "ours_over_floor"}}; MB = peak over the baseline child's, median over `seeds` hash seeds."""
    processes = FreshProcesses(spawn=True)
    results: Dict[int, Dict[str, float]] = {}
    for n in per_octave:
        layer_MB: Dict[str, List[float]] = {"ours": [], "deepspeed": []}
        for seed in range(seeds):
            peaks = {impl: processes.call_on_point(probe_with_buckets, point, 1, n, impl, timeout=timeout,
                                                   what=f"{impl} at {n} buckets per octave", hash_seed=seed)
                     ["peak_bytes"] for impl in ("baseline", "ours", "deepspeed")}
            for impl in layer_MB:
                layer_MB[impl].append((peaks[impl] - peaks["baseline"]) / _MB)
        row = {"ours_MB": statistics.median(layer_MB["ours"]), "deepspeed_MB": statistics.median(layer_MB["deepspeed"])}
        row["memory_ratio"] = row["ours_MB"] / row["deepspeed_MB"]
        if time:
            timed = processes.call_on_point(time_with_buckets, point, 1, n, warmup, reps, budget_s, timeout=timeout,
                                            what=f"timing at {n} buckets per octave")
            row["ours_over_deepspeed"] = timed["ours_over_deepspeed"]
            row["ours_over_floor"] = timed["ours_over_floor"]
        results[n] = row
    return results


def table(point: Point, results: Dict[int, Dict[str, float]]) -> str:
    timed = any("ours_over_deepspeed" in row for row in results.values())
    head = "| buckets per octave | ours MB | DeepSpeed MB | memory ours/DS |" + (" ours/DS time | ours/floor |"
                                                                             if timed else "")
    lines = [f"{point.key}: peak RSS over a baseline interpreter (median over hash seeds)", "", head,
             "|---" * (6 if timed else 4) + "|"]
    for n, row in results.items():
        line = f"| {n} | {row['ours_MB']:.1f} | {row['deepspeed_MB']:.1f} | {row['memory_ratio']:.3f} |"
        if timed:
            line += f" {row['ours_over_deepspeed']:.3f} | {row['ours_over_floor']:.3f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    from benchmarks.onednn_cache import parse_point
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", default="2,1.0,16,512,bf16", help="k,cf,E,M,dtype")
    parser.add_argument("--per-octave", default="16,8,4,2", help="granularities to measure (powers of two)")
    parser.add_argument("--seeds", type=int, default=3, help="hash seeds (heap layouts) per memory probe")
    parser.add_argument("--time", action="store_true", help="also time ours, DeepSpeed and the floor interleaved")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    point = parse_point(args.point)
    per_octave = [int(n) for n in args.per_octave.split(",")]
    try:
        for n in per_octave:
            check_per_octave(n)
    except ValueError as error:
        parser.error(f"--per-octave: {error}")
    print(table(point, sweep(point, per_octave, seeds=args.seeds, time=args.time)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
