"""The cluster's shape, nodes x local ranks, read from the launcher's environment.

The hierarchical (2DH) all-to-all needs to know which ranks share a node. Launchers say it in different
variables; this module reads them in a fixed order of precedence, checks that they agree with each other and
with the rank numbering, and refuses uneven layouts with a clear error.

Precedence (first set wins): an explicit `local_size` argument, DS_TUTEL_LOCAL_SIZE (an explicit setting),
LOCAL_WORLD_SIZE (torchrun), LOCAL_SIZE (DeepSpeed's launcher, its CPU accelerator), OMPI_COMM_WORLD_LOCAL_SIZE
(Open MPI). With none of them set, every rank is assumed to sit on one node (so 2DH falls back to flat).
Ranks must be numbered node-major (rank = node * local_size + local_rank), as torchrun, DeepSpeed's launcher
and Open MPI's default mapping do.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

from ..launch.machine import TopologyError  # one error type for every topology problem in the package

EXPLICIT_ENV = "DS_TUTEL_LOCAL_SIZE"
LAUNCHER_ENVS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")
LOCAL_RANK_ENVS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")

__all__ = ["Topology", "GroupLayout", "TopologyError", "from_env"]


@dataclass(frozen=True)
class Topology:
    """world_size ranks on world_size // local_size nodes, rank r on node r // local_size."""

    world_size: int
    local_size: int
    source: str = "explicit"

    def __post_init__(self) -> None:
        for name in ("world_size", "local_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TopologyError(f"{name} must be a positive int, got {value!r}")
        if self.local_size > self.world_size:
            raise TopologyError(f"local size {self.local_size} (from {self.source}) exceeds the world size "
                                f"{self.world_size}")
        if self.world_size % self.local_size != 0:
            raise TopologyError(f"uneven nodes: world size {self.world_size} is not a multiple of the local size "
                                f"{self.local_size} (from {self.source}); every node must run the same number "
                                "of ranks")

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.local_size

    def node_of(self, rank: int) -> int:
        return rank // self.local_size

    def local_rank_of(self, rank: int) -> int:
        return rank % self.local_size

    def group_layout(self, ranks: Sequence[int]) -> Optional["GroupLayout"]:
        """How a process group's ranks (in group-rank order) spread over nodes; None if they are uneven.

        A group fits the hierarchy when its ranks are ascending, every node it touches holds the same number
        m of them, and they come node by node, so that group rank w = node_index * m + local_index.
        """
        ranks = list(ranks)
        if not ranks or any(b <= a for a, b in zip(ranks, ranks[1:])):
            return None
        nodes: List[int] = []
        members: List[List[int]] = []
        for r in ranks:
            node = self.node_of(r)
            if not nodes or nodes[-1] != node:
                nodes.append(node)
                members.append([])
            members[-1].append(r)
        m = len(members[0])
        if any(len(mem) != m for mem in members):
            return None
        return GroupLayout(ranks=tuple(ranks), nodes=tuple(nodes), ranks_per_node=m)


@dataclass(frozen=True)
class GroupLayout:
    """A group of n * m ranks: n nodes with m of its ranks each; group rank w is on node w // m."""

    ranks: tuple
    nodes: tuple
    ranks_per_node: int

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    def intra_ranks(self, node_index: int) -> List[int]:
        """The group's ranks on its node_index-th node (global ranks, ascending)."""
        m = self.ranks_per_node
        return list(self.ranks[node_index * m:(node_index + 1) * m])

    def inter_ranks(self, local_index: int) -> List[int]:
        """The group's ranks with this index inside their node, one per node (global ranks, ascending)."""
        return list(self.ranks[local_index::self.ranks_per_node])


def _read_int(environ: Mapping[str, str], name: str) -> Optional[int]:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise TopologyError(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise TopologyError(f"{name}={raw!r} must be >= 1")
    return value


def from_env(world_size: Optional[int] = None, rank: Optional[int] = None, local_size: Optional[int] = None,
             environ: Optional[Mapping[str, str]] = None) -> Topology:
    """The topology of this job; world_size and rank default to torch.distributed's, else WORLD_SIZE/RANK.

    Raises TopologyError for uneven nodes, launcher variables that disagree, or a LOCAL_RANK that does not
    match node-major numbering. Every check is local (no collective), so it can run before any communication.
    """
    env = os.environ if environ is None else environ
    if world_size is None or rank is None:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            world_size = dist.get_world_size() if world_size is None else world_size
            rank = dist.get_rank() if rank is None else rank
        else:
            world_size = world_size if world_size is not None else (_read_int(env, "WORLD_SIZE") or 1)
            rank = rank if rank is not None else int(env.get("RANK", "0"))

    if local_size is not None:
        topo = Topology(world_size, local_size, "explicit argument")
    elif _read_int(env, EXPLICIT_ENV) is not None:
        topo = Topology(world_size, _read_int(env, EXPLICIT_ENV), EXPLICIT_ENV)
    else:
        found = {name: _read_int(env, name) for name in LAUNCHER_ENVS}
        found = {name: value for name, value in found.items() if value is not None}
        if len(set(found.values())) > 1:
            raise TopologyError(f"launcher variables disagree on ranks per node: {found}; set {EXPLICIT_ENV} "
                                "to say which is right")
        if not found:
            return Topology(world_size, world_size, "default (no launcher variable: one node)")
        name, value = next(iter(found.items()))
        topo = Topology(world_size, value, name)

    for name in LOCAL_RANK_ENVS:
        raw = env.get(name)
        if raw is None or raw.strip() == "":
            continue
        try:
            local_rank = int(raw)
        except ValueError:
            raise TopologyError(f"{name}={raw!r} is not an integer") from None
        if local_rank != topo.local_rank_of(rank):
            raise TopologyError(f"{name}={local_rank} but rank {rank} with {topo.local_size} ranks per node "
                                f"(from {topo.source}) should have local rank {topo.local_rank_of(rank)}: "
                                "ranks must be numbered node by node")
    return topo
