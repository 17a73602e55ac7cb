"""Gate, encode and decode, forward + backward: Triton kernels vs the torch path vs DeepSpeed's sparse path.

    python benchmarks/bench_kernels.py          # on a GPU: S = 16k tokens, M = 2048/4096, E = 8..128, k = 1, 2, 4
    python benchmarks/bench_kernels.py --smoke  # tiny sizes; on a CPU it runs the kernels in Triton's interpreter

For every shape it first checks that the three paths agree (same routing from the Triton and torch gates, same
buffers and outputs from every encode/decode), then times them interleaved (path after path, repeated; the median
is reported). Throughput is given against the floor: the bytes each pass must move at least, divided by the time,
as a fraction of the copy bandwidth measured in the same run (a plain device-to-device copy).

Bytes each pass must move (b = bytes per activation element, N = E * C buffer rows, J = kept choices):
  encode  forward  read J rows, write N rows                 backward  read J rows, write S rows
  decode  forward  read J rows, write S rows                 backward  read S + J rows, write N rows
  gate    forward  read S x E logits, write S x E probs       backward  read probs and their gradient, write S x E
DeepSpeed's gate is its own topkgating (its drop policy, not Tutel's): same job, different rules. Its encode and
decode are timed on the Tutel routing, so all three dispatch paths move the same rows.

Shape legend: S tokens, M model dim, E experts, K choices per token, C capacity.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU runs them in the interpreter)")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--M", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--E", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--iters", type=int, default=10, help="calls per timed batch")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved batches per path (median reported)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.M, args.E, args.k = 96, [40], [4, 6], [1, 2]
        args.iters, args.repeats = 1, 2
    return args


ARGS = _parse()
ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    if not ARGS.smoke:
        sys.exit("bench_kernels: no GPU here; use --smoke to run tiny sizes in Triton's interpreter")
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, REPO)

from ds_tutel.strategies import dispatch_functions, tutel_router  # noqa: E402
from ds_tutel.routing.types import Routing  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def _deepspeed_sparse() -> Optional[Dict[str, Callable]]:
    """DeepSpeed's sparse gate/encode/decode functions, or None (with the reason printed) where unavailable."""
    try:
        from deepspeed.moe import sharded_moe
        return dict(gate=sharded_moe.topkgating, slots=sharded_moe._route_slots,
                    encode=sharded_moe._sparse_encode, decode=sharded_moe._sparse_decode)
    except (ImportError, AttributeError) as err:
        print(f"# DeepSpeed's sparse path unavailable ({type(err).__name__}: {err}); its column is left out")
        return None


def _sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def _time_batch(fn: Callable[[], None], iters: int) -> float:
    """Seconds per call over one batch of calls."""
    if ON_GPU:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3 / iters
    begin = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - begin) / iters


def _interleaved(fns: Dict[str, Callable[[], None]]) -> Dict[str, float]:
    """Median seconds per call of each function, timed in turns so that drift hits all of them alike."""
    for fn in fns.values():  # warm-up: compiles kernels, fills the allocator's caches
        fn()
    _sync()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(ARGS.repeats):
        for name, fn in fns.items():
            samples[name].append(_time_batch(fn, ARGS.iters))
    return {name: statistics.median(values) for name, values in samples.items()}


def copy_bandwidth() -> float:
    """Bytes per second of a plain device copy (read + write counted), the floor every pass is compared with."""
    numel = (256 if ON_GPU else 16) * 2 ** 20
    src = torch.empty(numel, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    seconds = _interleaved({"copy": lambda: dst.copy_(src)})["copy"]
    return 2 * src.numel() * src.element_size() / seconds


def _deepspeed_routes(routing: Routing):
    """The Tutel routing in DeepSpeed's sparse layout: [k, s] experts (-1 where dropped), locations, gates."""
    kept_SK = routing.kept_SK
    indices_KS = torch.where(kept_SK, routing.indices_SK, torch.full_like(routing.indices_SK, -1)).t().contiguous()
    locations_KS = routing.locations_SK.clamp(min=0).t().contiguous()
    return indices_KS, locations_KS, routing.gates_SK.t().contiguous()


def bench_shape(S: int, M: int, E: int, k: int, dtype: torch.dtype, bandwidth: float,
                ds: Optional[Dict[str, Callable]]) -> List[dict]:
    """Checks the paths against each other on one shape, then times them; one result row per (pass, path)."""
    gen = torch.Generator(device=DEVICE).manual_seed(S + M + E + k)
    logits_SE = torch.randn(S, E, device=DEVICE, generator=gen)
    x_SM = torch.randn(S, M, device=DEVICE, generator=gen).to(dtype)
    options = dict(k=k, capacity_factor=ARGS.capacity_factor, min_capacity=4)
    routers = {"triton": tutel_router("triton"), "torch": tutel_router("torch")}
    dispatchers = {"triton": dispatch_functions("triton"), "torch": dispatch_functions("torch")}

    # Correctness first: identical routing, identical buffers, matching outputs.
    ref = routers["torch"](logits_SE, **options)
    got = routers["triton"](logits_SE, **options)
    if not (got.capacity == ref.capacity and torch.equal(got.indices_SK, ref.indices_SK)
            and torch.equal(got.locations_SK, ref.locations_SK)):
        raise AssertionError(f"triton gate disagrees with the torch path at S={S} E={E} k={k}")
    routing = Routing(indices_SK=ref.indices_SK, locations_SK=ref.locations_SK, gates_SK=ref.gates_SK.detach(),
                      capacity=ref.capacity, counts_E=ref.counts_E, probs_SE=ref.probs_SE.detach())
    C, kept = routing.capacity, int(routing.kept_SK.sum())
    buf_ref = dispatchers["torch"][0](x_SM, routing)
    y_ref = dispatchers["torch"][1](buf_ref, routing)
    tolerance = dict(rtol=2 * k * torch.finfo(dtype).eps, atol=2 * k * torch.finfo(dtype).eps)
    if not torch.equal(dispatchers["triton"][0](x_SM, routing), buf_ref):
        raise AssertionError("triton encode disagrees with the torch path")
    torch.testing.assert_close(dispatchers["triton"][1](buf_ref, routing), y_ref, **tolerance)

    encoders = {name: fns[0] for name, fns in dispatchers.items()}
    decoders = {name: fns[1] for name, fns in dispatchers.items()}
    gate_fwd: Dict[str, Callable] = {}
    gate_grads = (torch.randn(S, k, device=DEVICE, generator=gen), torch.randn(S, E, device=DEVICE, generator=gen))
    for name, router in routers.items():
        def run_gate(router=router, backward=False):
            leaf = logits_SE.detach().requires_grad_(backward)
            r = router(leaf, **options)
            if backward:
                torch.autograd.backward([r.gates_SK, r.probs_SE], list(gate_grads))
        gate_fwd[name] = run_gate
    if ds is not None:
        routes = _deepspeed_routes(routing)
        slots = ds["slots"](routes[0], routes[1], E, C)
        encoders["deepspeed"] = lambda x, r: ds["encode"](x, slots, E, C)
        decoders["deepspeed"] = lambda b, r: ds["decode"](b.reshape(E * C, M), slots, r.gates_SK.t(), S)
        if not torch.equal(encoders["deepspeed"](x_SM, routing), buf_ref):
            raise AssertionError("DeepSpeed's sparse encode disagrees with the torch path")
        torch.testing.assert_close(decoders["deepspeed"](buf_ref, routing), y_ref, **tolerance)

        def run_ds_gate(backward=False):
            leaf = logits_SE.detach().requires_grad_(backward)
            out = ds["gate"](leaf, k, ARGS.capacity_factor, 4, drop_tokens=True, sparse_routes=True)
            if backward:
                torch.autograd.backward([out[5], out[0]], [gate_grads[0].t(), torch.ones_like(out[0])])
        gate_fwd["deepspeed"] = run_ds_gate

    grad_ECM = torch.randn(E, C, M, device=DEVICE, generator=gen).to(dtype)
    grad_SM = torch.randn(S, M, device=DEVICE, generator=gen).to(dtype)

    def encode_call(fn, backward):
        x = x_SM.detach().requires_grad_(backward)
        buf = fn(x, routing)
        if backward:
            buf.backward(grad_ECM)

    def decode_call(fn, backward):
        buf = buf_ref.detach().requires_grad_(backward)
        gates = routing.gates_SK.detach().requires_grad_(backward)
        r = Routing(indices_SK=routing.indices_SK, locations_SK=routing.locations_SK, gates_SK=gates,
                    capacity=C, counts_E=routing.counts_E, probs_SE=routing.probs_SE)
        y = fn(buf, r)
        if backward:
            y.backward(grad_SM)

    b = x_SM.element_size()
    floors = {  # (forward bytes, backward bytes)
        "gate": (4 * S * E * 2, 4 * S * E * 3),
        "encode": (b * M * (kept + E * C), b * M * (kept + S)),
        "decode": (b * M * (kept + S), b * M * (S + kept + E * C)),
    }
    calls = {
        "gate": {name: (lambda fn=fn: fn(), lambda fn=fn: fn(backward=True)) for name, fn in gate_fwd.items()},
        "encode": {name: (lambda fn=fn: encode_call(fn, False), lambda fn=fn: encode_call(fn, True))
                   for name, fn in encoders.items()},
        "decode": {name: (lambda fn=fn: decode_call(fn, False), lambda fn=fn: decode_call(fn, True))
                   for name, fn in decoders.items()},
    }
    rows = []
    for op, paths in calls.items():
        fwd = _interleaved({name: pair[0] for name, pair in paths.items()})
        both = _interleaved({name: pair[1] for name, pair in paths.items()})
        floor = sum(floors[op])
        for name in paths:
            rate = floor / both[name]
            rows.append(dict(S=S, M=M, E=E, k=k, C=C, op=op, path=name, fwd_ms=1e3 * fwd[name],
                             fwd_bwd_ms=1e3 * both[name], floor_MB=floor / 1e6, GBps=rate / 1e9,
                             copy_fraction=rate / bandwidth))
    return rows


def main() -> None:
    dtype = getattr(torch, ARGS.dtype)
    device_name = torch.cuda.get_device_name() if ON_GPU else "CPU (Triton interpreter)"
    bandwidth = copy_bandwidth()
    import triton
    print(f"# {device_name}; {datetime.date.today()}; torch {torch.__version__}, triton {triton.__version__}; "
          f"{ARGS.dtype}; S={ARGS.tokens}; capacity factor {ARGS.capacity_factor}")
    print(f"# copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    ds = _deepspeed_sparse()
    header = f"{'M':>5} {'E':>4} {'k':>2} {'C':>6} {'op':<7}{'path':<10}{'fwd ms':>9}{'fwd+bwd ms':>12}" \
             f"{'GB/s':>9}{'% copy':>8}"
    print(header)
    results = []
    for M in ARGS.M:
        for E in ARGS.E:
            for k in ARGS.k:
                if k > E:
                    continue
                for row in bench_shape(ARGS.tokens, M, E, k, dtype, bandwidth, ds):
                    results.append(row)
                    print(f"{row['M']:>5} {row['E']:>4} {row['k']:>2} {row['C']:>6} {row['op']:<7}{row['path']:<10}"
                          f"{row['fwd_ms']:>9.3f}{row['fwd_bwd_ms']:>12.3f}{row['GBps']:>9.1f}"
                          f"{100 * row['copy_fraction']:>7.1f}%", flush=True)
    slow = [r for r in results if r["path"] == "triton" and r["copy_fraction"] < 0.5]
    print(f"# checks passed on every shape; triton passes under 50% of copy bandwidth: {len(slow)} of "
          f"{sum(r['path'] == 'triton' for r in results)}")
    if ARGS.json:
        with open(ARGS.json, "w") as out:
            json.dump(dict(device=device_name, date=str(datetime.date.today()), copy_GBps=bandwidth / 1e9,
                           dtype=ARGS.dtype, results=results), out, indent=1)


if __name__ == "__main__":
    main()
