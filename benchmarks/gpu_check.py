"""Issue 29's device check: ds_tutel on one GPU against DeepSpeed's layer, in five parts, one report.

    bash benchmarks/gpu_check.sh              # on one H100/H200: installs what the tree carries, then this driver
    bash benchmarks/gpu_check.sh --dry-run    # the same driver on the CPU, tiny shapes (the test suite runs it)
    python benchmarks/gpu_check.py [--dry-run] [--out DIR] [--parts abcde] [--budget SECONDS]

Parts (each runs in a process of its own, under its own time cap, so that one failing part, a CUDA error that
poisons its context included, still leaves the others' results):
  a  equivalence  ours against DeepSpeed's layer, same weights, k = 1, 2, 4, fp32 and bf16, ep_size 1: outputs,
                  l_aux, exp_counts and every gradient (benchmarks/layer_impls.build_layers)
  b  syncs        host syncs per forward+backward of each layer: torch.cuda.set_sync_debug_mode("warn")'s
                  warnings on a GPU; on the CPU the test suite's dispatch-mode counter (tests/test_sync_budget.py)
  c  kernels      benchmarks/bench_kernels.py at S = 16k, M = 2048 and 4096, E = 8..128, k = 1, 2, 4, bf16,
                  against the copy bandwidth measured in the same run
  d  layer        forward+backward of ours, DeepSpeed's layer and the expert-only floor on GPU-sized points
                  (benchmarks/layer_impls.gpu_grid, S x M up to 2^27; bench_layer's measure_point per point)
  e  grouped GEMM the Triton grouped GEMM (triton_kernels/grouped_gemm.py) against a per-expert cuBLAS loop and
                  torch._grouped_mm on stacked weights, bf16, 16k routed rows split unevenly, E = 8..128: y, dx and
                  dW checked against the loop first, then forward and forward+backward timed interleaved
                  (GROUPED_GPU_POINTS; a part run alone, --parts e, has the whole budget for it)

Each part ends as ok, failed (with its error's last line), not built, or skipped (why). Writes to --out (default
$OUT, else a new temporary folder): gpu_check.json (everything), gpu_check.md (the summary table and per-part
tables), and the raw outputs of parts c and d (kernels.json; layer_<tag>.json/.md/.png). At most 7 files with the
shell script's log, so that all of them come back from a device machine.

The dry run puts ours on the CUDA code path where it can (dispatch_backend="triton" under Triton's interpreter,
the CPU kernel backend off); its timings are CPU figures from tiny shapes and say nothing about a GPU.

Shape legend: S tokens, M model dim, E experts, K choices per token.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    import torch
    from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

PARTS: Dict[str, str] = {
    "a": "ours = DeepSpeed's layer on the same weights (outputs, l_aux, exp_counts, gradients)",
    "b": "host syncs per forward+backward",
    "c": "gate/encode/decode kernels against the copy bandwidth (bench_kernels.py)",
    "d": "layer forward+backward against DeepSpeed's and the expert-only floor (GPU-sized points)",
    "e": "grouped GEMM against a per-expert cuBLAS loop and torch._grouped_mm",
}
# Seconds each part may take at most (the run's budget cuts them further when it runs short).
CAPS = {"gpu": {"a": 75, "b": 45, "c": 130, "d": 150, "e": 120},
        "dry-run": {"a": 60, "b": 60, "c": 60, "d": 60, "e": 60}}
DEFAULT_BUDGET_S = {"gpu": 330, "dry-run": 200}
MIN_PART_S = 8  # a part is skipped rather than started with less time than this
SYNC_BUDGET = 1  # the issue's budget: host syncs per forward+backward at default options, ep_size 1
KERNEL_TARGET = 0.70  # the issue's target: dispatch kernels at >= 70% of the copy bandwidth at M >= 2048
LAYER_TARGETS = {"ours_over_deepspeed": 1 / 1.3, "ours_over_floor": 1.15}  # at k = 2, capacity factor 1.0
# Equivalence tolerances per dtype: |ours - ds| <= atol * max|ds| + rtol * |ds| elementwise (exp_counts: exact).
TOLERANCES = {"fp32": (1e-5, 1e-4), "bf16": (1e-2, 2e-2)}
STATUSES = ("ok", "failed", "not built", "skipped")


@dataclass
class Context:
    """What a part needs to know about the run."""

    dry_run: bool
    out: str
    work: str
    cap_s: float

    @property
    def mode(self) -> str:
        return "dry-run" if self.dry_run else "gpu"


class PartFailed(Exception):
    """A part's check did not pass (its results are still recorded)."""


@dataclass
class Recorder:
    """A part's results, written to its JSON file after every update so that a part killed at its cap still
    leaves what it measured."""

    path: str
    results: Dict[str, Any] = field(default_factory=dict)
    status: str = "failed"
    detail: str = "did not finish"

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"status": self.status, "detail": self.detail, "results": self.results}, f, indent=1,
                      default=str)
        os.replace(tmp, self.path)

    def add(self, key: str, item: Any) -> None:
        self.results.setdefault(key, []).append(item)
        self.save()


# ----------------------------------------------------------------------------------------------------------------
# Part a: equivalence


def _device(ctx: Context) -> "torch.device":
    import torch
    return torch.device("cpu" if ctx.dry_run else "cuda")


def _release_memory(device: "torch.device") -> None:
    """Frees the last case's layers (reference cycles included) and hands cached GPU memory back."""
    import gc
    import torch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _cuda_code_path_on_cpu() -> Dict[str, Any]:
    """The dry run's stand-in for CUDA: no registry backend for CPU tensors (as none applies to CUDA tensors by
    itself), and ours' Triton backend under the interpreter. Returns the options ours is built with."""
    from ds_tutel import kernels
    kernels.DEVICE_BACKENDS.pop("cpu", None)
    return {"dispatch_backend": "triton"}


def _ours_extra(ctx: Context) -> Dict[str, Any]:
    return _cuda_code_path_on_cpu() if ctx.dry_run else {}


def _step_record(layer: "nn.Module", x_SM: "torch.Tensor", dy_SM: "torch.Tensor",
                 aux_weight: float = 0.01) -> Dict[str, Any]:
    """One forward+backward (loss = <y, dy> + aux_weight * l_aux, as benchmarks/layer_impls.layer_step) and
    everything it produced: output, l_aux, exp_counts, input and parameter gradients."""
    import torch
    from benchmarks.layer_impls import zero_grads
    zero_grads(layer)
    x_SM = x_SM.detach().requires_grad_(True)
    y_SM, l_aux, counts_E = layer(x_SM)
    torch.autograd.backward((y_SM, l_aux), (dy_SM, torch.full_like(l_aux, aux_weight)))
    grads = {name: p.grad.detach().clone() for name, p in layer.named_parameters() if p.grad is not None}
    return {"output": y_SM.detach(), "l_aux": l_aux.detach(), "exp_counts": counts_E.detach().cpu(),
            "input_grad": x_SM.grad.detach(), "grads": grads}


def _difference(got: "torch.Tensor", ref: "torch.Tensor", dtype: str) -> Dict[str, Any]:
    """Max abs difference, the reference's scale, bitwise equality and whether it is within the tolerance."""
    import torch
    got_f, ref_f = got.detach().float(), ref.detach().float()
    if got_f.shape != ref_f.shape:
        return {"max_abs": float("inf"), "scale": 0.0, "bitwise": False, "within_tol": False,
                "shape": [list(got_f.shape), list(ref_f.shape)]}
    err = (got_f - ref_f).abs()
    scale = float(ref_f.abs().max()) if ref_f.numel() else 0.0
    atol, rtol = TOLERANCES[dtype]
    within = bool((err <= atol * scale + rtol * ref_f.abs()).all()) and bool(torch.isfinite(got_f).all())
    return {"max_abs": float(err.max()) if err.numel() else 0.0, "scale": scale,
            "bitwise": bool(torch.equal(got, ref)), "within_tol": within}


def compare_runs(ours: Dict[str, Any], ref: Dict[str, Any], dtype: str) -> Dict[str, Any]:
    """One case's comparison of ours' step record against DeepSpeed's."""
    counts_equal = bool(ours["exp_counts"].shape == ref["exp_counts"].shape
                        and (ours["exp_counts"].long() == ref["exp_counts"].long()).all())
    tensors = {name: _difference(ours[name], ref[name], dtype) for name in ("output", "l_aux", "input_grad")}
    names = sorted(ref["grads"].keys() | ours["grads"].keys())
    missing = [n for n in names if n not in ours["grads"] or n not in ref["grads"]]
    grads = {n: _difference(ours["grads"][n], ref["grads"][n], dtype) for n in names if n not in missing}
    worst = max(grads, key=lambda n: grads[n]["max_abs"] / max(grads[n]["scale"], 1e-30), default=None)
    failing = [n for n, d in {**tensors, **grads}.items() if not d["within_tol"]] + missing
    return {"exp_counts_equal": counts_equal, "exp_counts": ref["exp_counts"].tolist(),
            **tensors, "param_grads": {"count": len(names), "bitwise": sum(d["bitwise"] for d in grads.values()),
                                       "missing": missing, "worst": worst,
                                       "worst_max_abs": grads[worst]["max_abs"] if worst else 0.0,
                                       "worst_scale": grads[worst]["scale"] if worst else 0.0},
            "failing": failing, "equal": counts_equal and not failing}


def equivalence_points(dry_run: bool) -> List[Any]:
    """k = 1, 2, 4 in fp32 and bf16 at capacity factor 1.0; tiny in the dry run."""
    from benchmarks.layer_impls import Point
    E, M, S = (8, 16, 32) if dry_run else (16, 1024, 4096)
    return [Point(k, 1.0, E, model_dim=M, tokens=S, dtype=dtype) for dtype in ("fp32", "bf16") for k in (1, 2, 4)]


def part_a(ctx: Context, rec: Recorder) -> str:
    from benchmarks.layer_impls import build_layers, make_inputs
    device = _device(ctx)
    extra = _ours_extra(ctx)
    rec.results["ours_options"] = extra
    rec.results["tolerances"] = {d: {"atol_of_scale": a, "rtol": r} for d, (a, r) in TOLERANCES.items()}
    for point in equivalence_points(ctx.dry_run):
        layers = build_layers(point, device, share_experts=False, ours_extra=extra)
        x_SM, dy_SM = make_inputs(point, device)
        runs = {name: _step_record(layer, x_SM, dy_SM) for name, layer in layers.items()}
        case = {"key": point.key, "k": point.k, "dtype": point.dtype,
                **compare_runs(runs["ours"], runs["deepspeed"], point.dtype)}
        rec.add("cases", case)
        del layers, runs
        _release_memory(device)
    cases = rec.results["cases"]
    bad = [c for c in cases if not c["equal"]]
    if bad:
        first = bad[0]
        what = "exp_counts" if not first["exp_counts_equal"] else ", ".join(first["failing"][:3])
        raise PartFailed(f"{len(bad)} of {len(cases)} cases differ; first {first['key']}: {what}")
    tensors = sum(3 + c["param_grads"]["count"] for c in cases)
    bitwise = sum(sum(c[n]["bitwise"] for n in ("output", "l_aux", "input_grad")) + c["param_grads"]["bitwise"]
                  for c in cases)
    return (f"{len(cases)} cases equal (k 1,2,4 x fp32,bf16): exp_counts exact, {bitwise} of {tensors} tensors "
            "bitwise, the rest within tolerance")


# ----------------------------------------------------------------------------------------------------------------
# Part b: host syncs


SITE_ROOTS = ("ds_tutel/", "triton_kernels/", "deepspeed/", "benchmarks/")


def python_site() -> str:
    """The innermost frame of the project or DeepSpeed in the current Python stack, as root/path:line function.
    torch reports a C++ warning (a sync's) when the Python call that raised it returns, so this is the call."""
    for frame in reversed(traceback.extract_stack()[:-1]):
        path = frame.filename.replace("\\", "/")
        if path.endswith(("benchmarks/gpu_check.py", "/warnings.py")):
            continue
        for root in SITE_ROOTS:
            if root in path:
                return f"{root}{path.rsplit(root, 1)[1]}:{frame.lineno} {frame.name}"
    return "outside the project"


def _count_cuda_syncs(layer: "nn.Module", x_SM: "torch.Tensor", dy_SM: "torch.Tensor") -> Tuple[int, Dict[str, int]]:
    """Warnings of torch.cuda.set_sync_debug_mode("warn") during one forward+backward (after two warm-up steps),
    and the Python calls they came from."""
    import warnings
    import torch
    from benchmarks.layer_impls import layer_step
    for _ in range(2):
        layer_step(layer, x_SM, dy_SM)
    torch.cuda.synchronize()
    sites: List[str] = []

    def record(message: Any, *args: Any, **kwargs: Any) -> None:
        if "synchroniz" in str(message):
            sites.append(python_site())

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            layer_step(layer, x_SM, dy_SM)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return len(sites), dict(collections.Counter(sites))


def _count_cpu_syncs(layer: "nn.Module", x_SM: "torch.Tensor", dy_SM: "torch.Tensor") -> Tuple[int, Dict[str, int]]:
    """The test suite's counter (tests/test_sync_budget.py): the aten ops that would sync a GPU host, plus
    .tolist() calls, during one forward+backward after one warm-up step."""
    import torch
    from benchmarks.layer_impls import layer_step
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from test_sync_budget import SyncCounter, _call_site, _CpuOnlyChecks
    layer_step(layer, x_SM, dy_SM)
    counter = SyncCounter()
    tolist_sites: List[str] = []
    real_tolist = torch.Tensor.tolist

    def counting_tolist(self: torch.Tensor) -> Any:
        tolist_sites.append(f"tolist at {_call_site()}")
        return real_tolist(self)

    torch.Tensor.tolist = counting_tolist
    try:
        with _CpuOnlyChecks(counter), counter:
            layer_step(layer, x_SM, dy_SM)
    finally:
        torch.Tensor.tolist = real_tolist
    sites = collections.Counter(counter.sites + tolist_sites)
    return counter.total + len(tolist_sites), dict(sites)


def part_b(ctx: Context, rec: Recorder) -> str:
    from benchmarks.layer_impls import Point, build_layers, make_inputs
    device = _device(ctx)
    extra = _ours_extra(ctx)
    E, M, S = (4, 16, 24) if ctx.dry_run else (16, 1024, 4096)
    count = _count_cpu_syncs if ctx.dry_run else _count_cuda_syncs
    rec.results.update(ours_options=extra, budget=SYNC_BUDGET, method=(
        "TorchDispatchMode counter of ops that sync a GPU host (tests/test_sync_budget.py), CUDA code path under "
        "Triton's interpreter" if ctx.dry_run else 'torch.cuda.set_sync_debug_mode("warn") warnings'))
    for k in (1, 2, 4):
        point = Point(k, 1.0, E, model_dim=M, tokens=S, dtype="bf16")
        layers = build_layers(point, device, share_experts=False, ours_extra=extra)
        x_SM, dy_SM = make_inputs(point, device)
        case: Dict[str, Any] = {"key": point.key, "k": k}
        for name, layer in layers.items():
            case[name], case[f"{name}_sites"] = count(layer, x_SM, dy_SM)
        rec.add("cases", case)
        del layers
        _release_memory(device)
    cases = rec.results["cases"]
    ours = "/".join(str(c["ours"]) for c in cases)
    ds = "/".join(str(c["deepspeed"]) for c in cases)
    over = [c["key"] for c in cases if c["ours"] > SYNC_BUDGET]
    return (f"syncs per step at k=1/2/4: ours {ours}, DeepSpeed {ds} (budget {SYNC_BUDGET}"
            + (f"; over it: {', '.join(over)})" if over else ", met)"))


# ----------------------------------------------------------------------------------------------------------------
# Part c: kernels

KERNEL_ARGS = ["--tokens", "16384", "--M", "2048", "4096", "--E", "8", "16", "32", "64", "128", "--k", "1", "2", "4",
               "--dtype", "bfloat16"]


def parse_kernel_rows(text: str) -> List[Dict[str, Any]]:
    """The result rows bench_kernels.py printed (to keep what a run cut short at its cap had measured)."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 10 or not parts[0].isdigit() or not parts[9].endswith("%"):
            continue
        try:
            M, E, k, C = (int(p) for p in parts[:4])
            fwd, both, gbps, pct = float(parts[6]), float(parts[7]), float(parts[8]), float(parts[9][:-1])
        except ValueError:
            continue
        rows.append(dict(M=M, E=E, k=k, C=C, op=parts[4], path=parts[5], fwd_ms=fwd, fwd_bwd_ms=both, GBps=gbps,
                         copy_fraction=pct / 100))
    return rows


def kernel_summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Median fraction of the copy bandwidth per (op, path), and the Triton rows at M >= 2048 at the target."""
    groups: Dict[str, List[float]] = collections.defaultdict(list)
    for row in rows:
        groups[f"{row['op']} {row['path']}"].append(row["copy_fraction"])
    triton = [r for r in rows if r["path"] == "triton" and r["M"] >= 2048]
    return {"median_copy_fraction": {key: statistics.median(v) for key, v in sorted(groups.items())},
            "triton_rows_M2048_plus": len(triton),
            "triton_rows_at_target": sum(r["copy_fraction"] >= KERNEL_TARGET for r in triton),
            "target": KERNEL_TARGET}


def _output_text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def part_c(ctx: Context, rec: Recorder) -> str:
    json_path = os.path.join(ctx.out, "kernels.json")
    args = ["--smoke"] if ctx.dry_run else KERNEL_ARGS
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench_kernels.py"), *args, "--json", json_path]
    rec.results["command"] = " ".join(["python", "benchmarks/bench_kernels.py", *args, "--json", "kernels.json"])
    timeout = max(5.0, ctx.cap_s - 10)
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        stdout, stderr, code = _output_text(err.stdout), _output_text(err.stderr), None
    print(stdout[-4000:])
    header = [line for line in stdout.splitlines() if line.startswith("#")]
    rec.results["header"] = header
    if code == 0 and os.path.exists(json_path):
        with open(json_path) as f:
            report = json.load(f)
        rows = report["results"]
        rec.results.update(copy_GBps=report["copy_GBps"], device=report["device"])
    else:
        rows = parse_kernel_rows(stdout)
    rec.results.update(rows=rows, summary=kernel_summary(rows))
    rec.save()
    if code is None:
        raise PartFailed(f"bench_kernels.py passed its cap of {timeout:.0f} s after {len(rows)} rows")
    if code != 0:
        lines = [line for line in (stderr or stdout).strip().splitlines() if line.strip()]
        raise PartFailed(f"bench_kernels.py exited {code}: {lines[-1] if lines else 'no output'}")
    summary = rec.results["summary"]
    return (f"{len(rows)} rows, copy {rec.results['copy_GBps']:.0f} GB/s; triton rows at M>=2048 at >= "
            f"{KERNEL_TARGET:.0%} of copy: {summary['triton_rows_at_target']} of {summary['triton_rows_M2048_plus']}")


# ----------------------------------------------------------------------------------------------------------------
# Part d: the layer


def layer_tag(dry_run: bool) -> str:
    return "layer_dryrun" if dry_run else "layer_gpu_cuda"


def part_d(ctx: Context, rec: Recorder) -> str:
    import torch
    from benchmarks.bench_layer import measure_point
    from benchmarks.floors import copy_bandwidth
    from benchmarks.layer_impls import gpu_grid, smoke_grid
    from benchmarks.layer_report import environment, write_outputs
    from benchmarks.timing import geomean
    device = _device(ctx)
    if ctx.dry_run:
        torch.set_num_threads(1)
    grid = smoke_grid() if ctx.dry_run else gpu_grid()
    rec.results["points"] = [p.key for p in grid.points]
    doc: Dict[str, Any] = {"environment": environment(device, torch.get_num_threads()), "same_process": True,
                           "tokens": grid.tokens, "mode": "smoke" if ctx.dry_run else "gpu"}
    doc["copy_bandwidth_Bps"] = bandwidth = copy_bandwidth(device)
    rows = doc["rows"] = []
    for point in grid.points:
        row = measure_point(point, device, grid, bandwidth)
        rows.append(row)
        med = row["median_s"]
        rec.add("rows", {"key": row["key"], "capacity": row["capacity"], "kept_choices": row["kept_choices"],
                         "ours_ms": 1e3 * med["ours"], "deepspeed_ms": 1e3 * med["deepspeed"],
                         "floor_ms": 1e3 * med["floor"], "bytes_floor_ms": 1e3 * row["bytes_floor_s"],
                         "ours_over_deepspeed": row["ours_over_deepspeed"],
                         "ours_over_floor": row["ours_over_floor"],
                         "deepspeed_over_floor": row["deepspeed_over_floor"]})
        _release_memory(device)  # the timed steps' closures hold the layers in reference cycles
    doc["geomean_ours_over_deepspeed"] = geomean([r["ours_over_deepspeed"] for r in rows])
    rec.results["copy_GBps"] = bandwidth / 1e9
    rec.results["geomean_ours_over_deepspeed"] = doc["geomean_ours_over_deepspeed"]
    rec.save()
    try:
        rec.results["files"] = [os.path.basename(p) for p in write_outputs(doc, ctx.out, layer_tag(ctx.dry_run))]
    except Exception as err:  # the table and plot are extras: the rows are in gpu_check.json already
        rec.results["files_error"] = f"{type(err).__name__}: {err}"
    rec.save()
    k2 = [r for r in rec.results["rows"] if r["key"].startswith("k2_cf1_")]
    target_line = ""
    if k2:
        target_line = (f"; k=2 cf=1.0: ours/DS {geomean([r['ours_over_deepspeed'] for r in k2]):.3f}, ours/floor "
                       f"{geomean([r['ours_over_floor'] for r in k2]):.3f} (geomeans; targets <= "
                       f"{LAYER_TARGETS['ours_over_deepspeed']:.3f} and <= {LAYER_TARGETS['ours_over_floor']})")
    return f"{len(rows)} points, geomean ours/DS {doc['geomean_ours_over_deepspeed']:.3f}{target_line}"


# ----------------------------------------------------------------------------------------------------------------
# Part e: grouped GEMM


# (E experts, M model dim = the GEMM's input features, I expert hidden dim = its output features) at
# GROUPED_ROWS routed rows, from Mixtral-like (8 x 4096 -> 14336) to fine-grained (64-128 x 2048 -> 1408); the
# first call of each shape autotunes three kernels, so four points fit the part's cap.
GROUPED_GPU_POINTS = [(8, 4096, 14336), (32, 4096, 3584), (64, 2048, 1408), (128, 2048, 1408)]
GROUPED_DRY_POINTS = [(6, 32, 24)]
GROUPED_ROWS = {"gpu": 16384, "dry-run": 40}
# (warm-up rounds, timed rounds at most, at least): the interpreter takes a second per call.
GROUPED_ROUNDS = {"gpu": (2, 10, 3), "dry-run": (1, 2, 2)}


def grouped_gemm_state() -> Tuple[str, str]:
    """("not built", why) where the Triton grouped GEMM does not exist, else ("ok", what part e measures)."""
    import torch
    has_grouped_mm = hasattr(torch, "_grouped_mm")
    found = importlib.util.find_spec("triton_kernels.grouped_gemm") is not None
    suffix = f"; torch._grouped_mm {'present' if has_grouped_mm else 'absent'} in torch {torch.__version__}"
    if not found:
        return "not built", "the Triton grouped GEMM (triton_kernels/grouped_gemm.py, issue 29) does not exist yet" \
            + suffix
    return "ok", "triton_kernels.grouped_gemm against a per-expert matmul loop" + suffix


def grouped_row_counts(E: int, N: int, seed: int) -> List[int]:
    """An uneven split of N rows over E experts, as a router makes them: skewed shares, the last expert empty."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    probs_E = torch.softmax(torch.randn(E, generator=gen), dim=0)
    probs_E[-1] = 0.0
    counts_E = torch.multinomial(probs_E, N, replacement=True, generator=gen).bincount(minlength=E)
    return counts_E.tolist()


def _grouped_candidates(E: int, M: int, I: int, counts: List[int], device: "torch.device",
                        seed: int) -> Tuple[Dict[str, Callable[[], "torch.Tensor"]], Dict[str, List["torch.Tensor"]],
                                            "torch.Tensor", "torch.Tensor"]:
    """The forward of each candidate on the same rows and weights (bf16): ours (per-expert weights through
    pointer arrays), the per-expert matmul loop (cuBLAS on a GPU) and, where torch has it, torch._grouped_mm on a
    stacked copy of the weights. Returns (forwards, each candidate's parameters, x_NM, dy_NI)."""
    import torch
    from triton_kernels.grouped_gemm import grouped_linear
    gen = torch.Generator(device=device).manual_seed(seed)
    N = sum(counts)
    dtype = torch.bfloat16

    def randn(*shape: int) -> "torch.Tensor":  # made on the device: the largest weights are 2 GB in fp32
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    x_NM = (randn(N, M) * 0.5).requires_grad_()
    dy_NI = randn(N, I)
    w_EIM = randn(E, I, M) * M ** -0.5
    weights = [w_EIM[e].clone().requires_grad_() for e in range(E)]
    loop_weights = [w_EIM[e].clone().requires_grad_() for e in range(E)]
    stacked = w_EIM.clone().requires_grad_()
    offsets_L1 = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(device)
    ends_E = offsets_L1[1:].to(torch.int32)

    def ours() -> "torch.Tensor":
        return grouped_linear(x_NM, offsets_L1, weights)

    def loop() -> "torch.Tensor":
        return torch.cat([xs @ w.t() for xs, w in zip(x_NM.split(counts), loop_weights)])

    def grouped_mm() -> "torch.Tensor":
        return torch._grouped_mm(x_NM, stacked.transpose(-2, -1), offs=ends_E)

    forwards = {"ours": ours, "loop": loop}
    params = {"ours": weights, "loop": loop_weights}
    if hasattr(torch, "_grouped_mm"):
        forwards["grouped_mm"] = grouped_mm
        params["grouped_mm"] = [stacked]
    return forwards, params, x_NM, dy_NI


def _grouped_outputs(forward: Callable[[], "torch.Tensor"], params: List["torch.Tensor"], x_NM: "torch.Tensor",
                     dy_NI: "torch.Tensor") -> Dict[str, "torch.Tensor"]:
    """y, dx and the weights' gradients (stacked) of one forward+backward."""
    import torch
    x_NM.grad = None
    for p in params:
        p.grad = None
    y = forward()
    y.backward(dy_NI)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    dw = torch.stack(grads) if len(grads) > 1 else grads[0]
    return {"y": y.detach(), "dx": x_NM.grad.detach(), "dw": dw.detach()}


def part_e(ctx: Context, rec: Recorder) -> str:
    import torch
    from benchmarks.timing import geomean, interleaved, median, paired_ratio
    status, detail = grouped_gemm_state()
    rec.results["torch_has_grouped_mm"] = hasattr(torch, "_grouped_mm")
    if status != "ok":
        rec.status = status
        return detail
    import triton_kernels.grouped_gemm as gg
    device = _device(ctx)
    if ctx.dry_run:
        torch.set_num_threads(1)
    started = time.perf_counter()
    N = GROUPED_ROWS[ctx.mode]
    points = GROUPED_DRY_POINTS if ctx.dry_run else GROUPED_GPU_POINTS
    rec.results.update(rows_per_point=N, dtype="bf16", method=(
        "interleaved rounds (benchmarks/timing.py); ratios are medians of per-round ratios; one linear layer "
        "x_NM @ W_IM^T per expert, N routed rows split unevenly (one expert empty)"))
    for index, (E, M, I) in enumerate(points):
        if index and time.perf_counter() - started > 0.6 * ctx.cap_s:
            rec.results["cut_short"] = f"{len(points) - index} points left out to stay within the cap"
            break
        key = f"E{E}_M{M}_I{I}"
        counts = grouped_row_counts(E, N, seed=index)
        forwards, params, x_NM, dy_NI = _grouped_candidates(E, M, I, counts, device, seed=index)
        outputs, errors, first_call_s = {}, {}, {}
        for name, fwd in forwards.items():
            first = time.perf_counter()
            try:
                outputs[name] = _grouped_outputs(fwd, params[name], x_NM, dy_NI)
            except Exception as err:  # torch._grouped_mm is private: where it refuses, report why and go on
                if name == "ours":
                    raise
                errors[name] = last_line(f"{type(err).__name__}: {err}")
            if device.type == "cuda":
                torch.cuda.synchronize()
            first_call_s[name] = time.perf_counter() - first  # ours: autotuning (and compiling) included
        row: Dict[str, Any] = {"key": key, "E": E, "M": M, "I": I, "rows": N, "min_rows": min(counts),
                               "max_rows": max(counts), "first_call_s": first_call_s, "errors": errors}
        ref = outputs["loop"]
        row["checks"] = {name: {t: _difference(out[t], ref[t], "bf16") for t in ("y", "dx", "dw")}
                         for name, out in outputs.items() if name != "loop"}
        forwards = {name: fwd for name, fwd in forwards.items() if name in outputs}
        flops = 2.0 * N * M * I
        timings: Dict[str, Dict[str, List[float]]] = {}
        warmup, reps, min_reps = GROUPED_ROUNDS[ctx.mode]
        with torch.no_grad():
            timings["fwd"] = interleaved(dict(forwards), device, warmup=warmup, reps=reps, budget_s=5.0,
                                         min_reps=min_reps)

        def step(name: str) -> Callable[[], None]:
            return lambda: forwards[name]().backward(dy_NI)

        def clear(name: str) -> Callable[[], None]:
            def run() -> None:
                x_NM.grad = None
                for p in params[name]:
                    p.grad = None
            return run

        timings["fwd_bwd"] = interleaved({n: step(n) for n in forwards}, device, warmup=warmup, reps=reps,
                                         budget_s=10.0, min_reps=min_reps, prepare={n: clear(n) for n in forwards})
        for phase, times in timings.items():
            work = flops * (1 if phase == "fwd" else 3)
            row[phase] = {f"{n}_ms": 1e3 * median(t) for n, t in times.items()}
            row[phase]["ours_TFLOPs"] = work / median(times["ours"]) / 1e12
            for other in times:
                if other != "ours":
                    row[phase][f"ours_over_{other}"] = paired_ratio(times["ours"], times[other])
        rec.add("rows", row)
        del forwards, params, outputs, x_NM, dy_NI
        _release_memory(device)
    rows = rec.results.get("rows", [])
    rec.results["autotuned"] = {name: {str(k): str(v) for k, v in getattr(kernel, "cache", {}).items()}
                                for name, kernel in (("grouped_mm", gg._grouped_mm_kernel),
                                                     ("weight_grad", gg._weight_grad_kernel))}
    rec.save()
    wrong = [f"{r['key']} {name} {t}" for r in rows for name, checks in r["checks"].items() for t, d in checks.items()
             if name == "ours" and not d["within_tol"]]
    if wrong:
        raise PartFailed(f"the grouped GEMM differs from the per-expert loop: {', '.join(wrong[:3])}")
    summary = []
    for phase in ("fwd", "fwd_bwd"):
        for other in ("loop", "grouped_mm"):
            ratios = [r[phase][f"ours_over_{other}"] for r in rows if f"ours_over_{other}" in r[phase]]
            if ratios:
                summary.append(f"{phase} ours/{other} {geomean(ratios):.3f}")
    failed_mm = sorted({e for r in rows for e in r["errors"].values()})
    return (f"points {len(rows)}, each equal to the loop (y, dx, dW in bf16 tolerance); geomean " + ", ".join(summary)
            + (f"; torch._grouped_mm failed: {failed_mm[0]}" if failed_mm else "")
            + ("" if "cut_short" not in rec.results else f"; {rec.results['cut_short']}"))


PART_FUNCTIONS: Dict[str, Callable[[Context, Recorder], str]] = {
    "a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e}


def run_part(part: str, ctx: Context) -> int:
    """A part in this process (the driver's child): its result file is work/part_<part>.json."""
    rec = Recorder(os.path.join(ctx.work, f"part_{part}.json"))
    rec.save()
    try:
        detail = PART_FUNCTIONS[part](ctx, rec)
        if rec.status == "failed":  # a part that sets no other status and returns has passed
            rec.status = "ok"
        rec.detail = detail
        rec.save()
        return 0
    except BaseException as err:  # the parent reports the part failed with this line
        traceback.print_exc()
        rec.status = "failed"
        rec.detail = last_line(f"{type(err).__name__}: {err}")
        rec.save()
        return 1


# ----------------------------------------------------------------------------------------------------------------
# The parent: runs the parts, writes the report


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:400] if lines else ""


def child_environment(dry_run: bool) -> Dict[str, str]:
    """The parts' environment: the repository importable, output unbuffered, the CPU kernels never built (no part
    times CPU tensors on a GPU machine; in the dry run they stand for CUDA's absent backend), and the interpreter
    on in the dry run and off on a GPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env["DS_TUTEL_CPU_KERNELS"] = "0"
    if dry_run:
        env["DS_ACCELERATOR"] = "cpu"
        env["TRITON_INTERPRET"] = "1"
    else:
        env["DS_ACCELERATOR"] = "cuda"
        env.pop("TRITON_INTERPRET", None)
    return env


def run_child(part: str, ctx: Context, cap_s: float) -> Dict[str, Any]:
    """Runs a part in a new process group under its cap; its record, or a failure with the last line it printed."""
    result_path = os.path.join(ctx.work, f"part_{part}.json")
    log_path = os.path.join(ctx.work, f"part_{part}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--run-part", part, "--out", ctx.out, "--work", ctx.work,
           "--cap", f"{cap_s:.1f}"] + (["--dry-run"] if ctx.dry_run else [])
    started = time.perf_counter()
    timed_out = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_environment(ctx.dry_run), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=cap_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
    wall = time.perf_counter() - started
    with open(log_path) as f:
        output = f.read()
    print(output.rstrip()[-6000:])
    record: Dict[str, Any] = {"status": "failed", "detail": "", "results": {}}
    if os.path.exists(result_path):
        with open(result_path) as f:
            record = json.load(f)
    if timed_out:
        record["status"] = "failed"
        record["detail"] = f"timed out at its cap of {cap_s:.0f} s (results so far kept)"
    elif code != 0 and record.get("status") not in ("failed",):
        record["status"] = "failed"
    if record["status"] == "failed" and record.get("detail") in ("", "did not finish"):
        record["detail"] = last_line(output) or f"exited {code}"
    record.update(wall_s=round(wall, 1), cap_s=round(cap_s, 1), exit_code=code)
    return record


def environment(dry_run: bool, install: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Date, machine, versions, the device and the repository revision (where git is there)."""
    import torch

    def version(name: str) -> Optional[str]:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "triton": version("triton"), "deepspeed": version("deepspeed"),
           "cuda": torch.version.cuda, "revision": _revision()}
    if not dry_run and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_GiB=round(props.total_memory / 2 ** 30, 1),
                   multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    else:
        env["gpu"] = None
    env["deepspeed_requirements_missing"] = missing_requirements("deepspeed")
    if install is not None:
        env["install"] = install
    return env


def missing_requirements(dist: str) -> List[str]:
    """The distribution's unconditional requirements that are not installed (all of them named when it is not)."""
    import re
    try:
        requires = importlib.metadata.requires(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return [dist]
    missing = []
    for req in requires:
        if ";" in req:
            continue
        name = re.split(r"[<>=!~\[ ]", req, 1)[0]
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def _revision() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _fmt(value: Any, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def markdown(doc: Dict[str, Any]) -> str:
    """The summary table (one row per part) and a table per part that has results."""
    env = doc["environment"]
    where = env.get("gpu") or "CPU (dry run: Triton's interpreter, tiny shapes; timings are not GPU figures)"
    lines = [f"# Device check ({doc['mode']})", "",
             f"{where}; {env['date']}; torch {env['torch']}, triton {env['triton']}, deepspeed {env['deepspeed']}; "
             f"revision {env['revision']}; {doc['wall_s']:.0f} s of a {doc['budget_s']:.0f} s budget.", ""]
    install = env.get("install")
    if install:
        lines += [f"Install: {install.get('status')} ({install.get('detail', '')}, {install.get('wall_s', '-')} s)", ""]
    if env.get("deepspeed_requirements_missing"):
        lines += [f"Missing DeepSpeed requirements: {', '.join(env['deepspeed_requirements_missing'])}", ""]
    lines += ["| part | what | status | detail | s |", "|---|---|---|---|---|"]
    for part, rec in doc["parts"].items():
        detail = str(rec.get("detail", "")).replace("|", "/")
        lines.append(f"| {part} | {PARTS[part]} | {rec['status']} | {detail} | {_fmt(rec.get('wall_s'), '.0f')} |")
    parts = doc["parts"]
    cases = parts.get("a", {}).get("results", {}).get("cases", [])
    if cases:
        lines += ["", "## a: ours against DeepSpeed's layer", "",
                  "| case | exp_counts | output | l_aux | input grad | param grads (bitwise / n, worst rel err) |",
                  "|---|---|---|---|---|---|"]
        for c in cases:
            def cell(d: Dict[str, Any]) -> str:
                rel = d["max_abs"] / d["scale"] if d["scale"] else d["max_abs"]
                return "bitwise" if d["bitwise"] else f"{'ok' if d['within_tol'] else 'DIFFERS'} ({rel:.2g})"
            g = c["param_grads"]
            worst_rel = g["worst_max_abs"] / g["worst_scale"] if g["worst_scale"] else g["worst_max_abs"]
            lines.append(f"| {c['key']} | {'equal' if c['exp_counts_equal'] else 'DIFFER'} | {cell(c['output'])} | "
                         f"{cell(c['l_aux'])} | {cell(c['input_grad'])} | {g['bitwise']} / {g['count']}, "
                         f"{worst_rel:.2g} |")
        lines.append("(rel err: max |ours - DS| over max |DS|)")
    sync_cases = parts.get("b", {}).get("results", {}).get("cases", [])
    if sync_cases:
        lines += ["", f"## b: host syncs per forward+backward ({parts['b']['results'].get('method')})", "",
                  "| case | ours | DeepSpeed | ours' sites |", "|---|---|---|---|"]
        for c in sync_cases:
            sites = "; ".join(f"{s} x{n}" for s, n in c.get("ours_sites", {}).items()).replace("|", "/")
            lines.append(f"| {c['key']} | {c['ours']} | {c['deepspeed']} | {sites or '-'} |")
    kernels = parts.get("c", {}).get("results", {})
    if kernels.get("rows"):
        summary = kernels["summary"]
        lines += ["", "## c: kernels, median fraction of the copy bandwidth over the shapes", "",
                  f"copy bandwidth {_fmt(kernels.get('copy_GBps'), '.0f')} GB/s; raw rows in kernels.json", "",
                  "| op, path | median fraction of copy |", "|---|---|"]
        for key, value in summary["median_copy_fraction"].items():
            lines.append(f"| {key} | {value:.1%} |")
    layer = parts.get("d", {}).get("results", {})
    if layer.get("rows"):
        lines += ["", "## d: layer forward+backward (medians; ratios are medians of per-round ratios)", "",
                  "| point | ours ms | DS ms | floor ms | ours/DS | ours/floor | DS/floor |",
                  "|---|---|---|---|---|---|---|"]
        for r in layer["rows"]:
            lines.append(f"| {r['key']} | {r['ours_ms']:.3g} | {r['deepspeed_ms']:.3g} | {r['floor_ms']:.3g} | "
                         f"{r['ours_over_deepspeed']:.3f} | {r['ours_over_floor']:.3f} | "
                         f"{r['deepspeed_over_floor']:.3f} |")
    grouped = parts.get("e", {}).get("results", {})
    if grouped.get("rows"):
        lines += ["", "## e: grouped GEMM, bf16, ours against the per-expert loop and torch._grouped_mm "
                  "(medians; ratios are medians of per-round ratios)", "",
                  "| point | rows per expert | fwd ours ms | fwd ours/loop | fwd ours/grouped_mm | fwd+bwd ours ms | "
                  "fwd+bwd ours/loop | fwd+bwd ours/grouped_mm | ours TFLOP/s fwd, fwd+bwd |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in grouped["rows"]:
            f, b = r["fwd"], r["fwd_bwd"]
            lines.append(f"| {r['key']} | {r['min_rows']}-{r['max_rows']} | {f['ours_ms']:.3g} | "
                         f"{_fmt(f.get('ours_over_loop'), '.3f')} | {_fmt(f.get('ours_over_grouped_mm'), '.3f')} | "
                         f"{b['ours_ms']:.3g} | {_fmt(b.get('ours_over_loop'), '.3f')} | "
                         f"{_fmt(b.get('ours_over_grouped_mm'), '.3f')} | {f['ours_TFLOPs']:.3g}, "
                         f"{b['ours_TFLOPs']:.3g} |")
    return "\n".join(lines) + "\n"


def read_install(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """The shell script's install record: lines KEY=VALUE (status, detail, wall_s)."""
    if not path or not os.path.exists(path):
        return None
    record: Dict[str, Any] = {}
    with open(path) as f:
        for line in f:
            key, sep, value = line.rstrip("\n").partition("=")
            if sep:
                record[key] = value
    return record


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny shapes, Triton's interpreter")
    parser.add_argument("--out", default=os.environ.get("OUT") or "", help="output folder (default $OUT, else a "
                        "new temporary folder)")
    parser.add_argument("--parts", default="".join(PARTS), help="which parts to run, e.g. 'ab' (default all)")
    parser.add_argument("--budget", type=float, default=0, help="seconds for all parts together (default 330 on a "
                        "GPU, 200 in the dry run)")
    parser.add_argument("--install-status", default="", help="the shell script's install record")
    parser.add_argument("--run-part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--work", default="", help=argparse.SUPPRESS)
    parser.add_argument("--cap", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(out, exist_ok=True)
    if args.run_part:
        return run_part(args.run_part, Context(args.dry_run, out, args.work, args.cap))

    mode = "dry-run" if args.dry_run else "gpu"
    budget = args.budget or DEFAULT_BUDGET_S[mode]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; choose among {''.join(PARTS)}")
    started = time.perf_counter()
    work = tempfile.mkdtemp(prefix="gpu_check_work_")
    ctx = Context(args.dry_run, out, work, 0.0)
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no GPU here; use --dry-run to run the check on the CPU")
    doc: Dict[str, Any] = {"mode": mode, "budget_s": budget,
                           "environment": environment(args.dry_run, read_install(args.install_status)), "parts": {}}
    for part in PARTS:
        left = budget - (time.perf_counter() - started)
        cap = min(CAPS[mode][part], left)
        print(f"== part {part}: {PARTS[part]} (cap {cap:.0f} s)", flush=True)
        if part not in args.parts:
            record = {"status": "skipped", "detail": "not asked for (--parts)", "results": {}}
        elif part == "e" and grouped_gemm_state()[0] == "not built":  # nothing to run: no process, no budget
            status, detail = grouped_gemm_state()
            record = {"status": status, "detail": detail, "results": {"torch_has_grouped_mm": "present" in detail}}
        elif cap < MIN_PART_S:
            record = {"status": "skipped", "detail": f"the run's {budget:.0f} s budget was spent ({left:.0f} s left)",
                      "results": {}}
        else:
            record = run_child(part, ctx, cap)
        doc["parts"][part] = record
        print(f"== part {part}: {record['status']}: {record.get('detail', '')}", flush=True)
    shutil.rmtree(work, ignore_errors=True)  # each part's log was printed above
    doc["wall_s"] = time.perf_counter() - started
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(markdown(doc))
    print(markdown(doc))
    print(f"wrote {os.path.join(out, 'gpu_check.json')} and gpu_check.md")
    failed = [part for part, record in doc["parts"].items() if record["status"] == "failed"]
    return 1 if failed else 0  # the outputs are written either way


if __name__ == "__main__":
    sys.exit(main())
