"""Peak memory of forward+backward steps per implementation, each measured in a process of its own.

Every probe runs in a new interpreter, as a training job does. Round r of the REPEATS rounds runs all of a
point's probes with PYTHONHASHSEED=r: the hash seed orders sets and dicts while torch, DeepSpeed and ds_tutel
import, and so decides the heap the steps start on. One seed can move a layer's peak by a tenth while repeats
under one seed agree closely (docs/BENCHMARKS.md); children forked from one server would all inherit that
server's heap, so a whole run would draw one layout. A child resets its peak-RSS mark at start (Linux
/proc/self/clear_refs), builds one layer and the inputs, runs STEPS steps, each on a new batch of tokens as a
training job would (so routing and per-expert row counts change, and whatever a layer keeps per new shape
accumulates), and reports its peak resident set; a "baseline" child builds the same inputs without any layer.
Reported per implementation:

  layer_MB = peak(implementation) - peak(baseline): weights, gradients and everything the steps allocated;
  step_MB  = peak during the steps - resident size just before the first: the steps' transient working set;
  live_MB  = (CPU) the most tensor bytes alive at once during a second step, over those alive before it, from
             torch.profiler's allocation records: what the step itself holds, without what the memory
             allocator or math libraries (oneDNN's per-shape primitive cache, heap fragmentation) add to RSS.

Without /proc the children fall back to getrusage's ru_maxrss (then both include the imports' size, which
the baseline subtraction removes). On CUDA the numbers are torch.cuda's allocated bytes instead of RSS.
"""
from __future__ import annotations

import json
import os
import re
import resource
import statistics
import sys
import tempfile
from typing import Dict, Iterable, List, Optional

from benchmarks.fresh_process import FreshProcesses
from benchmarks.layer_impls import Point

_MB = 1 << 20
STEPS = 4
REPEATS = 3  # hash seeds 0, 1, 2: the median of three heap layouts (see above)


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _host_bytes(peak: bool) -> int:
    kb = _status_kb("VmHWM" if peak else "VmRSS")
    if kb is None:  # no /proc: ru_maxrss is kB on Linux, bytes on macOS
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024
    return kb * 1024


def probe(point: Point, impl: str, device_type: str) -> Dict[str, float]:
    """Runs in the child: build, STEPS steps on new batches, peak bytes (see the module docstring)."""
    import torch
    from benchmarks.layer_impls import build_layer, fresh_batch, layer_step, make_inputs

    device = torch.device(device_type)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak()

    def now(peak: bool) -> int:
        if cuda:
            return torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)
        return _host_bytes(peak)

    layer = None if impl == "baseline" else build_layer(impl, point, device)
    x_SM, dy_SM = make_inputs(point, device)
    before_step = now(peak=False)
    if layer is not None:
        layer_step(layer, x_SM, dy_SM)
        for i in range(1, STEPS):
            layer_step(layer, fresh_batch(point, device, i), dy_SM)
    if cuda:
        torch.cuda.synchronize(device)
    out = {"peak_bytes": now(peak=True), "before_step_bytes": before_step,
           "hash_seed": os.environ.get("PYTHONHASHSEED")}
    if layer is not None and not cuda:
        out["live_bytes"] = _live_step_bytes(lambda: layer_step(layer, x_SM, dy_SM))
    return out


def _live_step_bytes(step) -> int:
    """Peak of torch's allocated CPU bytes during step(), over the bytes allocated when it started."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    finally:
        os.remove(path)
    if not events:
        return 0
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - start


def _run_probe(processes: FreshProcesses, point: Point, impl: str, device_type: str, threads: int,
               timeout: float, hash_seed: int) -> Dict[str, float]:
    return processes.call_on_point(probe, point, threads, impl, device_type, timeout=timeout,
                                   what=f"memory probe {impl} {point.key}", hash_seed=hash_seed)


def peak_memory(points: Iterable[Point], impls: List[str], device_type: str = "cpu", threads: int = 1,
                timeout: float = 300.0, repeats: int = REPEATS, log=print) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{point key: {impl: {"layer_MB", "step_MB", "peak_MB", "live_MB", "layer_MB_range", "hash_seeds"}}}:
    medians over `repeats` rounds, round r one new interpreter per implementation and one for the baseline,
    all with hash seed r."""
    processes = FreshProcesses(spawn=True)
    results: Dict[str, Dict[str, Dict[str, float]]] = {}
    for point in points:
        samples: Dict[str, List[Dict[str, float]]] = {impl: [] for impl in impls}
        seeds: Dict[str, List[str]] = {impl: [] for impl in impls}
        for seed in range(repeats):
            baseline = _run_probe(processes, point, "baseline", device_type, threads, timeout, seed)
            for impl in impls:
                measured = _run_probe(processes, point, impl, device_type, threads, timeout, seed)
                seeds[impl].append(measured["hash_seed"])
                sample = {"layer_MB": (measured["peak_bytes"] - baseline["peak_bytes"]) / _MB,
                          "step_MB": (measured["peak_bytes"] - measured["before_step_bytes"]) / _MB,
                          "peak_MB": measured["peak_bytes"] / _MB}
                if "live_bytes" in measured:
                    sample["live_MB"] = measured["live_bytes"] / _MB
                samples[impl].append(sample)
        row = {impl: {field: statistics.median(s[field] for s in runs) for field in runs[0]}
               for impl, runs in samples.items()}
        for impl, runs in samples.items():
            row[impl]["layer_MB_range"] = [min(s["layer_MB"] for s in runs), max(s["layer_MB"] for s in runs)]
            row[impl]["hash_seeds"] = seeds[impl]
        results[point.key] = row
        log(f"memory {point.key}: " + ", ".join(f"{i} {row[i]['layer_MB']:.1f} MB" for i in impls))
    return results
