"""The grouped dispatch alone on the CPU: gather and combine, forward and backward, through the compiled loops and
through the torch-operator path, against the bytes they must move.

    python benchmarks/bench_dispatch.py           # the layer grid's capacity factor 1.0, k=2 shapes, bf16 and fp32
    python benchmarks/bench_dispatch.py --smoke   # two tiny shapes

For each shape: DeepSpeed's top-2 routing of random logits at capacity factor 1.0, one plan per path, then
x -> gather -> combine -> backward(dy) with the experts left out (the combine takes the gathered rows as they
are), so the step is the dispatch and nothing else. Both paths are first checked to give the same output and
token gradient bits, then timed interleaved (compiled, torch path, ...), medians of --reps rounds. The floor is
the bytes the dispatch must move (benchmarks/floors.py: dispatch_bytes) at the copy bandwidth measured in the
same run; a pass that runs at the floor moves its bytes as fast as a plain copy.

Shape legend: S tokens, M model dim, E experts, K choices per token.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.floors import copy_bandwidth, dispatch_bytes  # noqa: E402
from benchmarks.layer_impls import DTYPES, tokens_for  # noqa: E402
from benchmarks.layer_report import RESULTS_DIR, environment  # noqa: E402
from benchmarks.timing import interleaved, median  # noqa: E402
from ds_tutel.dispatch.grouped import grouped_decode, grouped_encode, grouped_plan  # noqa: E402
from ds_tutel.routing.deepspeed import route_deepspeed  # noqa: E402

# (S, M, E): shapes of the layer grid, with its tokens per model dim
FULL_SHAPES = [(tokens_for(M), M, E) for M, experts in ((256, (4, 16, 64)), (512, (4, 16, 64)), (1024, (4, 32)),
                                                        (2048, (8,))) for E in experts]
SMOKE_SHAPES = [(64, 32, 4), (48, 16, 3)]


def dispatch_step(S: int, M: int, E: int, dtype: torch.dtype, use_kernels: bool,
                  seed: int = 0) -> Tuple[Callable[[], Tuple[torch.Tensor, torch.Tensor]], int]:
    """A function running gather -> combine -> backward on one fixed routing, returning (y_SM, dx_SM), and the
    number of kept choices."""
    gen = torch.Generator().manual_seed(seed)
    routing = route_deepspeed(torch.randn(S, E, generator=gen), k=2, capacity_factor=1.0, min_capacity=0)[0]
    routing.gates_SK = routing.gates_SK.float()
    plan = grouped_plan(routing, use_kernels=use_kernels)
    x0_SM = torch.randn(S, M, generator=gen).to(dtype)
    dy_SM = torch.randn(S, M, generator=gen).to(dtype)

    def step() -> Tuple[torch.Tensor, torch.Tensor]:
        x_SM = x0_SM.detach().requires_grad_(True)
        y_SM = grouped_decode(list(grouped_encode(x_SM, plan)), plan)
        y_SM.backward(dy_SM)
        return y_SM.detach(), x_SM.grad

    return step, int(routing.kept_SK.sum())


def measure(S: int, M: int, E: int, dtype_name: str, reps: int, bandwidth_Bps: float) -> Dict:
    """One shape: both paths checked for equal bits, then timed interleaved."""
    dtype = DTYPES[dtype_name]
    compiled, kept = dispatch_step(S, M, E, dtype, use_kernels=True)
    torch_path, _ = dispatch_step(S, M, E, dtype, use_kernels=False)
    for a, b in zip(compiled(), torch_path()):
        if not torch.equal(a, b):
            raise AssertionError(f"S={S} M={M} E={E} {dtype_name}: the compiled loops and the torch path differ")
    times = interleaved({"compiled": compiled, "torch": torch_path}, torch.device("cpu"), warmup=3, reps=reps,
                        min_reps=reps)
    compiled_s, torch_s = median(times["compiled"]), median(times["torch"])
    bytes_s = dispatch_bytes(kept, M, dtype) / bandwidth_Bps
    return {"S": S, "M": M, "E": E, "dtype": dtype_name, "kept_choices": kept, "compiled_s": compiled_s,
            "torch_s": torch_s, "bytes_floor_s": bytes_s, "compiled_over_bytes": compiled_s / bytes_s,
            "torch_over_compiled": torch_s / compiled_s}


def table(rows: List[Dict]) -> str:
    lines = ["| S, M, E | dtype | kept | compiled ms | torch path ms | bytes floor ms | compiled / floor | "
             "torch path / compiled |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['S']}, {r['M']}, {r['E']} | {r['dtype']} | {r['kept_choices']} | "
                     f"{1e3 * r['compiled_s']:.3f} | {1e3 * r['torch_s']:.3f} | {1e3 * r['bytes_floor_s']:.3f} | "
                     f"{r['compiled_over_bytes']:.2f} | {r['torch_over_compiled']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="two tiny shapes, a few rounds")
    parser.add_argument("--reps", type=int, default=0, help="timed rounds per shape (default 41; smoke 3)")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--tag", default="", help="write results/<tag>.json and .md (default: print only)")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"unknown dtypes {unknown}; choose from {sorted(DTYPES)}")
    torch.set_num_threads(1)
    reps = args.reps or (3 if args.smoke else 41)
    shapes = SMOKE_SHAPES if args.smoke else FULL_SHAPES
    bandwidth = copy_bandwidth(torch.device("cpu"), nbytes=(1 << 20) if args.smoke else (128 << 20))
    rows = [measure(S, M, E, d, reps, bandwidth) for d in dtypes for S, M, E in shapes]
    env = environment(torch.device("cpu"), threads=1)
    doc = {"environment": env, "copy_bandwidth_Bps": bandwidth, "reps": reps, "rows": rows}
    text = (f"Grouped dispatch alone (gather + combine, forward + backward), {env['date']}; {env['processor']} "
            f"({env['cpu_isa']}), torch {env['torch']}, 1 thread; copy bandwidth "
            f"{bandwidth / 1e9:.1f} GB/s, medians of {reps} rounds\n\n{table(rows)}\n")
    print(text)
    if args.tag:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, args.tag + ".json"), "w") as f:
            json.dump(doc, f, indent=1)
        with open(os.path.join(args.out_dir, args.tag + ".md"), "w") as f:
            f.write(text)
    return doc


if __name__ == "__main__":
    main()
