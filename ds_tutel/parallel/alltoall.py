"""Collectives over the expert-parallel group: flat and hierarchical (2DH) all-to-all, sync and async.

The process groups are the ones DeepSpeed creates (deepspeed.utils.groups); the 2DH subgroups are created here
once per expert-parallel group through DeepSpeed's communication layer. The collectives themselves are
torch.distributed's all_to_all_single (the one form gloo supports), so everything runs on gloo (CPU) and NCCL
(GPU) alike.

An all-to-all here always means: the input is W equal blocks along dim 0, block w goes to group rank w, and the
output holds the block every rank w sent to this rank, in group-rank order. Flat does that in one collective.
2DH (group of n nodes x m ranks per node, group rank w = node * m + local) does it in two hops so that each
rank sends n - 1 large messages over the network (one per remote node, to the rank with its own local index
there) instead of (n - 1) * m small ones:
  1. inter-node: block [a, :] (everything for node a) goes to the rank with my local index on node a;
  2. intra-node: each received [a, j] goes to local rank j.
The blocks for my own node skip the network hop and start their intra-node hop at once, overlapping hop 1, and
a rank's block for itself is copied locally rather than through the transport where the split allows it. Up to a
few nodes hop 2 runs once per source node straight into the output (no layout copies); beyond that, once on a
transposed copy (one launch). The choice of flat or 2dh is the same on every rank of a group (it depends only on
the buffer's size and the group's layout), as it must be.

Shape legend: W ranks in the group, n nodes x m ranks per node (W = n * m), X elements per destination block,
L local experts, C capacity, M model dim, R = world size + 1 (one row of the group-membership table).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..options import auto_threshold, check_algorithm
from .topology import GroupLayout, Topology, TopologyError, from_env

Group = Optional[dist.ProcessGroup]

# Up to this many nodes the intra-node hop runs as one collective per source node straight into the output (no
# copies, n - 1 collective launches); beyond it, as one collective on a transposed copy (two copies, one
# launch). Launches are dear and copies cheap on GPUs, the reverse on CPUs (benchmarks/cost_model.py) -- except
# for small messages on gloo, where the copies cost nothing and one collective fewer saves a step (measured:
# docs/ALLTOALL.md).
PER_NODE_INTRA_MAX_NODES = {"gloo": 8, "default": 2}
GLOO_PER_NODE_MIN_BYTES = 128 << 10
INTRA_STRATEGIES = ("per_node", "transposed")


def group_size(group: Group) -> int:
    return dist.get_world_size(group=group) if dist.is_available() and dist.is_initialized() else 1


def group_ranks(group: Group) -> List[int]:
    """Global ranks of the group's members, in group-rank order."""
    if group is None:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))


class _AllToAll(torch.autograd.Function):
    """Exchanges equal blocks along dim 0: block w of the input goes to rank w. Its own inverse."""

    @staticmethod
    def forward(ctx: Any, group: Group, x: torch.Tensor) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[None, torch.Tensor]:
        return None, _AllToAll.apply(ctx.group, grad)


def all_to_all(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Flat all-to-all of x (dim 0 divisible by the group size); identity for a group of one."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(group, x)


def agree_max(value: int, group: Group, device: torch.device) -> int:
    """The largest `value` over the group (every rank must call it)."""
    if group_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


# ----------------------------------------------------------------------------------------------------------------
# Hierarchy: the intra-node and inter-node subgroups of an expert-parallel group

@dataclass(frozen=True)
class Hierarchy:
    """This rank's place in a group of n nodes x m ranks, with the two subgroups the 2DH hops run on."""

    layout: GroupLayout
    node_index: int   # a0: my node among the group's nodes
    local_index: int  # j0: my index among the group's ranks on my node
    intra: dist.ProcessGroup  # the group's m ranks on my node
    inter: dist.ProcessGroup  # the group's n ranks with local index j0, one per node

    @property
    def num_nodes(self) -> int:
        return self.layout.num_nodes

    @property
    def ranks_per_node(self) -> int:
        return self.layout.ranks_per_node


# (group, local size) -> its hierarchy, or None where 2DH does not apply (one node, one rank per node, uneven).
_HIERARCHIES: Dict[Tuple[Any, int], Optional[Hierarchy]] = {}


def clear_hierarchy_cache() -> None:
    """Forgets cached subgroups (after the process groups they belong to were destroyed)."""
    _HIERARCHIES.clear()


def hierarchical_layout(group: Group, topology: Topology) -> Optional[GroupLayout]:
    """The group's nodes x ranks layout when 2DH can use it (n > 1 nodes, m > 1 ranks each); local, no
    collective. Raises TopologyError when the group spreads unevenly over nodes."""
    ranks = group_ranks(group)
    layout = topology.group_layout(ranks)
    if layout is None:
        raise TopologyError(f"the expert-parallel group {ranks} spreads unevenly over nodes of "
                            f"{topology.local_size} ranks (from {topology.source}): 2dh needs the same number of "
                            "its ranks on every node it uses; use a2a_algorithm='flat' or 'auto'")
    if layout.num_nodes == 1 or layout.ranks_per_node == 1:
        return None
    return layout


def _new_group(ranks: Sequence[int]) -> dist.ProcessGroup:
    import deepspeed.comm as ds_comm
    if ds_comm.is_initialized():
        return ds_comm.new_group(list(ranks))
    return dist.new_group(list(ranks))


def hierarchy(group: Group, device: torch.device, topology: Optional[Topology] = None) -> Optional[Hierarchy]:
    """The cached hierarchy of `group`; None where 2DH would be flat anyway (one node, one rank per node).

    The first call for a group is a collective over the whole world: every rank must make it at the same
    point (the first 2dh/auto exchange of a layer does, on every rank). It gathers which expert-parallel
    group each rank is in and creates the intra- and inter-node subgroups of all of them, on every rank in the
    same order (torch.distributed requires every rank to take part in creating every group).
    """
    topo = topology or from_env()
    key = (group, topo.local_size)
    if key in _HIERARCHIES:
        return _HIERARCHIES[key]
    world = dist.get_world_size()
    if topo.world_size != world:
        raise TopologyError(f"topology is for {topo.world_size} ranks, the world has {world}")
    if topo.num_nodes == 1:
        _HIERARCHIES[key] = None
        return None

    mine = group_ranks(group)
    row_R = torch.full((world + 1,), -1, dtype=torch.int64, device=device)
    row_R[0] = topo.local_size
    row_R[1:1 + len(mine)] = torch.tensor(mine, dtype=torch.int64)
    rows = [torch.empty_like(row_R) for _ in range(world)]
    dist.all_gather(rows, row_R)
    table = torch.stack(rows).cpu().tolist()
    local_sizes = sorted({row[0] for row in table})
    if len(local_sizes) != 1:
        raise TopologyError(f"ranks disagree on ranks per node ({local_sizes}): nodes must be even")
    partition = sorted({tuple(r for r in row[1:] if r >= 0) for row in table})
    seen = [r for part in partition for r in part]
    if len(seen) != len(set(seen)):
        raise ValueError(f"ranks called the hierarchical all-to-all with overlapping groups {partition}: every "
                         "rank of the world must pass its own group from one partition (e.g. one ep_size)")

    me = dist.get_rank()
    found: Optional[Hierarchy] = None
    for ranks in partition:
        layout = topo.group_layout(ranks)
        if layout is None or layout.num_nodes == 1 or layout.ranks_per_node == 1:
            continue
        intra = [_new_group(layout.intra_ranks(a)) for a in range(layout.num_nodes)]
        inter = [_new_group(layout.inter_ranks(j)) for j in range(layout.ranks_per_node)]
        if me in ranks:
            w = ranks.index(me)
            a0, j0 = divmod(w, layout.ranks_per_node)
            found = Hierarchy(layout, a0, j0, intra[a0], inter[j0])
    _HIERARCHIES[key] = found
    return found


# ----------------------------------------------------------------------------------------------------------------
# All-to-alls in flight: issue now, wait later (async collectives), without autograd

class Pending:
    """An all-to-all in flight. `output` is allocated at issue time and valid after `wait()`."""

    output: torch.Tensor

    def advance(self) -> None:
        """Issues the next hop if there is one (blocks until the previous hop is done). Idempotent."""

    def wait(self) -> torch.Tensor:
        raise NotImplementedError


class _Done(Pending):
    def __init__(self, x: torch.Tensor) -> None:
        self.output = x

    def wait(self) -> torch.Tensor:
        return self.output


class _FlatPending(Pending):
    def __init__(self, x: torch.Tensor, group: Group) -> None:
        self._input = x
        self.output = torch.empty_like(x)
        self._work = dist.all_to_all_single(self.output, x, group=group, async_op=True)

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = self._input = None
        return self.output


def exchange_rows(out: torch.Tensor, x: torch.Tensor, send_W: Sequence[int], recv_W: Sequence[int],
                  group: Group, me: int, copy_own: bool = True, async_op: bool = True) -> Any:
    """All-to-all along dim 0 by split sizes over `group`, where I am group rank `me`: the send_W[w] rows of x
    after those for ranks before w go to rank w, and the recv_W[w] rows from rank w land in out in rank order.

    The transport's copy of a rank's own block is slow on gloo (measured about as costly as sending it), so
    when my block is first or last it is left out of the collective (zero split sizes on both sides, which
    keeps the parts contiguous) and copied here, or not at all (copy_own=False: the caller does not need it).
    A block in the middle cannot be left out of a contiguous split, so that rank sends everything.
    Returns the collective's work (async_op) or None.
    """
    W = len(send_W)
    if me not in (0, W - 1):
        return dist.all_to_all_single(out, x, output_split_sizes=list(recv_W), input_split_sizes=list(send_W),
                                      group=group, async_op=async_op)
    send_start, recv_start = sum(send_W[:me]), sum(recv_W[:me])
    if copy_own:
        out[recv_start:recv_start + recv_W[me]].copy_(x[send_start:send_start + send_W[me]])
    send_rest, recv_rest = list(send_W), list(recv_W)
    send_rest[me] = recv_rest[me] = 0
    if me == 0:
        x_rest, out_rest = x[send_W[0]:], out[recv_W[0]:]
    else:
        x_rest, out_rest = x[:send_start], out[:recv_start]
    return dist.all_to_all_single(out_rest, x_rest, output_split_sizes=recv_rest, input_split_sizes=send_rest,
                                  group=group, async_op=async_op)


def _exchange_blocks(out_WX: torch.Tensor, in_WX: torch.Tensor, group: dist.ProcessGroup, me: int,
                     copy_own: bool = True) -> Any:
    """Async all-to-all of W equal blocks (dim 0) over `group`, where I am group rank `me` (exchange_rows's rule
    for my own block)."""
    W = in_WX.shape[0]
    if me in (0, W - 1):
        return exchange_rows(out_WX, in_WX, [1] * W, [1] * W, group, me, copy_own)
    return dist.all_to_all_single(out_WX, in_WX, group=group, async_op=True)


def intra_strategy_for(num_nodes: int, backend: str, nbytes: int) -> str:
    """The 2DH intra-node strategy for a message of nbytes per rank over num_nodes nodes on this backend."""
    backend = str(backend)
    limit = PER_NODE_INTRA_MAX_NODES.get(backend, PER_NODE_INTRA_MAX_NODES["default"])
    if num_nodes > limit or (backend == "gloo" and nbytes < GLOO_PER_NODE_MIN_BYTES):
        return "transposed"
    return "per_node"


class _TwoDHPending(Pending):
    """2DH with the intra-node hop run once per source node, straight into the output (no layout copies)."""

    def __init__(self, x: torch.Tensor, h: Hierarchy) -> None:
        n, m = h.num_nodes, h.ranks_per_node
        a0, j0 = h.node_index, h.local_index
        self._h = h
        self._x_nmX = x.view(n, m, -1)
        self.output = torch.empty_like(x)
        self._out_nmX = self.output.view(n, m, -1)
        self._mid_nmX = torch.empty_like(self._x_nmX)  # mid[a, j]: from (node a, my local index) for local j
        # Blocks for my own node need no network hop: their intra-node hop overlaps the inter-node one.
        self._works = [_exchange_blocks(self._out_nmX[a0], self._x_nmX[a0], h.intra, j0)]
        # Inter-node hop: everything for node a in one message to the rank with my local index there.
        self._inter = _exchange_blocks(self._mid_nmX, self._x_nmX, h.inter, a0, copy_own=False)

    def advance(self) -> None:
        if self._inter is None:
            return
        self._inter.wait()
        self._inter = None
        h = self._h
        for a in range(h.num_nodes):  # the same order on every rank of the node
            if a != h.node_index:
                self._works.append(_exchange_blocks(self._out_nmX[a], self._mid_nmX[a], h.intra, h.local_index))

    def wait(self) -> torch.Tensor:
        self.advance()
        for work in self._works:
            work.wait()
        self._works = []
        self._x_nmX = self._mid_nmX = None
        return self.output


class _TwoDHTransposedPending(Pending):
    """2DH for many nodes: one intra-node collective on a transposed copy, then the transpose back."""

    def __init__(self, x: torch.Tensor, h: Hierarchy) -> None:
        n, m = h.num_nodes, h.ranks_per_node
        self._h = h
        self._input = x
        self.output = torch.empty_like(x)
        self._mid_nmX = torch.empty_like(x).view(n, m, -1)
        self._recv_mnX: Optional[torch.Tensor] = None
        self._intra = None
        self._inter = _exchange_blocks(self._mid_nmX, x.view(n, m, -1), h.inter, h.node_index)

    def advance(self) -> None:
        if self._inter is None:
            return
        self._inter.wait()
        self._inter = self._input = None
        self._send_mnX = self._mid_nmX.transpose(0, 1).contiguous()  # [local rank j, source node a, X]
        self._mid_nmX = None
        self._recv_mnX = torch.empty_like(self._send_mnX)
        self._intra = _exchange_blocks(self._recv_mnX, self._send_mnX, self._h.intra, self._h.local_index)

    def wait(self) -> torch.Tensor:
        self.advance()
        if self._intra is not None:
            self._intra.wait()
            self._intra = self._send_mnX = None
            n, m = self._h.num_nodes, self._h.ranks_per_node
            # recv[j, a] came from (node a, local rank j): back to group-rank order [a, j].
            self.output.view(n, m, -1).copy_(self._recv_mnX.transpose(0, 1))
            self._recv_mnX = None
        return self.output


class Exchange:
    """The all-to-all of one expert-parallel group with its algorithm chosen: flat, 2dh or auto per size.

    Build it with `plan_exchange` (which validates and, for 2dh/auto, creates the subgroups).
    `algorithm_for(nbytes)` is a pure function of the message size and the group's layout, so every rank of the
    group makes the same choice for the same buffer shape.
    """

    def __init__(self, group: Group, algorithm: str = "flat", hier: Optional[Hierarchy] = None,
                 threshold_bytes: int = 0, intra_strategy: Optional[str] = None) -> None:
        self.group = group
        self.algorithm = check_algorithm(algorithm)
        self.hierarchy = hier
        self.threshold_bytes = threshold_bytes
        if intra_strategy is not None and intra_strategy not in INTRA_STRATEGIES:
            raise ValueError(f"intra_strategy must be one of {INTRA_STRATEGIES}, got {intra_strategy!r}")
        self.intra_strategy = intra_strategy
        self.size = group_size(group)

    def algorithm_for(self, nbytes: int) -> str:
        """'flat' or '2dh' for a message of nbytes per rank."""
        if self.hierarchy is None or self.algorithm == "flat":
            return "flat"
        if self.algorithm == "2dh":
            return "2dh"
        return "2dh" if nbytes <= self.threshold_bytes else "flat"

    def start(self, x: torch.Tensor) -> Pending:
        """Issues the all-to-all of x (dim 0 divisible by the group size); no autograd."""
        if self.size == 1:
            return _Done(x)
        x = x.contiguous()
        if x.shape[0] % self.size != 0:
            raise ValueError(f"all-to-all input dim 0 ({x.shape[0]}) must be divisible by the group size "
                             f"({self.size})")
        if self.algorithm_for(x.numel() * x.element_size()) == "flat":
            return _FlatPending(x, self.group)
        h = self.hierarchy
        strategy = self.intra_strategy or intra_strategy_for(h.num_nodes, dist.get_backend(h.intra),
                                                             x.numel() * x.element_size())
        return _TwoDHPending(x, h) if strategy == "per_node" else _TwoDHTransposedPending(x, h)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Synchronous all-to-all with autograd (the backward is the same all-to-all of the gradient)."""
        if self.size == 1:
            return x
        return _ExchangeFn.apply(x, self)


def plan_exchange(group: Group, algorithm: str, device: torch.device, *, topology: Optional[Topology] = None,
                  threshold_bytes: Optional[int] = None, intra_strategy: Optional[str] = None) -> Exchange:
    """Validates the arguments (locally, before any collective), then builds the group's Exchange.

    For '2dh' and 'auto' on a multi-node job the first call for a group creates its subgroups (a collective
    over the world, see `hierarchy`). '2dh' on a group that spreads unevenly over nodes raises TopologyError;
    'auto' falls back to flat there.
    """
    check_algorithm(algorithm)
    threshold = auto_threshold(threshold_bytes)
    hier = None
    # auto with a zero threshold is flat: no need for subgroups (the threshold must be equal on every rank).
    if (algorithm == "2dh" or (algorithm == "auto" and threshold > 0)) and group_size(group) > 1:
        topo = topology or from_env()
        if algorithm == "2dh":
            hierarchical_layout(group, topo)  # raises on uneven groups before any collective
        hier = hierarchy(group, device, topo)
    return Exchange(group, algorithm, hier, threshold, intra_strategy)


class _ExchangeFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, exchange: Exchange) -> torch.Tensor:
        ctx.exchange = exchange
        return exchange.start(x).wait()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return ctx.exchange.start(grad).wait(), None


# ----------------------------------------------------------------------------------------------------------------
# Overlap: asynchronous all-to-alls with autograd, issued and waited in an explicit, rank-independent order

class Schedule:
    """All-to-alls in flight in one exchange, in issue order.

    Waiting for one marks the next one issued after it for advancing (its second hop), and the schedule's next
    call (an issue or a wait), which the caller makes after computing on what it waited for, advances it first.
    So the work on chunk i waits for chunk i's exchange alone, not for chunk i + 1's inter-node hop, and that hop
    runs while chunk i computes. Which op is advanced depends only on the order of issue and wait calls, never on
    timing, so every rank issues the same collectives in the same order (a mismatch would deadlock or mix up data).
    """

    def __init__(self) -> None:
        self._inflight: List[Pending] = []
        self._to_advance: Optional[Pending] = None

    def _advance_marked(self) -> None:
        pending, self._to_advance = self._to_advance, None
        if pending is not None and any(p is pending for p in self._inflight):
            pending.advance()

    def issue(self, pending: Pending) -> Pending:
        self._inflight.append(pending)
        self._advance_marked()
        return pending

    def wait(self, pending: Pending) -> torch.Tensor:
        self._advance_marked()
        out = pending.wait()
        i = next(i for i, p in enumerate(self._inflight) if p is pending)
        del self._inflight[i]
        if i < len(self._inflight):
            self._to_advance = self._inflight[i]
        return out


class _Slot:
    """What the start and wait halves of one async all-to-all share (forward op, then gradient op)."""

    def __init__(self, exchange: Exchange, schedule: Schedule) -> None:
        self.exchange = exchange
        self.schedule = schedule
        self.pending: Optional[Pending] = None
        self.grad_pending: Optional[Pending] = None


class _StartFn(torch.autograd.Function):
    """Issues the all-to-all; returns its output buffer, not yet filled. Backward: waits for the gradient's."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, slot: _Slot) -> torch.Tensor:
        ctx.slot = slot
        slot.pending = slot.schedule.issue(slot.exchange.start(x))
        return slot.pending.output

    @staticmethod
    def backward(ctx: Any, grad_unfilled: torch.Tensor) -> Tuple[torch.Tensor, None]:
        slot = ctx.slot
        grad = slot.schedule.wait(slot.grad_pending)
        slot.grad_pending = None
        ctx.slot = None
        return grad, None


class _WaitFn(torch.autograd.Function):
    """Waits for the all-to-all. Backward: issues the gradient's all-to-all and returns its unfilled output."""

    @staticmethod
    def forward(ctx: Any, unfilled: torch.Tensor, slot: _Slot) -> torch.Tensor:
        ctx.slot = slot
        out = slot.schedule.wait(slot.pending)
        slot.pending = None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        slot = ctx.slot
        slot.grad_pending = slot.schedule.issue(slot.exchange.start(grad))
        ctx.slot = None
        return slot.grad_pending.output, None


def all_to_all_start(x: torch.Tensor, exchange: Exchange, schedule: Schedule) -> Tuple[torch.Tensor, _Slot]:
    """Issues an async all-to-all of x; pass both results to all_to_all_wait. Differentiable as a pair."""
    slot = _Slot(exchange, schedule)
    return _StartFn.apply(x, slot), slot


def all_to_all_wait(unfilled: torch.Tensor, slot: _Slot) -> torch.Tensor:
    """Waits for an all_to_all_start; returns the exchanged tensor."""
    return _WaitFn.apply(unfilled, slot)
