"""oneDNN primitives created per step: what a layer pays on the CPU for every new tensor shape.

torch runs some CPU operators through oneDNN (fp32 and bf16 GELU, bf16 matmuls where the CPU has AVX-512 or
AMX). oneDNN compiles a primitive for each new shape and keeps it in a cache: the first call of a shape costs
the compilation, and the primitive's memory stays allocated. Ours gives each expert exactly its kept rows, so
routing brings new shapes step after step until the cache has seen them; DeepSpeed's layer runs every expert
on C rows and compiles once. Both costs are in benchmarks/RESULTS.md (twelfth session).

Each implementation runs in a child interpreter with ONEDNN_VERBOSE=all (oneDNN then prints one line per
primitive created, with "cache_miss" or "cache_hit" and the milliseconds it took, and one per execution);
this module counts the misses per step and the time spent creating them.

    python benchmarks/onednn_cache.py --point 2,1.0,8,256,fp32 --steps 16
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Counter, Iterable, List

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEP_MARK = "@@step "


@dataclass
class StepPrimitives:
    """One step's oneDNN primitives: created (cache misses), the milliseconds creating them, executions."""

    misses: int = 0
    create_ms: float = 0.0
    executions: int = 0
    kinds: Counter[str] = field(default_factory=collections.Counter)


def parse_verbose(lines: Iterable[str]) -> List[StepPrimitives]:
    """Per-step counts from a child's stdout: STEP_MARK lines open a step, oneDNN's verbose lines fill it (the
    primitive kind is the sixth field, the time the last)."""
    steps: List[StepPrimitives] = []
    for line in lines:
        if line.startswith(STEP_MARK):
            steps.append(StepPrimitives())
            continue
        if not steps or not line.startswith("onednn_verbose"):
            continue
        fields = line.rstrip().split(",")
        if "create:cache_miss" in fields:
            steps[-1].misses += 1
            steps[-1].create_ms += float(fields[-1])
            steps[-1].kinds[fields[5]] += 1
        elif "exec" in fields:
            steps[-1].executions += 1
    return steps


def run_child(point: str, impl: str, steps: int, tokens: int = 0) -> None:
    """In the child: one layer, `steps` forward+backward steps on new batches, a mark before each."""
    import torch
    from benchmarks.layer_impls import build_layer, fresh_batch, layer_step, make_inputs

    torch.set_num_threads(1)
    p = parse_point(point, tokens)
    device = torch.device("cpu")
    layer = build_layer(impl, p, device)
    x_SM, dy_SM = make_inputs(p, device)
    for i in range(steps):
        print(f"{STEP_MARK}{i}", flush=True)
        layer_step(layer, x_SM if i == 0 else fresh_batch(p, device, i), dy_SM)
    sys.stdout.flush()


def parse_point(text: str, tokens: int = 0):
    """"k,cf,E,M,dtype" as bench_layer's --point, with its token count for M unless `tokens` is given."""
    from benchmarks.bench_layer import _point

    k, cf, E, M, dtype = text.split(",")
    return _point(int(k), float(cf), int(E), int(M), dtype, tokens=tokens or None)


def measure(point: str, impl: str, steps: int, tokens: int = 0, timeout: float = 600.0) -> List[StepPrimitives]:
    """Runs the child and parses its output."""
    env = dict(os.environ, ONEDNN_VERBOSE="all")
    command = [sys.executable, os.path.abspath(__file__), "--child", impl, "--point", point, "--steps", str(steps),
               "--tokens", str(tokens)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} child failed:\n{done.stderr[-3000:]}")
    return parse_verbose(done.stdout.splitlines())


def summary(impl: str, steps: List[StepPrimitives], warmup: int) -> str:
    later = steps[warmup:]
    per_step = " ".join(str(s.misses) for s in steps)
    created = sum(s.misses for s in later) / max(1, len(later))
    create_ms = sum(s.create_ms for s in later) / max(1, len(later))
    executions = later[-1].executions if later else 0
    kinds = sum((s.kinds for s in steps), collections.Counter())
    return (f"{impl:10s} primitives created per step: {per_step}\n"
            f"{'':10s} after {warmup} warm-up steps: {created:.1f} created and {create_ms:.2f} ms creating per "
            f"step; executions per step {executions}; kinds {dict(kinds)}")


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--point", default="2,1.0,8,256,fp32", help="k,cf,E,M,dtype (tokens as bench_layer)")
    parser.add_argument("--tokens", type=int, default=0, help="tokens per step (default: bench_layer's for M)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--impls", default="ours,deepspeed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.point, args.child, args.steps, args.tokens)
        return 0
    print(f"oneDNN primitives at {parse_point(args.point, args.tokens).key}, {args.steps} steps on new batches, "
          "one thread")
    for impl in args.impls.split(","):
        print(summary(impl, measure(args.point, impl, args.steps, args.tokens), args.warmup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
