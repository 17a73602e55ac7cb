"""What each layer adds to its experts: its step with and without the experts' arithmetic, next to the FFN floor.

The issue's target at capacity factor 1.0, k=2 is ours within 1.10x of the floor, so everything ours does besides
the experts (the router's fp32 products, softmax, choices, slots and l_aux, the plan, gather and combine forward
and backward, the framework's calls) has to fit in a tenth of the experts' time. This measures that share
directly: in each round, on the round's new batch, each layer's step as it is, its step with the experts
replaced by a stand-in that passes their rows through (a view: no arithmetic, one autograd node), and the floor
(bench_layer's timed_steps, its floor prepared as in the grid). DeepSpeed's layer is measured the same way, for
comparison. A stand-in's step does not free the experts' weight gradients the step before it left: that is the
experts' work. Orders alternate between rounds; medians over rounds.

    python benchmarks/layer_overhead.py --point 2,1.0,16,256,bf16 --point 2,1.0,64,512,bf16 --rounds 25

The stand-in is set on the layer's own experts object for the steps that need it; neither library has a switch
for it. Each point runs in a new interpreter, as the grid's points do.

Shape legend: n rows of one expert, M model dim.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from typing import Dict, Iterator, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.fresh_process import FreshProcesses  # noqa: E402
from benchmarks.layer_impls import Point  # noqa: E402
from benchmarks.timing import paired_ratio  # noqa: E402

CANDIDATES = ("ours", "ours_without_experts", "deepspeed", "deepspeed_without_experts", "floor")
LAYERS = ("ours", "deepspeed")


def pass_rows_through(inputs_nM: Sequence) -> List:
    """The experts' stand-in: each expert's rows, unchanged (views, so the gradient flows back as it came)."""
    return [x_nM.view_as(x_nM) for x_nM in inputs_nM]


def pass_buffer_through(buf):
    """DeepSpeed's experts' stand-in: the capacity buffer, unchanged."""
    return buf.view_as(buf)


@contextlib.contextmanager
def experts_passed_through(layer) -> Iterator[None]:
    """Within the block, `layer` (ours: its grouped path; DeepSpeed's: its Experts.forward) runs the stand-in
    instead of its experts."""
    experts = layer.deepspeed_moe.experts
    name, stand_in = (("_run_grouped", pass_rows_through) if hasattr(experts, "forward_grouped")
                      else ("forward", pass_buffer_through))
    setattr(experts, name, stand_in)
    try:
        yield
    finally:
        delattr(experts, name)


def time_point(point: Point, warmup: int, rounds: int) -> Dict[str, List[float]]:
    """Runs in the child: seconds per step of each candidate, one list per candidate, interleaved by round."""
    import torch

    from benchmarks.layer_impls import timed_steps
    from benchmarks.timing import interleaved
    steps = timed_steps(point, torch.device("cpu"), tokens="fresh")

    def without_experts(name: str):
        def step() -> None:
            with experts_passed_through(steps.layers[name]):
                steps.fns[name]()
        return step

    fns = {"ours": steps.fns["ours"], "ours_without_experts": without_experts("ours"),
           "deepspeed": steps.fns["deepspeed"], "deepspeed_without_experts": without_experts("deepspeed"),
           "floor": steps.fns["floor"]}
    orders = [list(CANDIDATES), ["deepspeed_without_experts", "deepspeed", "ours_without_experts", "ours", "floor"]]
    return interleaved(fns, torch.device("cpu"), warmup=warmup, reps=rounds, min_reps=rounds,
                       prepare=untimed_preparations(steps), before_round=steps.before_round, orders=orders)


def untimed_preparations(steps) -> Dict:
    """What runs untimed before each candidate: the floor's as in the grid, and, before a stand-in's step, the
    freeing of the gradients the step before it left. A step starts by freeing them (zero_grad), and the experts'
    weight gradients are the experts' work: freeing them took about 20 ms at M=2048, E=8 on this project's CPU
    machine, which the stand-in's step would otherwise count as its own."""
    from benchmarks.layer_impls import zero_grads
    prepare = dict(steps.prepare)
    for name in LAYERS:  # the two layers share their expert parameters: each frees whatever the last step left
        prepare[f"{name}_without_experts"] = lambda layer=steps.layers[name]: zero_grads(layer)
    return prepare


def summarize(times: Dict[str, List[float]]) -> Dict[str, float]:
    """Median ms per candidate; per layer, its work besides the experts and its whole step over the floor
    (medians of the per-round ratios)."""
    row = {f"{name}_ms": 1e3 * statistics.median(times[name]) for name in CANDIDATES}
    for name in LAYERS:
        row[f"{name}_besides_experts_over_floor"] = paired_ratio(times[f"{name}_without_experts"], times["floor"])
        row[f"{name}_over_floor"] = paired_ratio(times[name], times["floor"])
    return row


def measure(points: Sequence[Point], warmup: int = 3, rounds: int = 25, timeout: float = 600.0
            ) -> Dict[str, Dict[str, float]]:
    """{point key: summarize(...)}, each point timed in a fresh interpreter."""
    processes = FreshProcesses()
    return {point.key: summarize(processes.call_on_point(time_point, point, 1, warmup, rounds, timeout=timeout,
                                                          what=f"overhead at {point.key}"))
            for point in points}


def table(results: Dict[str, Dict[str, float]]) -> str:
    lines = ["ms per step (median); shares of the floor (median of per-round ratios). DS = DeepSpeed's layer, "
             "w/o = with its experts replaced by the stand-in.", "",
             "| point | floor | ours | ours w/o | DS | DS w/o | ours w/o / floor | DS w/o / floor | ours / floor "
             "| DS / floor |", "|---" * 10 + "|"]
    for key, row in results.items():
        lines.append(f"| {key} | {row['floor_ms']:.1f} | {row['ours_ms']:.1f} | {row['ours_without_experts_ms']:.1f} "
                     f"| {row['deepspeed_ms']:.1f} | {row['deepspeed_without_experts_ms']:.1f} "
                     f"| {row['ours_besides_experts_over_floor']:.3f} "
                     f"| {row['deepspeed_besides_experts_over_floor']:.3f} | {row['ours_over_floor']:.3f} "
                     f"| {row['deepspeed_over_floor']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from benchmarks.onednn_cache import parse_point
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", action="append", help="k,cf,E,M,dtype (repeatable; default 2,1.0,16,256,bf16)")
    parser.add_argument("--rounds", type=int, default=25, help="timed rounds per point")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    points = [parse_point(text) for text in (args.point or ["2,1.0,16,256,bf16"])]
    print(table(measure(points, warmup=args.warmup, rounds=args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
