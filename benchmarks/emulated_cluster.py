"""An emulated two-node cluster on one Linux machine, and the all-to-all benchmark run across it.

Two network namespaces ("nodes") joined by a veth pair whose two ends are shaped with tc's token bucket filter
(tbf, e.g. 2 Gbit/s each way); each node runs its ranks inside its namespace, where traffic between its own
ranks stays on that namespace's loopback and traffic to the other node crosses the shaped link. So flat and
2dh pay for inter-node bytes and messages as they would on a real (if slow and latency-free) fabric. netem,
for added latency, is not used (not every kernel has it).

    sudo python benchmarks/emulated_cluster.py --ranks-per-node 2 --rate 2gbit -- --max-bytes 16M --iters 5

Arguments after `--` go to benchmarks/bench_alltoall.py (sizes, iterations, budget, --out, --png).
Needs root, `ip` and `tc`. It creates its own namespaces, veth pair and 10.x addresses (named after its process
id, so two runs do not collide), uses no other address, and removes everything on exit, error or signal.
Every wait is bounded: rank processes are killed after --timeout seconds.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BENCH = os.path.join(HERE, "bench_alltoall.py")
MASTER_PORT = 29511  # inside a fresh namespace nothing else listens


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=30)


class TwoNodeNet:
    """Namespaces n0/n1, a veth pair between them shaped with tbf, addresses 10.213.<k>.1 and .2."""

    def __init__(self, rate: str, burst: str, queue_latency: str, mtu: int) -> None:
        tag = os.getpid() % 100000
        self.ns = [f"dstutel{tag}n0", f"dstutel{tag}n1"]
        self.dev = [f"dtv{tag}a", f"dtv{tag}b"]
        subnet = f"10.213.{tag % 250}"
        self.addr = [f"{subnet}.1", f"{subnet}.2"]
        self.rate, self.burst, self.queue_latency, self.mtu = rate, burst, queue_latency, mtu
        self.created = False

    def __enter__(self) -> "TwoNodeNet":
        self.created = True
        for ns in self.ns:
            sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
        for ns, dev, addr in zip(self.ns, self.dev, self.addr):
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "mtu", str(self.mtu))
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate, "burst", self.burst,
               "latency", self.queue_latency)
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        if not self.created:
            return
        for ns in self.ns:  # deleting a namespace deletes the veth end inside it, and so the pair
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", self.dev[0], check=False)
        self.created = False

    def describe(self) -> str:
        return (f"2 netns joined by veth (mtu {self.mtu}), tbf rate {self.rate} burst {self.burst} each way, "
                "no added latency; intra-node on loopback (gloo over TCP)")


def check_link(net: TwoNodeNet, nbytes: int = 32 << 20, timeout: float = 60.0) -> float:
    """MB/s of one TCP stream across the shaped link (a bounded transfer), to confirm the shaping."""
    server = ("import socket,sys;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
              f"s.bind(('{net.addr[0]}',{MASTER_PORT + 1}));s.listen(1);c,_=s.accept();n=0\n"
              "while True:\n b=c.recv(1<<20)\n if not b: break\n n+=len(b)\nprint(n)")
    client = ("import socket,time;s=None\n"
              "for _ in range(100):\n"
              " try:\n"
              f"  s=socket.create_connection(('{net.addr[0]}',{MASTER_PORT + 1}),timeout=5);break\n"
              " except OSError: time.sleep(0.05)\n"
              f"buf=bytes(1<<20);t=time.perf_counter()\nfor _ in range({nbytes >> 20}): s.sendall(buf)\n"
              "s.shutdown(1);s.recv(1);print(time.perf_counter()-t)")
    srv = subprocess.Popen(["ip", "netns", "exec", net.ns[0], sys.executable, "-c", server], stdout=subprocess.PIPE,
                           text=True)
    try:
        out = subprocess.run(["ip", "netns", "exec", net.ns[1], sys.executable, "-c", client], capture_output=True,
                             text=True, timeout=timeout, check=True).stdout
        srv.wait(timeout=timeout)
    finally:
        if srv.poll() is None:
            srv.kill()
    return nbytes / float(out.strip()) / 1e6


def run_ranks(net: TwoNodeNet, ranks_per_node: int, bench_args: List[str], timeout: float) -> int:
    """Starts every rank in its node's namespace; waits for all, at most `timeout` seconds."""
    world = 2 * ranks_per_node
    procs = []
    env_base = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for rank in range(world):
        node = rank // ranks_per_node
        env = dict(env_base, GLOO_SOCKET_IFNAME=net.dev[node])
        cmd = ["ip", "netns", "exec", net.ns[node], sys.executable, BENCH, "--worker", "--rank", str(rank),
               "--world", str(world), "--local-size", str(ranks_per_node), "--master-addr", net.addr[0],
               "--master-port", str(MASTER_PORT), "--setup", net.describe(), *bench_args]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=None if rank == 0 else subprocess.DEVNULL))
    deadline = time.monotonic() + timeout
    codes: List[Optional[int]] = [None] * world
    try:
        while time.monotonic() < deadline and any(c is None for c in codes):
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0)]
    if failed:
        print(f"ranks failed (rank, exit code): {failed}; the others were stopped", file=sys.stderr)
        return 1
    if any(c is None for c in codes):
        print(f"ranks still running after {timeout}s: killed", file=sys.stderr)
        return 124
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, bench_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--rate", default="2gbit", help="tbf rate of each direction of the inter-node link")
    p.add_argument("--burst", default="256kb", help="tbf bucket size")
    p.add_argument("--queue-latency", default="50ms", help="tbf queue limit, as time at the rate")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before the ranks are killed")
    p.add_argument("--no-link-check", action="store_true")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root (network namespaces and tc)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            p.error(f"needs `{tool}` (iproute2)")

    net = TwoNodeNet(args.rate, args.burst, args.queue_latency, args.mtu)

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)  # unwinds through the with-block, which removes the namespaces

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    with net:
        print(net.describe())
        if not args.no_link_check:
            print(f"link check: one TCP stream {check_link(net):.0f} MB/s across the shaped link")
        return run_ranks(net, args.ranks_per_node, bench_args, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
