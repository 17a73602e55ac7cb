"""Resident memory over many training steps on the CPU, per implementation, each in a new interpreter: a
regression check that the CPU machinery (per-shape caches, row buckets, compiled loops) keeps memory flat.

benchmarks/memory.py takes the peak over a few steps. A cost paid per new tensor shape shows only over a long
run: oneDNN compiles and keeps a primitive for every shape it has not seen (CPU bf16 matmuls, and GELU where
oneDNN runs it), and ours' experts see new row counts step after step, where DeepSpeed's always see C rows.
Here each implementation steps on a new batch every step (forward+backward, gradients set to None first, as
`zero_grad` does) and reports its resident set after chosen steps, so growth that never stops is visible.

    python benchmarks/cpu/rss_over_steps.py --point 2,1.0,16,512,bf16 --steps 200

Shape legend: S tokens, M model dim, E experts.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.fresh_process import FreshProcesses  # noqa: E402
from benchmarks.layer_impls import IMPLEMENTATIONS, Point, parse_point  # noqa: E402

_MB = 1 << 20


def checkpoints(steps: int) -> List[int]:
    """The step counts after which the resident set is read: 1, 2, 5, 10, 20, 50, ... and the last."""
    marks, scale = [], 1
    while scale <= steps:
        marks += [m * scale for m in (1, 2, 5) if m * scale <= steps]
        scale *= 10
    return sorted(set(marks + [steps]))


def rss_probe(point: Point, impl: str, steps: int) -> Dict[int, float]:
    """Runs in the child: {step count: resident MB after that many steps}."""
    import torch

    from benchmarks.layer_impls import build_layer, fresh_batch, layer_step, make_inputs
    from benchmarks.memory import _host_bytes

    device = torch.device("cpu")
    layer = build_layer(impl, point, device)
    _, dy_SM = make_inputs(point, device)
    marks = set(checkpoints(steps))
    resident = {}
    for step in range(1, steps + 1):
        layer_step(layer, fresh_batch(point, device, step), dy_SM)
        if step in marks:
            resident[step] = _host_bytes(peak=False) / _MB
    return resident


def rss_over_steps(point: Point, impls: List[str], steps: int,
                   timeout: float = 3600.0) -> Dict[str, Dict[int, float]]:
    """{implementation: {step count: resident MB}}, one new interpreter per implementation."""
    processes = FreshProcesses(spawn=True)
    return {impl: processes.call_on_point(rss_probe, point, 1, impl, steps, timeout=timeout,
                                          what=f"resident memory of {impl} at {point.key}")
            for impl in impls}


def table(point: Point, results: Dict[str, Dict[int, float]]) -> str:
    marks = sorted(next(iter(results.values())))
    lines = [f"resident MB after n steps at {point.key} (one new interpreter per implementation, new batch per step)",
             "| implementation | " + " | ".join(str(m) for m in marks) + " |",
             "|---|" + "---|" * len(marks)]
    lines += [f"| {impl} | " + " | ".join(f"{results[impl][m]:.0f}" for m in marks) + " |" for impl in results]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--point", default="2,1.0,16,512,bf16", help="k,cf,E,M,dtype (tokens as bench_layer)")
    parser.add_argument("--tokens", type=int, default=0, help="tokens per step (default: bench_layer's for M)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
    args = parser.parse_args(argv)
    point = parse_point(args.point, args.tokens)
    print(table(point, rss_over_steps(point, args.impls.split(","), args.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
