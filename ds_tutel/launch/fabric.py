"""Fabric presets: the NCCL environment a machine type needs, each setting with the reason it is there.

A preset is applied with `setdefault` semantics: a variable the user's environment already sets is left alone.
`nccl_topology_xml` writes the NCCL topology file (NCCL_TOPO_FILE) from a `Machine` description, so the file
and the CPU binding can never disagree about which GPU and NIC sit on which NUMA node.

Standard library only (read at rank start-up, before torch).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import textwrap
from dataclasses import dataclass
from typing import Dict, Mapping, MutableMapping, Optional, Tuple

from .machine import Machine, TopologyError

TOPO_FILE_PLACEHOLDER = "<nccl-topo.xml>"


@dataclass(frozen=True)
class Setting:
    name: str
    value: str
    why: str


def ndv4_preset(machine: Machine) -> Tuple[Setting, ...]:
    """NCCL settings for NDm A100 v4 over its 8 HDR InfiniBand NICs."""
    hcas = ",".join(nic.name for nic in machine.nics)
    return (
        Setting("NCCL_TOPO_FILE", TOPO_FILE_PLACEHOLDER,
                "Hyper-V shows each GPU and NIC as its own PCI root and hides the PCIe switches; this file puts "
                "each NUMA node's 2 GPUs and 2 NICs under one switch, so NCCL pairs every GPU with the NIC "
                "beside it and uses GPUDirect RDMA."),
        Setting("CUDA_DEVICE_ORDER", "PCI_BUS_ID",
                "CUDA numbers GPUs in PCI order, the order of the topology file and of the CPU binding."),
        Setting("NCCL_IB_PCI_RELAXED_ORDERING", "1",
                "PCIe relaxed ordering for the HCAs' memory: in the VM, GPUDirect RDMA goes through address "
                "translation (ATS), and strict ordering stalls it well below line rate."),
        Setting("NCCL_IB_HCA", "=" + hcas,
                "Exactly these 8 InfiniBand HCAs ('=' means exact names): keeps NCCL off the accelerated-"
                "networking Ethernet function, which is an mlx5 RDMA device too."),
        Setting("NCCL_SOCKET_IFNAME", "eth0",
                "Bootstrap and out-of-band traffic over the VM's Ethernet, not IPoIB or container bridges."),
        Setting("NCCL_IB_SL", "1",
                "The InfiniBand service level on which Azure enables adaptive routing (the default level 0 "
                "keeps in-order delivery for older MPIs)."),
        Setting("NCCL_IB_ADAPTIVE_ROUTING", "1",
                "Send in the adaptive-routing-safe way (data, then a separate completion write), so switches "
                "may spread one connection's packets over many paths: all-to-all makes many flows collide."),
        Setting("NCCL_IB_AR_THRESHOLD", "0",
                "Adaptive routing for small messages too (default: only above 8 KiB). MoE all-to-all sends "
                "one chunk per peer, often small; costs one extra zero-byte write per message."),
    )


PRESETS = {"ndv4": ndv4_preset}


def preset_for(fabric: str, machine: Machine) -> Tuple[Setting, ...]:
    """The settings of preset `fabric` ("none" for no preset) for `machine`."""
    if fabric == "none":
        return ()
    if fabric not in PRESETS:
        raise TopologyError(f"unknown fabric preset {fabric!r}; known: none, {', '.join(PRESETS)}")
    if fabric == "ndv4" and (len(machine.gpus) != 8 or len(machine.nics) != 8):
        raise TopologyError(f"fabric preset ndv4 needs 8 GPUs and 8 InfiniBand NICs; topology {machine.name} "
                            f"has {len(machine.gpus)} GPUs and {len(machine.nics)} NICs")
    return PRESETS[fabric](machine)


def default_fabric(machine: Machine) -> str:
    """The preset a topology gets unless the user picks one: its own, if it has one."""
    return machine.name if machine.name in PRESETS else "none"


def apply_preset(settings: Tuple[Setting, ...], env: MutableMapping[str, str],
                 topo_file: Optional[str] = None) -> Dict[str, str]:
    """Sets each variable the environment does not already set; returns what was set."""
    applied: Dict[str, str] = {}
    for s in settings:
        if s.name in env:
            continue
        value = s.value
        if value == TOPO_FILE_PLACEHOLDER:
            if topo_file is None:
                continue
            value = topo_file
        env[s.name] = applied[s.name] = value
    return applied


def effective_preset(settings: Tuple[Setting, ...], env: Mapping[str, str]) -> Dict[str, str]:
    """What each preset variable will be under `env`: the user's value where set, else the preset's."""
    return {s.name: env.get(s.name, s.value) for s in settings}


def _affinity_mask(cpus: Tuple[int, ...], ncpus: int) -> str:
    """NCCL's CPU mask format: comma-separated 32-bit hex words, most significant first."""
    bits = 0
    for c in cpus:
        bits |= 1 << c
    words = [(bits >> (32 * w)) & 0xFFFFFFFF for w in range((max(ncpus, 1) + 31) // 32)]
    return ",".join(f"{w:08x}" for w in reversed(words))


def nccl_topology_xml(machine: Machine) -> str:
    """NCCL topology file: per NUMA node, a CPU with one PCIe switch holding that node's GPUs and NICs."""
    ncpus = max(machine.cpus) + 1 if machine.cpus else 0
    vendor, family, model = machine.cpu_model or ("", 0, 0)
    lines = ['<system version="1">']
    for switch, node in enumerate(n for n in machine.numa_nodes
                                  if any(g.numa == n.id for g in machine.gpus)):
        cpu_attrs = f'numaid="{node.id}" affinity="{_affinity_mask(node.cpus, ncpus)}" arch="x86_64"'
        if vendor:
            cpu_attrs += f' vendor="{vendor}" familyid="{family}" modelid="{model}"'
        lines.append(f"  <cpu {cpu_attrs}>")
        # A synthetic bridge address that cannot collide with a real device.
        lines.append(f'    <pci busid="ffff:ff:{switch + 1:02x}.0" class="0x060400" '
                     'link_speed="16 GT/s" link_width="16">')
        devices = [(g.pci, "0x030200") for g in machine.gpus if g.numa == node.id]
        devices += [(n.pci, "0x020700") for n in machine.nics if n.numa == node.id]
        for pci, cls in sorted(devices):
            lines.append(f'      <pci busid="{pci}" class="{cls}" link_speed="16 GT/s" link_width="16"/>')
        lines.append("    </pci>")
        lines.append("  </cpu>")
    lines.append("</system>")
    return "\n".join(lines) + "\n"


def nccl_topology_path(machine: Machine, directory: Optional[str] = None) -> str:
    """Where `write_nccl_topology` puts the file: named by content, so equal descriptions share one file."""
    digest = hashlib.sha1(nccl_topology_xml(machine).encode()).hexdigest()[:12]
    return os.path.join(directory or tempfile.gettempdir(), f"ds_tutel-nccl-topo-{machine.name}-{digest}.xml")


def write_nccl_topology(machine: Machine, directory: Optional[str] = None) -> str:
    """Writes the topology file into `directory` (default: the temp dir) unless there; returns its path.

    Every rank of a node may call this at once: the file is written under a temporary name and renamed.
    """
    path = nccl_topology_path(machine, directory)
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".ds_tutel-topo-")
        with os.fdopen(fd, "w") as f:
            f.write(nccl_topology_xml(machine))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    return path


def render_env_file(fabric: str, machine: Machine) -> str:
    """A bash file to `source`, one commented `export NAME="${NAME:-value}"` per preset setting."""
    command = f"python -m ds_tutel.launch --topology {machine.name} --print-fabric {fabric}"
    out = [f"# NCCL settings for {fabric}, generated by `{command}`.",
           "# Source it in bash; a variable already set in your environment keeps its value.", ""]
    for s in preset_for(fabric, machine):
        value = s.value
        if value == TOPO_FILE_PLACEHOLDER:
            value = '$(dirname "${BASH_SOURCE[0]}")/nccl-topo.xml'
        out.extend("# " + line for line in textwrap.wrap(s.why, 110))
        out.append(f'export {s.name}="${{{s.name}:-{value}}}"')
        out.append("")
    return "\n".join(out)
