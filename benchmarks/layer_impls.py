"""The MoE layers the layer benchmark compares, built on the same shapes, weights and expert module.

A `Point` is one benchmark shape and a `Grid` a set of them (the quick, full and smoke grids that bench_layer.py
and layer_multirank.py both run). `build_layers` returns ds_tutel's layer and DeepSpeed's installed layer with
identical weights (ours loads DeepSpeed's state dict, the drop-in path; for timing, the expert parameters are
then shared so that two copies of large expert weights never sit in memory). `layer_step` is one
forward+backward of the kind a training step runs (output and l_aux both reach the loss).

Both layers run DeepSpeed's deterministic routing (use_rts=False, top2_2nd_expert_sampling=False, no gate
noise), so on the same weights they must give the same outputs and gradients; `benchmarks/bench_layer.py
--correctness` checks exactly that.

Shape legend: S tokens, M model dim, H expert hidden dim, E experts, K choices per token.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

IMPLEMENTATIONS: Tuple[str, ...] = ("ours", "deepspeed")
# Other MoE libraries the issue asks to include when importable; recorded in every result as found or not.
OTHER_LIBRARIES: Tuple[str, ...] = ("tutel", "megablocks")
DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIN_CAPACITY = 4  # DeepSpeed's default
# ds_tutel.MoE keyword arguments for ours alone, as JSON (bench_layer --ours-option sets it; children inherit it)
OURS_OPTIONS_ENV = "DS_TUTEL_BENCH_OURS_OPTIONS"


def ours_options() -> Dict:
    """The extra keyword arguments ours is built with in this run ({} by default)."""
    return json.loads(os.environ.get(OURS_OPTIONS_ENV) or "{}")


@dataclass(frozen=True)
class Point:
    """One benchmark shape. The expert is Linear(M, H) -> GELU -> Linear(H, M) with H = hidden_mult * M."""

    k: int
    capacity_factor: float
    num_experts: int
    model_dim: int
    tokens: int
    dtype: str = "fp32"
    hidden_mult: int = 2

    @property
    def hidden_dim(self) -> int:
        return self.hidden_mult * self.model_dim

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def key(self) -> str:
        return (f"k{self.k}_cf{self.capacity_factor:g}_E{self.num_experts}_M{self.model_dim}_S{self.tokens}"
                f"_{self.dtype}")

    def expert_param_bytes(self) -> int:
        """Bytes of all experts' weights and biases of one layer (gradients take as much again)."""
        M, H = self.model_dim, self.hidden_dim
        per_expert = 2 * M * H + M + H
        return self.num_experts * per_expert * self.torch_dtype.itemsize


def tokens_for(model_dim: int) -> int:
    """Tokens per point: 2048 at M=256, halving as M doubles (S*M = 2**19), so that no point's step takes more
    than about a second on one CPU core."""
    return max(256, min(2048, (1 << 19) // model_dim))


def grid_point(k: int, cf: float, E: int, M: int, dtype: str = "fp32", tokens: Optional[int] = None) -> Point:
    """A point of the grids: tokens_for(M) tokens unless `tokens` is given."""
    return Point(k=k, capacity_factor=cf, num_experts=E, model_dim=M, tokens=tokens or tokens_for(M), dtype=dtype)


def parse_point(text: str, tokens: int = 0) -> Point:
    """"k,cf,E,M,dtype" (the benchmarks' --point) as a grid point, with tokens_for(M) tokens unless `tokens`."""
    try:
        k, cf, E, M, dtype = text.split(",")
        point = grid_point(int(k), float(cf), int(E), int(M), dtype, tokens=tokens or None)
    except ValueError:
        raise SystemExit(f"--point: expected k,cf,E,M,dtype (e.g. 2,1.0,16,512,fp32), got {text!r}")
    if point.dtype not in DTYPES:
        raise SystemExit(f"--point: unknown dtype {point.dtype!r}; choose among {sorted(DTYPES)}")
    return point


@dataclass
class Grid:
    """A set of points plus the multi-rank and memory subsets and the repetition counts."""

    points: List[Point]
    memory_points: List[Point]
    multirank_points: List[Point]
    world_sizes: List[int] = field(default_factory=lambda: [2, 4])
    warmup: int = 2
    reps: int = 5
    budget_s: Optional[float] = 6.0  # per point, after the first 5 timed rounds (None: every round)
    tokens: str = "fresh"  # a new batch every round ("fresh", as in training) or one batch throughout ("fixed")
    dtypes: List[str] = field(default_factory=list)  # set where the grid was cut to these dtypes
    only: str = ""  # set where the grid was cut to the points whose key matches this regular expression


def quick_grid() -> Grid:
    """13 points over k, capacity factor, E 4..64, M 256..1024 and both dtypes (the M=512 points with 512 tokens,
    to keep every step well under a second on one core), plus the memory and multi-rank subsets."""
    points = [grid_point(k, cf, 8, 256) for k, cf in itertools.product([1, 2, 4], [1.0, 1.25])]
    points += [grid_point(2, 1.0, 32, 512, tokens=512), grid_point(4, 1.25, 32, 512, tokens=512),
               grid_point(2, 1.0, 64, 256), grid_point(4, 1.25, 64, 256), grid_point(2, 1.25, 4, 1024),
               grid_point(2, 1.0, 16, 512, "bf16"), grid_point(1, 1.25, 8, 256, "bf16")]
    memory = [p for p in points if p.k == 2 and p.capacity_factor == 1.0] + [grid_point(4, 1.25, 32, 512, tokens=512)]
    multirank = [grid_point(2, 1.0, 8, 256, tokens=512), grid_point(2, 1.25, 8, 256, tokens=512)]
    return Grid(points, memory, multirank, warmup=1, reps=9, budget_s=5.0)


def full_grid(max_layer_bytes: int) -> Grid:
    """The issue's whole grid, less points whose expert weights + gradients exceed max_layer_bytes."""
    points = [grid_point(k, cf, E, M, dtype)
              for dtype, M, E, k, cf in itertools.product(["fp32", "bf16"], [256, 512, 1024, 2048], [4, 8, 16, 32, 64],
                                                          [1, 2, 4], [1.0, 1.25])]
    points = [p for p in points if 2 * p.expert_param_bytes() <= max_layer_bytes]
    memory = [p for p in points if p.k == 2]
    multirank = [grid_point(1, 1.0, 8, 256, tokens=1024), grid_point(2, 1.0, 8, 256, tokens=1024),
                 grid_point(2, 1.25, 16, 512, tokens=512)]
    return Grid(points, memory, multirank, warmup=2, reps=7, budget_s=10.0)


def gpu_grid() -> Grid:
    """GPU-sized points (issue 29's device check): S x M from 2^24 to 2^27, bf16 (one fp32 point), capacity factor
    1.0 at k = 1, 2, 4 and one at 1.25; expert weights of at most about 0.6 G parameters per point, so that building
    both layers on the host stays within seconds. No memory or multi-rank parts (those are CPU probes)."""
    points = [Point(2, 1.0, 8, model_dim=2048, tokens=16384, dtype="bf16"),
              Point(2, 1.0, 32, model_dim=2048, tokens=16384, dtype="bf16"),
              Point(2, 1.0, 64, model_dim=1024, tokens=32768, dtype="bf16"),
              Point(2, 1.0, 8, model_dim=4096, tokens=32768, dtype="bf16"),
              Point(1, 1.0, 32, model_dim=2048, tokens=16384, dtype="bf16"),
              Point(4, 1.0, 32, model_dim=2048, tokens=16384, dtype="bf16"),
              Point(2, 1.25, 32, model_dim=2048, tokens=16384, dtype="bf16"),
              Point(2, 1.0, 16, model_dim=2048, tokens=8192, dtype="fp32")]
    return Grid(points, [], [], warmup=2, reps=10, budget_s=3.0)


def smoke_grid() -> Grid:
    """Two tiny points, timed but not measured for memory or on several ranks."""
    points = [Point(1, 1.0, 4, model_dim=16, tokens=32), Point(2, 1.25, 4, model_dim=16, tokens=32, dtype="bf16")]
    return Grid(points, [], [], warmup=1, reps=3, budget_s=1.0)


def other_libraries() -> Dict[str, bool]:
    """Which other MoE libraries are importable here (none of them is on PyPI as a CPU build)."""
    return {name: importlib.util.find_spec(name) is not None for name in OTHER_LIBRARIES}


def expert_ffn(model_dim: int, hidden_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(model_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, model_dim))


def layer_kwargs(point: Point, ep_size: int = 1) -> dict:
    """The constructor arguments both layers get: DeepSpeed's deterministic routing."""
    return dict(num_experts=point.num_experts, ep_size=ep_size, k=point.k, capacity_factor=point.capacity_factor,
                eval_capacity_factor=point.capacity_factor, min_capacity=MIN_CAPACITY, drop_tokens=True,
                use_rts=False, top2_2nd_expert_sampling=False)


def build_layer(name: str, point: Point, device: torch.device, seed: int = 0, ep_size: int = 1,
                ours_extra: Optional[Dict] = None) -> nn.Module:
    """One implementation alone (the memory probe builds only the layer it measures). Ours gets the run's
    ours_options() and, over them, `ours_extra`."""
    torch.manual_seed(seed)
    expert = expert_ffn(point.model_dim, point.hidden_dim)
    if name == "ours":
        import ds_tutel
        layer = ds_tutel.MoE(point.model_dim, expert, **layer_kwargs(point, ep_size),
                             **{**ours_options(), **(ours_extra or {})})
    elif name == "deepspeed":
        from deepspeed.moe.layer import MoE as DeepSpeedMoE
        layer = DeepSpeedMoE(point.model_dim, expert, **layer_kwargs(point, ep_size))
    else:
        raise ValueError(f"unknown implementation {name!r}; known: {IMPLEMENTATIONS}")
    distinct_experts(layer)
    return layer.to(device=device, dtype=point.torch_dtype)


def distinct_experts(layer: nn.Module) -> None:
    """Re-initialises every expert (both layers deep-copy one expert module, so all would start equal: a token
    sent to the wrong expert would then go unnoticed by the correctness check)."""
    for module in layer.deepspeed_moe.experts.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()


def share_expert_parameters(source: nn.Module, target: nn.Module) -> None:
    """Makes target's expert parameters the very tensors of source's (same names and shapes required)."""
    source_params = dict(source.named_parameters())
    for name, _ in list(target.named_parameters()):
        if ".experts." not in name:
            continue
        module_path, leaf = name.rsplit(".", 1)
        module = target.get_submodule(module_path)
        if module._parameters[leaf].shape != source_params[name].shape:
            raise ValueError(f"{name}: shapes differ")
        module._parameters[leaf] = source_params[name]


def build_layers(point: Point, device: torch.device, seed: int = 0, ep_size: int = 1,
                 share_experts: bool = True, ours_extra: Optional[Dict] = None) -> Dict[str, nn.Module]:
    """{"ours": ds_tutel.MoE, "deepspeed": deepspeed.moe.layer.MoE} holding identical weights."""
    reference = build_layer("deepspeed", point, device, seed, ep_size)
    ours = build_layer("ours", point, device, seed + 1, ep_size, ours_extra=ours_extra)
    ours.load_state_dict(reference.state_dict())
    if share_experts:
        share_expert_parameters(reference, ours)
    return {"ours": ours, "deepspeed": reference}


def make_inputs(point: Point, device: torch.device, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x_SM, dy_SM): the tokens and the output gradient every implementation gets."""
    gen = torch.Generator().manual_seed(seed + 1000)
    x_SM = torch.randn(point.tokens, point.model_dim, generator=gen)
    dy_SM = torch.randn(point.tokens, point.model_dim, generator=gen)
    return x_SM.to(device, point.torch_dtype), dy_SM.to(device, point.torch_dtype)


_PARAMETERS: "weakref.WeakKeyDictionary[nn.Module, List[nn.Parameter]]" = weakref.WeakKeyDictionary()


def zero_grads(module: nn.Module) -> None:
    """Sets every parameter's grad to None, as optimizer.zero_grad() does: over a list made once, as an
    optimizer holds its parameter groups. Walking the module tree every step (module.parameters()) costs the
    same for both layers and grows with E, which would only pull their ratio towards 1."""
    params = _PARAMETERS.get(module)
    if params is None:
        params = _PARAMETERS[module] = list(module.parameters())
    for param in params:
        param.grad = None


def layer_step(layer: nn.Module, x_SM: torch.Tensor, dy_SM: torch.Tensor,
               aux_weight: float = 0.01) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward+backward (loss = <y, dy> + aux_weight * l_aux); returns (y_SM, l_aux, dx_SM)."""
    zero_grads(layer)
    x_SM = x_SM.detach().requires_grad_(True)
    y_SM, l_aux, _ = layer(x_SM)
    torch.autograd.backward((y_SM, l_aux), (dy_SM, torch.full_like(l_aux, aux_weight)))
    return y_SM.detach(), l_aux.detach(), x_SM.grad


TOKENS = ("fresh", "fixed")
ORDERS = (("ours", "deepspeed", "floor"), ("deepspeed", "ours", "floor"))


@dataclass
class TimedSteps:
    """What a timing run of one point needs: a step function per implementation (ours, deepspeed, floor), the
    untimed work before each round (a new batch) and before a step (the floor's work, built from ours' routing
    of the round's batch), the orders rounds alternate between (the two layers take turns at being first on a
    round's batch; the floor comes last, after ours has routed it), the routing ours made on the first batch,
    the floor's first work, and the two layers themselves."""

    fns: Dict[str, Callable[[], object]]
    prepare: Dict[str, Callable[[], None]]
    routing: object
    work: object
    kept_choices: List[int] = field(default_factory=list)  # the floor's kept choices, one per prepared batch
    before_round: Optional[Callable[[], None]] = None
    orders: List[List[str]] = field(default_factory=lambda: [list(ORDERS[0]), list(ORDERS[1])])
    layers: Dict[str, nn.Module] = field(default_factory=dict)  # {"ours": ..., "deepspeed": ...}, as stepped


def fresh_batch(point: Point, device: torch.device, index: int) -> torch.Tensor:
    """Batch number `index` of a point's token stream (deterministic, distinct from make_inputs' tokens)."""
    gen = torch.Generator().manual_seed(1_000_003 + index)
    return torch.randn(point.tokens, point.model_dim, generator=gen).to(device, point.torch_dtype)


def timed_steps(point: Point, device: torch.device, tokens: str = "fixed") -> TimedSteps:
    """Both layers on identical (shared) weights and the expert-FFN floor on exactly the tokens ours kept.

    tokens="fixed": every step sees the same batch, so every step routes alike and repeats the same per-expert
    row counts. tokens="fresh": each round (ours, deepspeed, floor) gets a new batch, as training steps do;
    the row counts change from step to step, and anything a layer pays per new shape shows in its time.
    """
    from benchmarks.floors import expert_work, floor_step
    if tokens not in TOKENS:
        raise ValueError(f"tokens must be one of {TOKENS}, got {tokens!r}")
    layers = build_layers(point, device)
    ours, reference = layers["ours"], layers["deepspeed"]
    experts = list(ours.deepspeed_moe.experts.deepspeed_experts)
    x_SM, dy_SM = make_inputs(point, device)
    layer_step(ours, x_SM, dy_SM)  # routing for the floor (the same set DeepSpeed's layer keeps)
    routing = ours.deepspeed_moe.last_routing
    work = expert_work(experts, routing, x_SM, dy_SM)
    state = {"x_SM": x_SM, "work": work, "batches": 0}
    steps = TimedSteps(fns={"ours": lambda: layer_step(ours, state["x_SM"], dy_SM),
                            "deepspeed": lambda: layer_step(reference, state["x_SM"], dy_SM),
                            "floor": lambda: floor_step(state["work"])},
                       prepare={}, routing=routing, work=work, kept_choices=[work.kept_choices], layers=layers)
    if tokens == "fresh":
        def next_batch() -> None:
            state["batches"] += 1
            state["x_SM"] = fresh_batch(point, device, state["batches"])

        def floor_work() -> None:  # ours stepped on this round's batch first: the floor takes its routing
            state["work"] = expert_work(experts, ours.deepspeed_moe.last_routing, state["x_SM"], dy_SM)
            steps.kept_choices.append(state["work"].kept_choices)
            # One untimed step first: the floor is the FFNs' arithmetic alone, so it pays no first-use cost of
            # a new shape (CPU bf16 matmul primitives); ours and DeepSpeed's layers pay theirs in their time.
            floor_step(state["work"])

        steps.before_round = next_batch
        steps.prepare = {"floor": floor_work}
    return steps
