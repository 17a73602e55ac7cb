"""Step time of each implementation with expert parallelism on spawned CPU ranks (gloo, ep_size = ranks).

Every rank builds both layers with the same local weights (ours loads DeepSpeed's state dict; the experts are a
rank's own E / ranks experts), feeds its own tokens, and runs them interleaved. Each timed step starts after a
barrier; its time is the slowest rank's (one all-reduce of all samples at the end, outside the timing). The
first step also checks that both layers gave the same output on every rank.

Ranks are spawned with ds_tutel.ranks (one thread per rank, DS_ACCELERATOR=cpu).

    python benchmarks/layer_multirank.py --quick     the quick grid's expert-parallel points alone (minutes)
    python benchmarks/layer_multirank.py --full      the full grid's (several times longer)

write benchmarks/results/<tag>.json and <tag>.md (tag: multirank_quick, multirank_full): the same table as
bench_layer.py's, without its single-rank grid, for changes that touch only the expert-parallel path.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.layer_impls import IMPLEMENTATIONS, Point  # noqa: E402

CAPACITY = "ours_capacity"  # ours with a2a_send="capacity": whole [E, C, M] buffers on the wire, as DeepSpeed's


def _rank_times(rank: int, world_size: int, point_fields: List[dict], warmup: int, reps: int) -> List[dict]:
    """Runs on every rank: per point, {impl: [slowest-rank seconds per step]} and the equality check."""
    import time

    import torch
    import torch.distributed as dist

    from benchmarks.layer_impls import build_layers, layer_step, make_inputs

    device = torch.device("cpu")
    rows = []
    for fields in point_fields:
        point = Point(**fields)
        layers = build_layers(point, device, seed=10, ep_size=world_size)
        # Ours once more with DeepSpeed's fixed-size messages: what sending only the kept rows saves.
        layers[CAPACITY] = build_layers(point, device, seed=10, ep_size=world_size,
                                        ours_extra={"a2a_send": "capacity"})["ours"]
        for layer in layers.values():
            layer.set_deepspeed_parallelism()
        strategies = {name: layers[name].deepspeed_moe.strategy(device) for name in ("ours", CAPACITY)}
        if strategies[CAPACITY] != "capacity":
            raise RuntimeError(f"{CAPACITY} runs the {strategies[CAPACITY]!r} strategy, not 'capacity'")
        x_SM, dy_SM = make_inputs(point, device, seed=rank)
        outputs = {name: layer_step(layer, x_SM, dy_SM)[0] for name, layer in layers.items()}
        tol = dict(atol=1e-2, rtol=1e-2) if point.dtype == "bf16" else dict(atol=1e-5, rtol=1e-4)
        equal = all(torch.allclose(outputs[name].float(), outputs["deepspeed"].float(), **tol)
                    for name in ("ours", CAPACITY))
        for _ in range(max(0, warmup - 1)):
            for layer in layers.values():
                layer_step(layer, x_SM, dy_SM)
        samples = {name: [] for name in layers}
        for i in range(reps):
            # The implementations take turns at going first, as in the single-rank timing (benchmarks/timing.py).
            names = list(layers)
            for name in names[i % len(names):] + names[:i % len(names)]:
                layer = layers[name]
                dist.barrier()
                start = time.perf_counter()
                layer_step(layer, x_SM, dy_SM)
                samples[name].append(time.perf_counter() - start)
        names = list(layers)
        times = torch.tensor([samples[n] for n in names], dtype=torch.float64)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        flags = torch.tensor([0.0 if equal else 1.0])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        rows.append({"point": fields, "times": {n: times[i].tolist() for i, n in enumerate(names)},
                     "equal": bool(flags.item() == 0.0), "strategies": strategies})
    return rows


def multirank_times(points: List[Point], world_sizes: List[int], warmup: int = 2, reps: int = 5,
                    timeout: float = 600.0, log=print) -> List[Dict]:
    """One row per (world size, point): per-implementation slowest-rank step times and whether outputs agreed."""
    from ds_tutel.ranks import run_local_ranks

    rows = []
    for world_size in world_sizes:
        usable = [p for p in points if p.num_experts % world_size == 0]
        results = run_local_ranks(_rank_times, world_size, [asdict(p) for p in usable], warmup, reps,
                                  timeout=timeout, threads_per_rank=1)
        for row in results[0]:
            row["world_size"] = world_size
            row["key"] = Point(**row["point"]).key
            rows.append(row)
            log(f"ranks {world_size} {row['key']}: " + ", ".join(
                f"{n} {1e3 * sorted(row['times'][n])[len(row['times'][n]) // 2]:.1f} ms"
                for n in (*IMPLEMENTATIONS, CAPACITY))
                + ("" if row["equal"] else "  OUTPUTS DIFFER"))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    from benchmarks.layer_impls import full_grid, quick_grid
    from benchmarks.layer_report import RESULTS_DIR, environment, multirank_lines

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    grid_choice = parser.add_mutually_exclusive_group()
    grid_choice.add_argument("--quick", action="store_true", help="the quick grid's points (the default)")
    grid_choice.add_argument("--full", action="store_true", help="the full grid's points")
    parser.add_argument("--reps", type=int, default=0, help="timed rounds per point (default: the grid's)")
    parser.add_argument("--tag", default="", help="output name under --out-dir (default: multirank_<grid>)")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    name = "full" if args.full else "quick"
    grid = full_grid(1 << 62) if args.full else quick_grid()
    env = environment(torch.device("cpu"), 1)
    rows = multirank_times(grid.multirank_points, grid.world_sizes, warmup=grid.warmup, reps=args.reps or grid.reps)
    doc = {"environment": env, "multirank": rows}
    tag = args.tag or f"multirank_{name}"
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, f"{tag}.json"), "w") as f:
        json.dump(doc, f, indent=1)
    header = (f"### Expert parallel alone ({name} grid's points)\n\n{env['date']}; {env['processor']} "
              f"({env['cpu_isa']}), {env['cpu_count']} cores; torch {env['torch']}, deepspeed {env['deepspeed']}; "
              f"ds_tutel at {env['ds_tutel_revision']}.\n")
    with open(os.path.join(args.out_dir, f"{tag}.md"), "w") as f:
        f.write(header + "\n" + "\n".join(multirank_lines(rows)) + "\n")
    print(f"wrote {tag}.json and {tag}.md under {args.out_dir}")
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
