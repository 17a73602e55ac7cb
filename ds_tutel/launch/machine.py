"""Hardware topology of one machine: NUMA nodes and their CPUs, GPUs, RDMA NICs, and which node each sits on.

A `Machine` is what the CPU binding (binding.py) and the fabric presets (fabric.py) are computed from. It comes
either from a built-in description of a known machine type (`ndv4`: Azure NDm A100 v4) or from the running
machine (`local`), read from sysfs:
  /sys/devices/system/node/node*/cpulist      NUMA nodes and their CPUs
  /sys/devices/system/cpu/online              CPUs that are online
  /sys/bus/pci/devices/*/{vendor,class,numa_node,infiniband/}   GPUs and RDMA NICs
and, where sysfs does not know a GPU's NUMA node (numa_node = -1 on some VMs), `nvidia-smi topo -m`.

This module imports only the standard library: the rank start-up code reads it before torch is imported.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

NVIDIA_VENDOR = "0x10de"
GPU_CLASSES = ("0x0300", "0x0302")  # VGA and 3D controllers; NVSwitch bridges (0x0680) are not GPUs
INFINIBAND_CLASS = "0x0207"


class TopologyError(ValueError):
    """A topology cannot be found, read or used: the message says which and why."""


@dataclass(frozen=True)
class NumaNode:
    id: int
    cores: Tuple[Tuple[int, ...], ...]  # each physical core's hardware threads (SMT siblings)

    @property
    def cpus(self) -> Tuple[int, ...]:
        return tuple(sorted(c for core in self.cores for c in core))


@dataclass(frozen=True)
class Gpu:
    index: int            # CUDA index with CUDA_DEVICE_ORDER=PCI_BUS_ID
    pci: str              # PCI address, domain:bus:device.function
    numa: Optional[int]   # None when neither sysfs nor nvidia-smi knows


@dataclass(frozen=True)
class Nic:
    name: str             # RDMA device name, as NCCL_IB_HCA and UCX_NET_DEVICES spell it
    pci: str
    numa: Optional[int]


@dataclass(frozen=True)
class Machine:
    """One machine type: what binding and fabric presets need to know about it."""
    name: str
    numa_nodes: Tuple[NumaNode, ...]
    gpus: Tuple[Gpu, ...] = ()
    nics: Tuple[Nic, ...] = ()
    # NCCL's CPU model for its topology file (vendor, family, model); empty when unknown.
    cpu_model: Tuple[str, int, int] = ()

    @property
    def cpus(self) -> Tuple[int, ...]:
        return tuple(sorted(c for n in self.numa_nodes for c in n.cpus))

    def numa_node(self, node_id: int) -> NumaNode:
        for node in self.numa_nodes:
            if node.id == node_id:
                return node
        raise TopologyError(f"{self.name}: no NUMA node {node_id} (nodes: {[n.id for n in self.numa_nodes]})")

    def gpu(self, index: int) -> Gpu:
        for gpu in self.gpus:
            if gpu.index == index:
                return gpu
        raise TopologyError(f"{self.name}: no GPU {index} (it has {len(self.gpus)})")

    def nic_for_gpu(self, index: int) -> Optional[Nic]:
        """The NIC beside a GPU: the k-th NIC of the GPU's NUMA node for its k-th GPU (PCI order)."""
        gpu = self.gpu(index)
        if gpu.numa is None:
            return None
        local_gpus = [g.index for g in self.gpus if g.numa == gpu.numa]
        local_nics = [n for n in self.nics if n.numa == gpu.numa]
        if not local_nics:
            return None
        return local_nics[local_gpus.index(index) % len(local_nics)]


# ---- cpulist strings ("0-3,8,10-11"), the format of sysfs, taskset -c and numactl -C ----

def parse_cpulist(text: str) -> Tuple[int, ...]:
    """Parses a Linux cpulist such as "0-3,8"; raises TopologyError on anything else."""
    cpus: List[int] = []
    text = text.strip()
    if not text:
        return ()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise TopologyError(f"not a CPU list: {text!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        cpus.extend(range(lo, hi + 1))
    return tuple(sorted(set(cpus)))


def format_cpulist(cpus: Iterable[int]) -> str:
    """Formats CPUs as a compact cpulist: [0, 1, 2, 5] -> "0-2,5"."""
    ordered = sorted(set(cpus))
    runs: List[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        runs.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(runs)


# ---- built-in machine types ----

def ndv4() -> Machine:
    """Azure NDm A100 v4 (ND96amsr_A100_v4; ND96asr_v4 has the same layout).

    96 AMD EPYC 7V12 cores (2 sockets, SMT off), 4 NUMA nodes of 24 cores; each NUMA node holds one PCIe switch
    with 2 A100 GPUs and 2 HDR InfiniBand NICs. The GPU -> NUMA map is not monotonic: GPUs 0-1 sit on node 1,
    2-3 on node 0, 4-5 on node 3, 6-7 on node 2 (Azure's published CPU masks for these VMs). NICs follow PCI
    order, mlx5_i beside GPU i.
    """
    nodes = tuple(NumaNode(n, tuple((c,) for c in range(24 * n, 24 * (n + 1)))) for n in range(4))
    gpu_numa = (1, 1, 0, 0, 3, 3, 2, 2)
    gpu_pci = ("0001", "0002", "0003", "0004", "000b", "000c", "000d", "000e")
    gpus = tuple(Gpu(i, f"{gpu_pci[i]}:00:00.0", gpu_numa[i]) for i in range(8))
    nics = tuple(Nic(f"mlx5_{i}", f"{0x101 + i:04x}:00:00.0", gpu_numa[i]) for i in range(8))
    return Machine("ndv4", nodes, gpus, nics, cpu_model=("AuthenticAMD", 23, 49))


# ---- reading the running machine from sysfs ----

def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _pci_sort_key(address: str) -> Tuple[int, ...]:
    return tuple(int(x, 16) for x in re.split(r"[:.]", address))


def _group_cores(root: str, cpus: Sequence[int]) -> Tuple[Tuple[int, ...], ...]:
    """Groups CPUs into physical cores by their SMT siblings (a CPU alone where sysfs does not say)."""
    cores: Dict[Tuple[int, ...], List[int]] = {}
    for cpu in cpus:
        text = _read(os.path.join(root, f"devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"))
        siblings = parse_cpulist(text) if text else (cpu,)
        cores.setdefault(siblings, []).append(cpu)
    return tuple(tuple(threads) for _, threads in sorted(cores.items(), key=lambda kv: min(kv[1])))


def parse_nvidia_smi_topo(text: str) -> Dict[int, int]:
    """GPU index -> NUMA node from `nvidia-smi topo -m` output (its "NUMA Affinity" column)."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    header = next((line for line in lines if "NUMA Affinity" in line), None)
    if header is None:
        return {}
    columns = [c.strip() for c in header.split("\t") if c.strip()]
    numa_col = columns.index("NUMA Affinity")
    result: Dict[int, int] = {}
    for line in lines:
        m = re.match(r"\s*GPU(\d+)\t", line)
        if not m:
            continue
        # Row cells: the row name, then one cell per header column.
        cells = [c.strip() for c in line.split("\t") if c.strip()]
        value = cells[1 + numa_col] if len(cells) > 1 + numa_col else ""
        if value.isdigit():
            result[int(m.group(1))] = int(value)
    return result


def run_nvidia_smi_topo() -> Optional[str]:
    """`nvidia-smi topo -m` output, or None where nvidia-smi is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        return subprocess.run([exe, "topo", "-m"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def read_machine(root: str = "/sys", nvidia_smi_topo: Optional[Callable[[], Optional[str]]] = None,
                 name: str = "local") -> Machine:
    """Describes the machine whose sysfs is mounted at `root` (a fake tree in tests).

    `nvidia_smi_topo` returns `nvidia-smi topo -m` text; it is asked only when some GPU's NUMA node is unknown.
    """
    online_text = _read(os.path.join(root, "devices/system/cpu/online"))
    online = set(parse_cpulist(online_text)) if online_text else None
    # A container's cpuset (cgroup v2) limits every rank alike: plan within it.
    cpuset_text = _read(os.path.join(root, "fs/cgroup/cpuset.cpus.effective"))
    if cpuset_text:
        cpuset = set(parse_cpulist(cpuset_text))
        online = cpuset if online is None else online & cpuset
    node_dir = os.path.join(root, "devices/system/node")
    nodes: List[NumaNode] = []
    if os.path.isdir(node_dir):
        for entry in os.listdir(node_dir):
            m = re.fullmatch(r"node(\d+)", entry)
            if not m:
                continue
            cpus = parse_cpulist(_read(os.path.join(node_dir, entry, "cpulist")) or "")
            if online is not None:
                cpus = tuple(c for c in cpus if c in online)
            nodes.append(NumaNode(int(m.group(1)), _group_cores(root, cpus)))
    if not nodes:  # a kernel without NUMA support: one node holding every online CPU
        if not online:
            raise TopologyError(f"cannot read CPUs from {root}: no devices/system/node/node*/cpulist "
                                "and no devices/system/cpu/online")
        nodes = [NumaNode(0, _group_cores(root, tuple(sorted(online))))]
    nodes.sort(key=lambda n: n.id)
    single_node = nodes[0].id if len(nodes) == 1 else None

    def numa_of(dev: str) -> Optional[int]:
        text = _read(os.path.join(dev, "numa_node"))
        value = int(text) if text and re.fullmatch(r"-?\d+", text) else -1
        return value if value >= 0 else single_node

    pci_dir = os.path.join(root, "bus/pci/devices")
    gpu_devs: List[Tuple[str, Optional[int]]] = []
    ib_nics: List[Nic] = []
    other_rdma: List[Nic] = []
    for address in sorted(os.listdir(pci_dir) if os.path.isdir(pci_dir) else [], key=_pci_sort_key):
        dev = os.path.join(pci_dir, address)
        cls = (_read(os.path.join(dev, "class")) or "").lower()
        if (_read(os.path.join(dev, "vendor")) or "").lower() == NVIDIA_VENDOR and cls.startswith(GPU_CLASSES):
            gpu_devs.append((address, numa_of(dev)))
        ib_dir = os.path.join(dev, "infiniband")
        if os.path.isdir(ib_dir):
            for rdma_name in sorted(os.listdir(ib_dir)):
                nic = Nic(rdma_name, address, numa_of(dev))
                (ib_nics if cls.startswith(INFINIBAND_CLASS) else other_rdma).append(nic)

    if any(numa is None for _, numa in gpu_devs) and nvidia_smi_topo is not None:
        text = nvidia_smi_topo()
        from_smi = parse_nvidia_smi_topo(text) if text else {}
        gpu_devs = [(addr, numa if numa is not None else from_smi.get(i)) for i, (addr, numa) in enumerate(gpu_devs)]
    gpus = tuple(Gpu(i, addr, numa) for i, (addr, numa) in enumerate(gpu_devs))
    # InfiniBand HCAs when there are any; RoCE (RDMA on Ethernet) NICs otherwise.
    nics = tuple(ib_nics or other_rdma)
    return Machine(name, tuple(nodes), gpus, nics)


def local_machine(root: str = "/sys") -> Machine:
    """The running machine, from sysfs and (for GPUs whose NUMA node sysfs lacks) nvidia-smi."""
    return read_machine(root, nvidia_smi_topo=run_nvidia_smi_topo)


BUILTIN: Dict[str, Callable[[], Machine]] = {"ndv4": ndv4}
TOPOLOGY_NAMES: Sequence[str] = ("local", *BUILTIN)


def get_machine(topology: str, sysfs_root: str = "/sys") -> Machine:
    """The machine named `topology`: "local" reads sysfs at `sysfs_root`, others are built-in descriptions."""
    if topology == "local":
        return local_machine(sysfs_root)
    if topology in BUILTIN:
        return BUILTIN[topology]()
    raise TopologyError(f"unknown topology {topology!r}; known: {', '.join(TOPOLOGY_NAMES)}")
