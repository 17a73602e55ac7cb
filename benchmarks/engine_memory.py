"""Peak memory of one MoE layer trained through the DeepSpeed engine, per implementation, each in a new interpreter.

benchmarks/memory.py measures the layer alone and sets the gradients to None before every step, as `zero_grad`
does. That leaves one heap hole per gradient. Activations whose sizes change every step (ours: each expert's
row count) can be carved out of those holes, and then the next backward grows the heap by all the gradients at
once (benchmarks/RESULTS.md). Here the layer is trained as users train it:
`deepspeed.initialize` with the project's deepspeed_config.json (ZeRO stage 2, contiguous gradients, AdamW),
one gloo rank, STEPS steps of forward, `engine.backward` and `engine.step`, each on a new batch.

Reported per implementation, medians over the hash seeds (one new interpreter each, as in memory.py):
  peak_MB: the child's peak resident set (weights, gradients, optimizer states, the steps);
  step_MB: that peak minus the resident set before the first step (the optimizer states are made in it).

    python benchmarks/engine_memory.py --point 4,1.25,32,512,fp32 --seeds 5

Shape legend: S tokens, M model dim, E experts, K choices per token.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.fresh_process import FreshProcesses  # noqa: E402
from benchmarks.layer_impls import IMPLEMENTATIONS, Point  # noqa: E402

_MB = 1 << 20
STEPS = 6
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deepspeed_config.json")


class LayerLoss(nn.Module):
    """The layer with the benchmark's loss, <y, dy> + 0.01 * l_aux, as the engine's model."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x_SM: torch.Tensor, dy_SM: torch.Tensor) -> torch.Tensor:
        y_SM, l_aux, _ = self.layer(x_SM)
        return (y_SM * dy_SM).sum() + 0.01 * l_aux


def engine_probe(point: Point, impl: str) -> Dict[str, float]:
    """Runs in the child: one layer in a DeepSpeed engine, STEPS training steps, peak and starting RSS."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from ds_tutel.train import engine as ds_engine

    own_world = "RANK" not in os.environ  # then init_distributed makes a world of one, on a free port
    ds_engine.init_distributed(timeout_s=300)
    try:
        return _train_steps(point, impl)
    finally:
        if own_world:  # DeepSpeed's CPU communication would leave its shared-memory buffers behind
            import torch.distributed as dist

            from ds_tutel.launch.shm import remove_deepspeed_shm_buffers
            dist.destroy_process_group()
            remove_deepspeed_shm_buffers(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])


def _train_steps(point: Point, impl: str) -> Dict[str, float]:
    """engine_probe's measurement, once the child's world is up."""
    from benchmarks.layer_impls import build_layer, fresh_batch, make_inputs
    from benchmarks.memory import _host_bytes, _reset_peak
    from ds_tutel.train import engine as ds_engine

    ds_engine.quiet_deepspeed()
    _reset_peak()
    cpu = torch.device("cpu")
    model = LayerLoss(build_layer(impl, point, cpu))
    start = [p.detach().clone() for p in model.parameters()]
    config = ds_engine.deepspeed_dict(ds_engine.load_config(CONFIG), "bf16" if point.dtype == "bf16" else "fp32",
                                      total_steps=STEPS)
    config["train_micro_batch_size_per_gpu"] = 1
    engine = ds_engine.build_engine(model, config)
    x_SM, dy_SM = make_inputs(point, cpu)
    before = _host_bytes(peak=False)
    for step in range(STEPS):
        batch_SM = x_SM if step == 0 else fresh_batch(point, cpu, step)
        engine.backward(engine(batch_SM, dy_SM))
        engine.step()
    trained = sum(not torch.equal(p.detach().float(), s.float()) for p, s in zip(model.parameters(), start))
    return {"peak_bytes": _host_bytes(peak=True), "before_step_bytes": before, "parameters_changed": trained,
            "parameters": len(start), "hash_seed": os.environ.get("PYTHONHASHSEED"), "pid": os.getpid(),
            "master_port": os.environ.get("MASTER_PORT")}


def engine_memory(points: List[Point], impls: List[str], seeds: int = 3, timeout: float = 600.0,
                  log=print) -> Dict[str, Dict[str, Dict]]:
    """{point key: {impl: {"peak_MB", "step_MB", "peak_MB_range", "samples"}}}: medians over `seeds` hash seeds,
    one new interpreter per (seed, implementation)."""
    processes = FreshProcesses(spawn=True)
    results: Dict[str, Dict[str, Dict]] = {}
    for point in points:
        row: Dict[str, Dict] = {}
        for impl in impls:
            samples = [processes.call_on_point(engine_probe, point, 1, impl, timeout=timeout,
                                               what=f"engine memory {impl} {point.key}", hash_seed=seed)
                       for seed in range(seeds)]
            peaks = [s["peak_bytes"] / _MB for s in samples]
            row[impl] = {"peak_MB": statistics.median(peaks),
                         "step_MB": statistics.median((s["peak_bytes"] - s["before_step_bytes"]) / _MB
                                                      for s in samples),
                         "peak_MB_range": [min(peaks), max(peaks)], "samples": samples}
        results[point.key] = row
        log(f"engine memory {point.key}: " + ", ".join(
            f"{impl} {r['peak_MB']:.1f} MB ({r['peak_MB_range'][0]:.0f}-{r['peak_MB_range'][1]:.0f})"
            for impl, r in row.items()))
    return results


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", action="append", default=[], help="k,cf,E,M,S,dtype (repeatable; default: "
                        "the quick grid's two E=32, M=512 memory points)")
    parser.add_argument("--seeds", type=int, default=3, help="hash seeds, one new interpreter each (default 3)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    specs = args.point or ["2,1.0,32,512,512,fp32", "4,1.25,32,512,512,fp32"]
    points = []
    for spec in specs:
        k, cf, E, M, S, dtype = spec.split(",")
        points.append(Point(int(k), float(cf), int(E), int(M), int(S), dtype))
    results = engine_memory(points, list(IMPLEMENTATIONS), seeds=args.seeds)
    for key, row in results.items():
        ours, ds = row["ours"]["peak_MB"], row["deepspeed"]["peak_MB"]
        print(f"{key}: ours/DeepSpeed peak {ours / ds:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
