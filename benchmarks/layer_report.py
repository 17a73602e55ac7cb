"""The layer benchmark's outputs: the environment a run records, the JSON document, a markdown report with the
targets, and a PNG of the ratios.

Ratios are ours / DeepSpeed (below 1 = ours faster), ours / floor and DeepSpeed / floor (1 = at the floor).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from typing import Dict, List, Optional, Tuple

import torch

from benchmarks.layer_impls import other_libraries
from benchmarks.timing import geomean, median, paired_ratio

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# The targets on the CPU.
GEOMEAN_SPEEDUP = 1.2   # geometric mean of DeepSpeed / ours over the grid, at least
FLOOR_MARGIN = 1.10     # ours / expert-FFN floor at capacity factor 1.0, k = 2, at most


def environment(device: torch.device, threads: int) -> Dict:
    """Where and with what a run measured: versions, processor, threads, device, the repository's commit."""
    import deepspeed
    env = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
           "torch": torch.__version__, "deepspeed": deepspeed.__version__, "machine": platform.machine(),
           "processor": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": threads,
           "device": str(device), "other_libraries": other_libraries(), "ds_tutel_revision": _revision(),
           "cpu_kernels": _cpu_kernels(), "cpu_isa": _cpu_isa()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _cpu_isa() -> str:
    """The vector instructions torch's CPU kernels use, the CPU's family and model, and what runs bf16 matmuls:
    runs on two generations of one vendor's CPUs are not comparable (bf16 steps without AVX-512 BF16 can take
    tens of times longer; docs/BENCHMARKS.md)."""
    from ds_tutel.kernels.cpu.row_buckets import onednn_half_matmuls
    ids = _cpuinfo("cpu family", "model")
    family = f", family {ids['cpu family']} model {ids['model']}" if len(ids) == 2 else ""
    bf16 = "oneDNN" if onednn_half_matmuls(torch.bfloat16) else "ATen loops"
    return f"{torch.backends.cpu.get_cpu_capability()}{family}, bf16 matmuls: {bf16}"


def _cpu_kernels() -> str:
    """DS_TUTEL_CPU_KERNELS and whether the compiled grouped-dispatch loops loaded (ours' CPU combine)."""
    from ds_tutel.kernels.cpu import build as cpu_kernels
    return f"{cpu_kernels.mode()} ({'loaded' if cpu_kernels.load() is not None else 'torch operators'})"


def _revision() -> Optional[str]:
    """The repository's commit, with "+changes" when the layer's package has uncommitted edits."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ds_tutel"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def _cpuinfo(*keys: str) -> Dict[str, str]:
    """The first value of each of these /proc/cpuinfo fields (those it has; none without /proc)."""
    found: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in keys:
                    found.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return found


def _cpu_name() -> str:
    return _cpuinfo("model name").get("model name") or platform.processor()


def targets(doc: Dict) -> List[Dict]:
    """Each target with its measured value and whether it is met."""
    rows = doc["rows"]
    ratios = [r["ours_over_deepspeed"] for r in rows]
    slower = [r["key"] for r in rows if r["ours_over_deepspeed"] > 1.0]
    # Slower beyond the noise: even the round ratios' first quartile is above 1 (the verdict stays the median's).
    clearly_slower = [r["key"] for r in rows if r["ours_over_deepspeed"] > 1.0
                      and r.get("ours_over_deepspeed_quartiles", [0.0])[0] > 1.0]
    floor_rows = [r for r in rows if r["point"]["k"] == 2 and r["point"]["capacity_factor"] == 1.0]
    worst_floor = max((r["ours_over_floor"] for r in floor_rows), default=float("nan"))
    out = [
        {"target": f"geometric mean at least {GEOMEAN_SPEEDUP}x faster than DeepSpeed",
         "value": f"{1 / geomean(ratios):.3f}x faster (ours/DS {geomean(ratios):.3f})",
         "met": geomean(ratios) <= 1 / GEOMEAN_SPEEDUP},
        {"target": "never slower than DeepSpeed on any point",
         "value": f"max ours/DS {max(ratios):.3f}; slower on {len(slower)} of {len(rows)} points, "
                  f"{len(clearly_slower)} of them with the first quartile of the round ratios above 1 too",
         "met": not slower},
        {"target": f"cf 1.0, k=2: within {FLOOR_MARGIN}x of the expert-FFN floor",
         "value": f"worst ours/floor {worst_floor:.3f} over {len(floor_rows)} points{_ideal_range(floor_rows)}",
         "met": bool(floor_rows) and worst_floor <= FLOOR_MARGIN},
    ]
    memory = doc.get("memory")
    if memory:
        mem_ratios = {key: m["ours"]["layer_MB"] / m["deepspeed"]["layer_MB"] for key, m in memory.items()}
        over = [key for key, ratio in mem_ratios.items() if ratio > 1.0]
        out.append({"target": "peak memory never above DeepSpeed's",
                    "value": f"max ours/DS {max(mem_ratios.values()):.3f}; above on {len(over)} of "
                             f"{len(mem_ratios)} points",
                    "met": not over})
    return out


def router_share(point: Dict) -> float:
    """The router's arithmetic over the experts' for one point: S*M*E multiply-adds against k*S*2*M*H (two
    linear maps of M x H per kept choice), E / (2kH); the same factor forward and backward."""
    hidden = point.get("hidden_mult", 2) * point["model_dim"]
    return point["num_experts"] / (2 * point["k"] * hidden)


def ideal_seconds(row: Dict) -> float:
    """An ideal layer's step: the expert-FFN floor, plus the router's fp32 products as measured in the run (rows
    from before that measurement: its arithmetic at the experts' rate), plus the dispatch bytes at copy bandwidth;
    no gate logic, no overhead at all."""
    floor = row["median_s"]["floor"]
    router = row.get("router_floor_s")
    return (floor + router if router is not None else floor * (1 + router_share(row["point"]))) + row["bytes_floor_s"]


def ideal_over_deepspeed(row: Dict) -> float:
    """What an ideal layer would measure against DeepSpeed's layer."""
    return ideal_seconds(row) / row["median_s"]["deepspeed"]


def ideal_over_floor(row: Dict) -> float:
    """Where an ideal layer would stand against the expert-FFN floor: about the least any layer that routes as
    DeepSpeed's does can reach."""
    return ideal_seconds(row) / row["median_s"]["floor"]


def _ideal_range(rows: List[Dict]) -> str:
    ideals = [ideal_over_floor(r) for r in rows if "median_s" in r and "bytes_floor_s" in r]
    if not ideals:
        return ""
    return f" (an ideal layer: {min(ideals):.3f}-{max(ideals):.3f})"


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}"


TOKENS_NOTE = {
    "fresh": "Tokens: a new batch every round (all three timed on the same batch), as in training: routing and "
             "per-expert row counts change from step to step.",
    "fixed": "Tokens: one batch for every step (--fixed-tokens): every step repeats the same routing and row "
             "counts, so per-shape costs (CPU bf16 matmul primitives) are paid once, in warm-up.",
}


def markdown(doc: Dict, title: str) -> str:
    env = doc["environment"]
    rows = doc["rows"]
    memory = doc.get("memory", {})
    others = ", ".join(f"{n}: {'importable' if ok else 'not importable'}" for n, ok in env["other_libraries"].items())
    lines = [f"### {title}", "",
             f"{env['date']}; {env['device']}; {env['processor']} ({env.get('cpu_isa', 'ISA not recorded')}), "
             f"{env['cpu_count']} cores, "
             f"{env['torch_threads']} torch threads; torch {env['torch']}, deepspeed {env['deepspeed']}, "
             f"Python {env['python']}; ds_tutel at {env.get('ds_tutel_revision')}; "
             + (f"malloc: {env['malloc']}; " if env.get("malloc") else "")
             + f"CPU dispatch loops: {env.get('cpu_kernels', 'not recorded')}; "
             f"copy bandwidth {doc['copy_bandwidth_Bps'] / 1e9:.1f} GB/s; "
             f"other MoE libraries: {others}."
             + (f" Ours built with {doc['ours_options']} (the FFN floor runs ours' expert modules)."
                if doc.get("ours_options") else ""), "",
             TOKENS_NOTE[doc.get("tokens", "fixed")], "",
             "Forward+backward, interleaved runs: times are medians, ratios the median of per-round ratios "
             "(both timed in the same round), IQR their quartiles (a wide one = a noisy point). S tokens, "
             "C capacity, "
             "floor = expert FFNs alone on the routed tokens, bytes = dispatch bytes at copy bandwidth, "
             "ideal = floor + the router's fp32 products (measured in the run) + bytes, "
             "mem = peak memory ours/DS (separate processes).", "",
             "| point | C | ours ms | DS ms | floor ms | bytes ms | ours/DS | ours/DS IQR | ours/floor | DS/floor "
             "| ideal/floor | mem |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        med = r["median_s"]
        mem = memory.get(r["key"])
        mem_text = f"{mem['ours']['layer_MB'] / mem['deepspeed']['layer_MB']:.3f}" if mem else ""
        q1, q3 = r.get("ours_over_deepspeed_quartiles", (float("nan"), float("nan")))
        lines.append(f"| {r['key']} | {r['capacity']} | {_ms(med['ours'])} | {_ms(med['deepspeed'])} | "
                     f"{_ms(med['floor'])} | {1e3 * r['bytes_floor_s']:.2f} | {r['ours_over_deepspeed']:.3f} | "
                     f"{q1:.2f}-{q3:.2f} | "
                     f"{r['ours_over_floor']:.3f} | {r['deepspeed_over_floor']:.3f} | {ideal_over_floor(r):.3f} "
                     f"| {mem_text} |")
    ratios = [r["ours_over_deepspeed"] for r in rows]
    lines += ["", f"Geometric mean ours/DS: **{geomean(ratios):.3f}** (range {min(ratios):.3f}-{max(ratios):.3f}); "
              f"DS/floor {min(r['deepspeed_over_floor'] for r in rows):.2f}-"
              f"{max(r['deepspeed_over_floor'] for r in rows):.2f}x; "
              f"ours/floor {min(r['ours_over_floor'] for r in rows):.2f}-{max(r['ours_over_floor'] for r in rows):.2f}x. "
              f"Geometric means over the floor: DS {geomean([r['deepspeed_over_floor'] for r in rows]):.3f}, ours "
              f"{geomean([r['ours_over_floor'] for r in rows]):.3f} (a layer exactly at the floor would be "
              f"{geomean([r['deepspeed_over_floor'] for r in rows]):.2f}x faster than DS; one at the floor plus "
              f"the router's fp32 products and the dispatch bytes, with nothing else, "
              f"{1 / geomean([ideal_over_deepspeed(r) for r in rows]):.2f}x).",
              "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |" for t in targets(doc)]
    if memory:
        lines += ["", "Peak memory, one process per implementation, medians of three such processes (range: "
                  "lowest-highest): peak RSS in MB over a baseline process holding the same inputs, over "
                  "several steps on new batches (weights, gradients and the steps); step = RSS growth during the "
                  "steps alone; live = most tensor bytes alive at once during a step (torch's allocation "
                  "records), i.e. without allocator and math-library caches:", "",
                  "| point | ours MB | DS MB | ours/DS | ours range | DS range | ours step | DS step | ours live "
                  "| DS live |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for key, m in memory.items():
            o, d = m["ours"], m["deepspeed"]
            live = (f"{o['live_MB']:.1f} | {d['live_MB']:.1f}" if "live_MB" in o and "live_MB" in d else " | ")
            ranges = " | ".join(f"{x['layer_MB_range'][0]:.0f}-{x['layer_MB_range'][1]:.0f}"
                                if "layer_MB_range" in x else "" for x in (o, d))
            lines.append(f"| {key} | {o['layer_MB']:.1f} | {d['layer_MB']:.1f} | {o['layer_MB'] / d['layer_MB']:.3f} "
                         f"| {ranges} | {o['step_MB']:.1f} | {d['step_MB']:.1f} | {live} |")
    if doc.get("multirank"):
        lines += ["", *multirank_lines(doc["multirank"])]
    return "\n".join(lines) + "\n"


def multirank_lines(rows: List[Dict]) -> List[str]:
    """The expert-parallel table: per world size and point, each layer's median step and its ratio to DS's."""
    kept = any("ours_capacity" in r["times"] for r in rows)
    lines = ["Expert parallel on CPU ranks (gloo, ep_size = ranks, one thread per rank, slowest rank per step, "
             "tokens per rank" + ("; ours sends the kept rows, 'ours, capacity' is ours with a2a_send='capacity', "
                                  "DeepSpeed's fixed-size buffers):" if kept else "):"), "",
             "| ranks | point | ours ms | ours, capacity ms | DS ms | ours/DS | ours, capacity/DS | outputs equal |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        times = r["times"]
        o, d = median(times["ours"]), median(times["deepspeed"])
        ratio = paired_ratio(times["ours"], times["deepspeed"])
        capacity = times.get("ours_capacity")  # results before the kept-rows exchange have no such column
        c_ms, c_ratio = ((_ms(median(capacity)), f"{paired_ratio(capacity, times['deepspeed']):.3f}")
                         if capacity else ("", ""))
        lines.append(f"| {r['world_size']} | {r['key']} | {_ms(o)} | {c_ms} | {_ms(d)} | {ratio:.3f} | {c_ratio} | "
                     f"{'yes' if r['equal'] else '**no**'} |")
    return lines


def _short(key: str) -> str:
    return key.replace("_fp32", "").replace("_cf", " cf").replace("_E", " E").replace("_M", " M").replace("_S", " S")


def plot(doc: Dict, path: str) -> None:
    """ours/DS per point (top) and both layers over the expert-FFN floor (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    n = len(rows)
    xs = list(range(n))
    labels = [_short(r["key"]) for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(min(40.0, max(8.0, 0.35 * n)), 7.5), sharex=True)
    top.bar(xs, [r["ours_over_deepspeed"] for r in rows], color="tab:blue")
    top.axhline(1.0, color="black", linewidth=0.8)
    top.axhline(1 / GEOMEAN_SPEEDUP, color="tab:green", linestyle="--", linewidth=0.8,
                label=f"target geomean 1/{GEOMEAN_SPEEDUP}")
    top.set_ylabel("ours / DeepSpeed time")
    top.legend(loc="upper right", fontsize=8)
    width = 0.4
    bottom.bar([x - width / 2 for x in xs], [r["ours_over_floor"] for r in rows], width, label="ours / floor",
               color="tab:blue")
    bottom.bar([x + width / 2 for x in xs], [r["deepspeed_over_floor"] for r in rows], width,
               label="DeepSpeed / floor", color="tab:orange")
    bottom.axhline(1.0, color="black", linewidth=0.8)
    bottom.axhline(FLOOR_MARGIN, color="tab:green", linestyle="--", linewidth=0.8, label=f"{FLOOR_MARGIN}x floor")
    bottom.set_ylabel("time / expert-FFN floor")
    bottom.set_ylim(bottom=0.8)
    bottom.legend(loc="upper right", fontsize=8)
    bottom.set_xticks(xs)
    bottom.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    env = doc["environment"]
    fig.suptitle(f"MoE layer forward+backward, {env['device']}, {env['date']} (torch {env['torch']}, "
                 f"deepspeed {env['deepspeed']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def write_outputs(doc: Dict, out_dir: str, tag: str) -> Tuple[str, str, str]:
    """Writes <tag>.json, <tag>.md and <tag>.png under out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    doc["targets"] = targets(doc)
    json_path, md_path, png_path = (os.path.join(out_dir, f"{tag}.{ext}") for ext in ("json", "md", "png"))
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    with open(md_path, "w") as f:
        only = f", {'+'.join(doc['dtypes'])} points only" if doc.get("dtypes") else ""
        only += f", points matching {doc['only']!r} only" if doc.get("only") else ""
        f.write(markdown(doc, f"Layer vs DeepSpeed ({doc['environment']['device']}, {doc.get('mode', '')} grid{only})"))
    plot(doc, png_path)
    return json_path, md_path, png_path
