"""All-to-all bandwidth against message size: flat vs hierarchical (2DH), the analogue of Tutel's a2a figure.

Two ways to run it:
  python benchmarks/bench_alltoall.py --world 4 --local-size 2      spawns 4 gloo ranks here ("2 nodes" x 2,
                                                                     all on loopback), writes JSON (+ PNG)
  python benchmarks/bench_alltoall.py --worker --rank R ...          one rank of a job started by someone else
                                                                     (benchmarks/emulated_cluster.py)
  deepspeed benchmarks/bench_alltoall.py --worker --from-env --backend nccl ...   a real cluster, the
                                                                     launcher's ranks and topology
  python benchmarks/bench_alltoall.py --plot a.json [b.json ...] --png out.png   redraws results
  python benchmarks/bench_alltoall.py --overlap ...                  the whole exchange (dispatch, experts,
                                                                     combine, forward + backward) at overlap
                                                                     degrees 1, 2, 4, against its floors

Size = bytes each rank sends in one all-to-all (its whole [E, C, M] buffer). For each size the algorithms run
interleaved (flat, 2dh, 2dh with the transposed intra-node hop, ...), each iteration timed between barriers and
taken as the slowest rank's time; the best and the median over iterations are reported. On a shared machine the
best of N is the time least disturbed by other work, so the comparisons and plots use it. Loops are bounded
both in count (--iters) and in time (--budget seconds per size). Also reported: the auto threshold this run
supports, i.e. the largest size up to which 2dh beat flat, by best and by median time, at every measured size
(0 when it never did): the value to give DS_TUTEL_A2A_AUTO_THRESHOLD on this cluster.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {  # name -> (algorithm, intra-node strategy); "2dh" is what the library picks for this layout
    "flat": ("flat", None),
    "2dh": ("2dh", None),
    "2dh_per_node": ("2dh", "per_node"),
    "2dh_transposed": ("2dh", "transposed"),
}
DEFAULT_VARIANTS = ["flat", "2dh", "2dh_per_node", "2dh_transposed"]
# 2dh must beat flat by this margin (median over median) before the threshold counts a size as a 2dh win.
WIN_MARGIN = 1.05


def parse_size(text: str) -> int:
    from ds_tutel.options import parse_bytes
    return parse_bytes(text)


def sizes_between(lo: int, hi: int, factor: int) -> List[int]:
    sizes, s = [], lo
    while s <= hi:
        sizes.append(s)
        s *= factor
    return sizes


def recommended_threshold(rows: List[Dict], margin: float = WIN_MARGIN) -> int:
    """Largest size such that 2dh beat flat by `margin`, in best and in median time, at it and at every smaller
    measured size (a single lucky or unlucky iteration must not make auto pick the slower algorithm)."""
    threshold = 0
    for row in sorted(rows, key=lambda r: r["bytes"]):
        if row["flat_s"] >= margin * row["2dh_s"] and row["flat_min_s"] >= margin * row["2dh_min_s"]:
            threshold = row["bytes"]
        else:
            break
    return threshold


# Peak buffers of one size on one rank, in units of the message: input, output, and the 2dh variants' scratch.
BUFFERS_PER_SIZE = 6


def _fits_in_memory(nbytes: int, device) -> bool:
    """Whether every rank sees nbytes within half of its free memory (a collective: all ranks agree)."""
    import torch
    import torch.distributed as dist
    available = 1 << 62  # unknown: do not refuse
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        available = int(line.split()[1]) * 1024
        except OSError:
            pass
    ok = torch.tensor([1.0 if nbytes <= available // 2 else 0.0], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # NCCL's wait() only orders streams; the clock needs the host to wait


def measure(sizes: List[int], variants: List[str], iters: int, budget_s: float, device, warmup: int = 1,
            log=print) -> List[Dict]:
    """Runs on every rank of an initialised job; returns rows (identical on every rank)."""
    import torch
    import torch.distributed as dist
    from ds_tutel.parallel import alltoall as comm

    world = dist.get_world_size()
    exchanges = {name: comm.plan_exchange(None, VARIANTS[name][0], device, intra_strategy=VARIANTS[name][1])
                 for name in variants}
    rows = []
    for nbytes in sizes:
        numel = max(world, nbytes // 4 // world * world)
        # CPU ranks may all share one machine's memory (they do here); a GPU has its own.
        sharing = world if device.type == "cpu" else 1
        if not _fits_in_memory(sharing * numel * 4 * BUFFERS_PER_SIZE, device):
            if dist.get_rank() == 0:
                log(f"{numel * 4:>10d} B skipped: {world} ranks would need more than half the available memory")
            break
        x = torch.randn(numel, device=device)
        times: Dict[str, List[float]] = {name: [] for name in variants}
        started = time.monotonic()
        for it in range(warmup + iters):
            for name in variants:
                dist.barrier()
                t0 = time.perf_counter()
                exchanges[name].start(x).wait()
                _sync(device)
                elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if it >= warmup:
                    times[name].append(float(elapsed))
            # Every rank must take the same decision to stop: broadcast rank 0's clock.
            over = torch.tensor([float(time.monotonic() - started > budget_s)], device=device)
            dist.broadcast(over, 0)
            if it >= warmup and over.item():
                break
        row = {"bytes": numel * 4, "iters": len(times[variants[0]])}
        for name in variants:
            row[f"{name}_s"] = statistics.median(times[name])
            row[f"{name}_min_s"] = min(times[name])
        row["speedup_2dh"] = row["flat_min_s"] / row["2dh_min_s"] if "2dh" in variants else None
        rows.append(row)
        if dist.get_rank() == 0:
            log(" ".join([f"{row['bytes']:>10d} B"] + [f"{n} {row[n + '_min_s'] * 1e3:8.2f} ({row[n + '_s'] * 1e3:.2f})"
                                                       for n in variants]
                         + ([f"ms best (median); 2dh/flat speed {row['speedup_2dh']:.2f}x"] if row["speedup_2dh"]
                            else ["ms best (median)"])))
    return rows


def measure_overlap(sizes: List[int], degrees: List[int], hidden: int, iters: int, budget_s: float, device,
                    log=print) -> List[Dict]:
    """exchange_and_compute forward + backward with an FFN expert (model dim 64, `hidden` wide), flat and 2dh at
    each overlap degree, next to its floors: the experts alone and the exchange alone (identity experts)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from ds_tutel.parallel.exchange import exchange_and_compute

    world = dist.get_world_size()
    M = 64
    gen = torch.Generator().manual_seed(dist.get_rank())
    w1_MH = torch.randn(M, hidden, generator=gen).div_(M ** 0.5).to(device).requires_grad_()
    w2_HM = torch.randn(hidden, M, generator=gen).div_(hidden ** 0.5).to(device).requires_grad_()

    def ffn(x_WLCM: torch.Tensor) -> torch.Tensor:
        return F.gelu(x_WLCM @ w1_MH) @ w2_HM

    rows = []
    for nbytes in sizes:
        C = max(1, nbytes // (4 * world * M))
        buf_ECM = torch.randn(world, C, M, generator=gen).to(device)
        cases = {"experts only": lambda: ffn(buf_ECM.view(world, 1, C, M).requires_grad_()).sum().backward(),
                 "exchange only": lambda: exchange_and_compute(buf_ECM.clone().requires_grad_(), lambda x: x * 1.0,
                                                               None, 1, "flat").sum().backward()}
        for algorithm in ("flat", "2dh"):
            for d in degrees:
                cases[f"{algorithm} d={d}"] = (lambda a=algorithm, d=d: exchange_and_compute(
                    buf_ECM.clone().requires_grad_(), ffn, None, 1, a, d).sum().backward())
        times: Dict[str, List[float]] = {name: [] for name in cases}
        started = time.monotonic()
        for it in range(1 + iters):
            for name, step in cases.items():
                dist.barrier()
                t0 = time.perf_counter()
                step()
                _sync(device)
                elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if it >= 1:
                    times[name].append(float(elapsed))
            over = torch.tensor([float(time.monotonic() - started > budget_s)], device=device)
            dist.broadcast(over, 0)
            if it >= 1 and over.item():
                break
        row = {"bytes": world * C * M * 4, "hidden": hidden, "iters": len(times["experts only"])}
        row.update({f"{name}_s": statistics.median(t) for name, t in times.items()})
        row.update({f"{name}_min_s": min(t) for name, t in times.items()})
        rows.append(row)
        if dist.get_rank() == 0:
            log(f"{row['bytes']:>10d} B  " + "  ".join(f"{name} {row[name + '_min_s'] * 1e3:.1f} "
                                                       f"({row[name + '_s'] * 1e3:.1f})" for name in cases)
                + " ms best (median)")
    return rows


def report(rows: List[Dict], args: argparse.Namespace, setup: str) -> Dict:
    import torch
    from ds_tutel.parallel import topology
    topo = topology.from_env()
    return {
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(terse=True)},
        "backend": args.backend, "setup": setup,
        "world": topo.world_size, "nodes": topo.num_nodes, "ranks_per_node": topo.local_size,
        "iters": args.iters, "budget_s": args.budget, "win_margin": WIN_MARGIN,
        "recommended_auto_threshold_bytes": (recommended_threshold(rows) if "2dh" in args.variants
                                             and not args.overlap else None),
        "mode": "overlap" if args.overlap else "alltoall",
        "rows": rows,
    }


def _short(res: Dict) -> str:
    where = "emulated link" if "netns" in res["setup"] else "loopback"
    return f"{res['nodes']}x{res['ranks_per_node']} {where}"


def plot(results: List[Dict], png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bw, ax_ratio) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, res in enumerate(results):
        xs = [r["bytes"] for r in res["rows"]]
        for name, style in (("flat", "-o"), ("2dh", "--s"), ("2dh_per_node", "-.x"), ("2dh_transposed", ":^")):
            if f"{name}_s" in res["rows"][0]:
                bw = [r["bytes"] / r[f"{name}_min_s"] / 1e6 for r in res["rows"]]
                ax_bw.plot(xs, bw, style, color=colors[i % len(colors)], label=f"{name}, {_short(res)}",
                           markersize=3)
        ax_ratio.plot(xs, [r["flat_min_s"] / r["2dh_min_s"] for r in res["rows"]], "-o", color=colors[i % len(colors)],
                      label=_short(res), markersize=3)
    for ax in (ax_bw, ax_ratio):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per rank")
        ax.grid(True, which="both", alpha=0.3)
    ax_bw.set_yscale("log")
    ax_bw.set_ylabel("bytes per rank / time, MB/s")
    ax_bw.set_title("all-to-all bandwidth, gloo (best of N)")
    ax_ratio.axhline(1.0, color="k", linewidth=0.8)
    ax_ratio.set_ylim(bottom=0)
    ax_ratio.set_ylabel("flat time / 2dh time (>1: 2dh wins)")
    ax_ratio.set_title("2dh vs flat")
    ax_bw.legend(fontsize=6, ncol=1)
    ax_ratio.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


def _init(args: argparse.Namespace, rank: int) -> "torch.device":
    """Initialises this rank (DeepSpeed's communication) and returns the device its buffers live on."""
    if not args.from_env:  # else the launcher (deepspeed, torchrun, mpirun) has set the variables
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.world), LOCAL_RANK=str(rank % args.local_size),
                          LOCAL_SIZE=str(args.local_size), LOCAL_WORLD_SIZE=str(args.local_size),
                          MASTER_ADDR=args.master_addr, MASTER_PORT=str(args.master_port))
    if args.backend == "gloo":
        os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import torch
    if args.backend == "gloo":
        torch.set_num_threads(1)
        device = torch.device("cpu")
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    import deepspeed
    deepspeed.init_distributed(dist_backend=args.backend, verbose=False)
    return device


def _worker(rank: int, args: argparse.Namespace, setup: str) -> None:
    import torch.distributed as dist
    device = _init(args, rank)
    try:
        sizes = sizes_between(parse_size(args.min_bytes), parse_size(args.max_bytes), args.factor)
        if args.overlap:
            rows = measure_overlap(sizes, args.degrees, args.hidden, args.iters, args.budget, device)
        else:
            rows = measure(sizes, args.variants, args.iters, args.budget, device)
        if rank == 0:
            result = report(rows, args, setup)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
            print(f"wrote {args.out}; recommended auto threshold: {result['recommended_auto_threshold_bytes']} B")
            if args.png and not args.overlap:
                plot([result], args.png)
                print(f"wrote {args.png}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--local-size", type=int, default=2, help="ranks per (emulated) node")
    p.add_argument("--min-bytes", default="1K")
    p.add_argument("--max-bytes", default="64M")
    p.add_argument("--factor", type=int, default=4, help="size step")
    p.add_argument("--iters", type=int, default=7, help="timed iterations per size at most")
    p.add_argument("--budget", type=float, default=4.0, help="seconds per size at most (after one iteration)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--out", default="benchmarks/results/alltoall_loopback.json")
    p.add_argument("--png", default=None)
    p.add_argument("--setup", default=None, help="what the network is (recorded in the JSON)")
    p.add_argument("--worker", action="store_true", help="run one rank of an externally started job")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=0)
    p.add_argument("--from-env", action="store_true",
                   help="with --worker: rank, world and topology from the launcher's environment (a real cluster)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"], help="nccl: CUDA buffers, one GPU a rank")
    p.add_argument("--plot", nargs="+", default=None, help="JSON results to draw into --png")
    p.add_argument("--overlap", action="store_true", help="time the overlapped exchange instead (see above)")
    p.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--hidden", type=int, default=256, help="expert FFN width for --overlap")
    args = p.parse_args(argv)

    if args.plot:
        results = []
        for path in args.plot:
            with open(path) as f:
                results.append(json.load(f))
        plot(results, args.png or "benchmarks/results/alltoall.png")
        return 0
    if args.world % args.local_size != 0:
        p.error(f"--local-size {args.local_size} must divide --world {args.world}")
    if "flat" not in args.variants:
        args.variants.insert(0, "flat")
    setup = args.setup or ("launcher's cluster" if args.from_env else "one machine, loopback (gloo over TCP)")
    if args.worker:
        _worker(int(os.environ.get("RANK", args.rank)) if args.from_env else args.rank, args, setup)
        return 0
    import torch.multiprocessing as mp
    args.master_port = args.master_port or _free_port()
    mp.start_processes(_spawned, args=(args, setup), nprocs=args.world, join=True, start_method="spawn")
    return 0


def _spawned(rank: int, args: argparse.Namespace, setup: str) -> None:
    _worker(rank, args, setup)


if __name__ == "__main__":
    sys.exit(main())
