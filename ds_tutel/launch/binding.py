"""CPU binding: which cores each rank of a node gets, and the rank start-up that applies it.

Plan (`plan_node`): a GPU rank gets an equal, disjoint share of the cores of its GPU's NUMA node (shared with
the other ranks whose GPUs sit on that node), so its host-side work, pinned buffers and NCCL proxy threads stay
next to its GPU and NIC. A CPU rank (DeepSpeed's CPU accelerator) gets a disjoint share of one NUMA node: ranks
are spread over the nodes in blocks and never span two. Leftover cores (when a node's cores do not divide
evenly) stay unbound rather than making shares unequal.

Start-up (`python -m ds_tutel.launch.binding [options] script [args]`): the rank entry both launchers run. It finds its
local rank (DeepSpeed's --local_rank / LOCAL_RANK, or Open MPI's OMPI_COMM_WORLD_LOCAL_RANK), binds itself with
os.sched_setaffinity, sets OMP_NUM_THREADS, applies the fabric preset, then exec()s a fresh interpreter on the
script: the script's imports (torch and its thread pools, CUDA, NCCL) start already bound, and first-touch memory
lands on the right NUMA node.

Standard library only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple

from . import fabric
from .machine import Machine, NumaNode, TopologyError, format_cpulist, get_machine, parse_cpulist, TOPOLOGY_NAMES

DEVICES = ("auto", "gpu", "cpu")
BINDING_ENV = "DS_TUTEL_BINDING"  # the applied binding, as JSON, for the script to read or report


@dataclass(frozen=True)
class Slot:
    """One local rank's place on its node."""
    local_rank: int
    gpu: Optional[int]
    numa_node: int
    cpus: Tuple[int, ...]
    nic: Optional[str]


def resolve_device(machine: Machine, device: str) -> str:
    """"gpu" or "cpu": "auto" means GPU ranks when the topology has GPUs."""
    if device not in DEVICES:
        raise TopologyError(f"unknown device {device!r}; known: {', '.join(DEVICES)}")
    if device == "auto":
        return "gpu" if machine.gpus else "cpu"
    if device == "gpu" and not machine.gpus:
        raise TopologyError(f"topology {machine.name} has no GPUs; use --device cpu for CPU ranks")
    return device


def default_nproc(machine: Machine, device: str) -> int:
    """Ranks per node when the user does not say: one per GPU, or one per NUMA node with CPUs."""
    if device == "gpu":
        return len(machine.gpus)
    return max(1, sum(1 for n in machine.numa_nodes if n.cpus))


def _split(node: NumaNode, parts: int) -> List[Tuple[int, ...]]:
    """`parts` equal, disjoint shares of a node: whole cores (SMT siblings together) while there are enough."""
    units: Sequence[Tuple[int, ...]] = node.cores
    if len(units) < parts:  # more ranks than cores: share out hardware threads instead
        units = [(c,) for c in node.cpus]
    size = len(units) // parts
    return [tuple(sorted(c for unit in units[i * size:(i + 1) * size] for c in unit)) for i in range(parts)]


def _plan_cpu(machine: Machine, nproc: int, gpus: Sequence[Optional[int]]) -> List[Slot]:
    nodes = [n for n in machine.numa_nodes if n.cpus]
    if not nodes:
        raise TopologyError(f"topology {machine.name} lists no CPUs")
    total = sum(len(n.cpus) for n in nodes)
    if nproc > total:
        raise TopologyError(f"topology {machine.name} has {total} CPUs; {nproc} ranks per node cannot each "
                            "have a core of their own")
    slots: List[Slot] = []
    if nproc <= len(nodes):
        for r in range(nproc):
            slots.append(Slot(r, gpus[r], nodes[r].id, tuple(nodes[r].cpus), None))
        return slots
    for j, node in enumerate(nodes):
        ranks = range(j * nproc // len(nodes), (j + 1) * nproc // len(nodes))
        if len(ranks) > len(node.cpus):
            raise TopologyError(f"NUMA node {node.id} of {machine.name} has {len(node.cpus)} CPUs but would get "
                                f"{len(ranks)} ranks")
        for r, share in zip(ranks, _split(node, len(ranks))):
            slots.append(Slot(r, gpus[r], node.id, share, None))
    return slots


def plan_node(machine: Machine, nproc: int, device: str, gpus: Optional[Sequence[int]] = None) -> List[Slot]:
    """Bindings of local ranks 0..nproc-1 on one node; `gpus[r]` is local rank r's GPU (default: GPU r)."""
    if nproc < 1:
        raise TopologyError(f"ranks per node must be at least 1, got {nproc}")
    device = resolve_device(machine, device)
    if device == "cpu":
        return _plan_cpu(machine, nproc, [None] * nproc)
    if nproc > len(machine.gpus):
        raise TopologyError(f"topology {machine.name} has {len(machine.gpus)} GPUs per node; {nproc} GPU ranks "
                            "per node asked (use --device cpu for CPU ranks)")
    used = list(gpus) if gpus is not None else list(range(nproc))
    if len(used) != nproc or len(set(used)) != nproc:
        raise TopologyError(f"need {nproc} distinct GPUs, got {used}")
    gpu_objs = [machine.gpu(i) for i in used]
    if any(g.numa is None for g in gpu_objs):
        # Nothing says where these GPUs are: bind like CPU ranks (disjoint, one NUMA node each), not by locality.
        print(f"[ds_tutel] warning: NUMA node of GPUs {[g.index for g in gpu_objs if g.numa is None]} unknown; "
              "binding ranks to disjoint cores without GPU locality", file=sys.stderr)
        return _plan_cpu(machine, nproc, used)
    slots: Dict[int, Slot] = {}
    for node_id in sorted({g.numa for g in gpu_objs}):
        node = machine.numa_node(node_id)
        ranks = [r for r, g in enumerate(gpu_objs) if g.numa == node_id]
        if len(ranks) > len(node.cpus):
            raise TopologyError(f"NUMA node {node_id} of {machine.name} has {len(node.cpus)} CPUs for "
                                f"{len(ranks)} GPU ranks")
        for r, share in zip(ranks, _split(node, len(ranks))):
            nic = machine.nic_for_gpu(used[r])
            slots[r] = Slot(r, used[r], node_id, share, nic.name if nic else None)
    return [slots[r] for r in range(nproc)]


def slot_env(slot: Slot, settings: Tuple[fabric.Setting, ...] = (), environ: Optional[Mapping[str, str]] = None,
             topo_file: Optional[str] = None) -> Dict[str, str]:
    """The variables rank start-up sets for `slot`, as they will be under `environ` (the user's win)."""
    environ = environ if environ is not None else {}
    env = {"OMP_NUM_THREADS": environ.get("OMP_NUM_THREADS", str(len(slot.cpus)))}
    if slot.gpu is not None:
        env["CUDA_DEVICE_ORDER"] = environ.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        for name, value in fabric.effective_preset(settings, environ).items():
            env[name] = topo_file if value == fabric.TOPO_FILE_PLACEHOLDER and topo_file else value
    return env


def bind_cpus(cpus: Sequence[int]) -> Tuple[int, ...]:
    """Binds this process (and the threads it starts later) to `cpus`, within what it is allowed.

    An outer binder (numactl, taskset, mpirun --bind-to, a container cpuset) may already have narrowed the
    allowed set: the rank then takes the overlap, or keeps the outer binding where there is none, and says so.
    """
    wanted = set(cpus)
    allowed = os.sched_getaffinity(0)
    target = wanted & allowed
    if not target:
        print(f"[ds_tutel] warning: planned CPUs {format_cpulist(wanted)} are outside this process's allowed CPUs "
              f"{format_cpulist(allowed)} (set by an outer binder); keeping those", file=sys.stderr)
        return tuple(sorted(allowed))
    if target != wanted:
        print(f"[ds_tutel] warning: bound to {format_cpulist(target)}, only part of the planned "
              f"{format_cpulist(wanted)}: an outer binder allows {format_cpulist(allowed)} (with mpirun, pass "
              "--bind-to none)", file=sys.stderr)
    os.sched_setaffinity(0, target)
    return tuple(sorted(target))


def online_cpus(root: str = "/sys") -> Tuple[int, ...]:
    """CPUs this machine has online (all of 0..cpu_count-1 where sysfs does not say)."""
    try:
        with open(os.path.join(root, "devices/system/cpu/online")) as f:
            return parse_cpulist(f.read())
    except OSError:
        return tuple(range(os.cpu_count() or 1))


# ---- rank start-up ----

def _first_int(environ: Mapping[str, str], names: Sequence[str]) -> Optional[int]:
    for name in names:
        value = environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return None


def local_rank_and_size(environ: Mapping[str, str], local_rank: Optional[int] = None) -> Tuple[int, int]:
    """This rank's place on its node, from DeepSpeed's or Open MPI's environment."""
    rank = local_rank if local_rank is not None else _first_int(
        environ, ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"))
    size = _first_int(environ, ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"))
    if rank is None or size is None:
        raise TopologyError("cannot tell this rank's local rank and local size: start it with the deepspeed "
                            "launcher or mpirun (LOCAL_RANK/LOCAL_SIZE or OMPI_COMM_WORLD_LOCAL_RANK/_SIZE)")
    if not 0 <= rank < size:
        raise TopologyError(f"local rank {rank} is outside a node of {size} ranks")
    return rank, size


def visible_gpus(environ: Mapping[str, str], nproc: int) -> Optional[List[int]]:
    """Physical GPU of each local rank from CUDA_VISIBLE_DEVICES (as the deepspeed launcher sets it)."""
    parts = [p.strip() for p in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if p.strip()]
    if len(parts) == nproc and all(p.isdigit() for p in parts):
        return [int(p) for p in parts]
    return None


def package_parent() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the folder above ds_tutel/


def prepare_rank(args: argparse.Namespace, environ: MutableMapping[str, str]) -> Slot:
    """Binds this process for its local rank and fills `environ` for the script; returns the binding."""
    machine = get_machine(args.topology, args.sysfs)
    device = resolve_device(machine, args.device)
    local_rank, nproc = local_rank_and_size(environ, args.local_rank)
    gpus = visible_gpus(environ, nproc) if device == "gpu" else None
    slot = plan_node(machine, nproc, device, gpus)[local_rank]
    missing = set(slot.cpus) - set(online_cpus())
    if missing:
        raise TopologyError(f"topology {machine.name} plans CPUs {format_cpulist(slot.cpus)} for local rank "
                            f"{local_rank}, but this machine has no CPUs {format_cpulist(missing)}: use "
                            "--topology local")
    bound = bind_cpus(slot.cpus)
    slot = Slot(slot.local_rank, slot.gpu, slot.numa_node, bound, slot.nic)

    settings: Tuple[fabric.Setting, ...] = ()
    topo_file = None
    if device == "gpu":
        fabric_name = fabric.default_fabric(machine) if args.fabric == "auto" else args.fabric
        settings = fabric.preset_for(fabric_name, machine)
        if any(s.value == fabric.TOPO_FILE_PLACEHOLDER for s in settings) and "NCCL_TOPO_FILE" not in environ:
            topo_file = fabric.write_nccl_topology(machine)
    for name, value in slot_env(slot, settings, environ, topo_file).items():
        environ.setdefault(name, value)
    # DeepSpeed's CPU accelerator counts a node's ranks from LOCAL_SIZE, which mpirun does not set.
    environ.setdefault("LOCAL_SIZE", str(nproc))
    # The script imports the same ds_tutel this start-up came from.
    path = environ.get("PYTHONPATH", "")
    if package_parent() not in path.split(os.pathsep):
        environ["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent(), path) if p)
    environ[BINDING_ENV] = json.dumps({**asdict(slot), "cpus": format_cpulist(slot.cpus), "device": device,
                                       "topology": machine.name})
    return slot


def _rank_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ds_tutel.launch.binding",
                                description="Bind this rank's CPUs for its GPU / NUMA node, then run the script.")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="local rank (the deepspeed launcher passes it; else LOCAL_RANK / OMPI_COMM_WORLD_LOCAL_RANK)")
    p.add_argument("--topology", default="local", help=f"machine description: {', '.join(TOPOLOGY_NAMES)}")
    p.add_argument("--sysfs", default="/sys", help="sysfs root read by --topology local")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--fabric", default="auto", help="fabric preset: auto (the topology's own), none, ndv4")
    p.add_argument("--module", action="store_true", help="the script is a module name (python -m)")
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = _rank_parser().parse_args(argv)
    try:
        slot = prepare_rank(args, os.environ)
    except TopologyError as e:
        print(f"python -m ds_tutel.launch.binding: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"[ds_tutel] local rank {slot.local_rank}: CPUs {format_cpulist(slot.cpus)} (NUMA node "
          f"{slot.numa_node}), GPU {slot.gpu}, NIC {slot.nic}", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-u"] + (["-m"] if args.module else []) + [args.script]
    if args.local_rank is not None:  # hand it on, as the deepspeed launcher would have
        cmd.append(f"--local_rank={args.local_rank}")
    cmd += args.script_args
    sys.stdout.flush()
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()
