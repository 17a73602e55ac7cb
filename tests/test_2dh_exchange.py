"""The hierarchical all-to-all and the overlapped exchange on spawned gloo ranks emulating 2 nodes.

Every check runs inside one spawned job per world size (process start-up dominates): exact results against an
analytic expectation and against flat, for several groups, local-expert counts, capacities, overlap degrees and
both intra-node strategies; which collectives 2dh issues; the subgroup cache; errors before any collective.

Shape legend: W group ranks, L local experts (E = W * L), C capacity, M model dim.
"""
import pytest
import torch

from ds_tutel.ranks import run_ranks

pytestmark = pytest.mark.multirank

M = 3


def _buf(rank: int, E: int, C: int) -> torch.Tensor:
    return torch.randn(E, C, M, dtype=torch.float64, generator=torch.Generator().manual_seed(1000 + rank))


def _weight(rank: int, E: int, C: int) -> torch.Tensor:
    return torch.randn(E, C, M, dtype=torch.float64, generator=torch.Generator().manual_seed(2000 + rank))


def _scale(global_rank: int, L: int) -> torch.Tensor:
    return torch.arange(L, dtype=torch.float64) + 1 + 10 * global_rank


def _expected(group_ranks, my_index: int, L: int, C: int):
    """Output, input grad and scale grad of exchange_and_compute with experts x -> s_l x + x^2 / 2 and loss
    sum(out * weight), computed locally from every rank's (regenerated) inputs."""
    W = len(group_ranks)
    E = W * L
    me = group_ranks[my_index]
    buf_ECM, w_ECM = _buf(me, E, C), _weight(me, E, C)
    s_E = torch.cat([_scale(g, L) for g in group_ranks]).view(E, 1, 1)
    out_ECM = buf_ECM * s_E + 0.5 * buf_ECM ** 2
    grad_buf_ECM = w_ECM * (s_E + buf_ECM)
    grad_s_L = torch.zeros(L, dtype=torch.float64)
    for src in group_ranks:
        b, w = _buf(src, E, C), _weight(src, E, C)
        grad_s_L += (b * w)[my_index * L:(my_index + 1) * L].sum(dim=(1, 2))
    return out_ECM, grad_buf_ECM, grad_s_L


def _run_exchange(group, group_ranks, L, C, algorithm, degree, **kwargs):
    import torch.distributed as dist
    from ds_tutel.parallel.exchange import exchange_and_compute

    me = dist.get_rank()
    W = len(group_ranks)
    s_L = torch.nn.Parameter(_scale(me, L))
    buf_ECM = _buf(me, W * L, C).requires_grad_()
    out_ECM = exchange_and_compute(buf_ECM, lambda x_WLCM: x_WLCM * s_L.view(1, L, 1, 1) + 0.5 * x_WLCM ** 2,
                                   group, L, algorithm, degree, **kwargs)
    (out_ECM * _weight(me, W * L, C)).sum().backward()
    return out_ECM.detach(), buf_ECM.grad, s_L.grad


class _Recorder:
    """Records every all_to_all_single: (global ranks of its group, elements sent, async)."""

    def __init__(self):
        import torch.distributed as dist
        self.calls = []
        self._dist = dist
        self._original = dist.all_to_all_single

    def __enter__(self):
        def recording(output, input, *args, group=None, async_op=False, **kw):
            ranks = tuple(self._dist.get_process_group_ranks(group)) if group is not None else None
            self.calls.append((ranks, input.numel(), async_op))
            return self._original(output, input, *args, group=group, async_op=async_op, **kw)
        self._dist.all_to_all_single = recording
        return self

    def __exit__(self, *exc):
        self._dist.all_to_all_single = self._original


def _check_2x2(rank, world_size):
    import torch.distributed as dist
    from ds_tutel.parallel import alltoall as comm
    from ds_tutel.parallel import topology
    from ds_tutel.parallel.exchange import exchange_and_compute

    assert topology.from_env().num_nodes == 2
    # Every rank creates every group, in the same order (torch.distributed requires it).
    world = dist.new_group([0, 1, 2, 3])
    strided = [dist.new_group([0, 2]), dist.new_group([1, 3])]   # one rank per node: 2dh is flat
    within = [dist.new_group([0, 1]), dist.new_group([2, 3])]    # one node: 2dh is flat
    uneven = dist.new_group([0, 1, 2])
    groups = [(world, [0, 1, 2, 3]), (strided[rank % 2], [rank % 2, rank % 2 + 2]),
              (within[rank // 2], [rank // 2 * 2, rank // 2 * 2 + 1])]

    # Bad input fails before any collective, so a rank that raises leaves nobody waiting.
    dummy = torch.zeros(4, 2, M)
    for bad in [dict(algorithm="ring"), dict(overlap_degree=0), dict(overlap_degree=1.5), dict(algorithm=None)]:
        args = {"algorithm": "flat", "overlap_degree": 1, **bad}
        with pytest.raises(ValueError):
            exchange_and_compute(dummy, lambda x: x, world, 1, args["algorithm"], args["overlap_degree"])
    with pytest.raises(ValueError, match="experts"):
        exchange_and_compute(torch.zeros(6, 2, M), lambda x: x, world, 1, "2dh")
    if rank < 3:
        with pytest.raises(topology.TopologyError, match="unevenly"):
            exchange_and_compute(torch.zeros(3, 2, M), lambda x: x, uneven, 1, "2dh")

    # The exchange is exact: analytic expectation, every algorithm, degree, layout; 2dh == flat bit for bit.
    # On the group that spans both nodes, with each intra-node strategy (these small messages would get the
    # transposed one; a zero size limit gives them the per-node one).
    checked = 0
    default_min_bytes = comm.GLOO_PER_NODE_MIN_BYTES
    cases = [(world, [0, 1, 2, 3], 0), (world, [0, 1, 2, 3], default_min_bytes)] + [(g, r, default_min_bytes)
                                                                                     for g, r in groups[1:]]
    for group, ranks, min_bytes in cases:
        comm.GLOO_PER_NODE_MIN_BYTES = min_bytes
        me = ranks.index(rank)
        for L, C in [(1, 1), (1, 5), (2, 4), (3, 2)]:
            expected = _expected(ranks, me, L, C)
            for degree in (1, 2, 4):
                results = {alg: _run_exchange(group, ranks, L, C, alg, degree) for alg in ("flat", "2dh", "auto")}
                for alg, got in results.items():
                    for g, e, what in zip(got, expected, ("output", "input grad", "expert grad")):
                        torch.testing.assert_close(g, e, msg=lambda m: f"{what} {alg} {ranks} L={L} C={C} "
                                                                       f"d={degree}: {m}")
                    for g, f in zip(got, results["flat"]):
                        assert torch.equal(g, f), (alg, ranks, L, C, degree)
                checked += 1
    comm.GLOO_PER_NODE_MIN_BYTES = default_min_bytes
    for strategy in comm.INTRA_STRATEGIES:
        ex = comm.plan_exchange(world, "2dh", torch.device("cpu"), intra_strategy=strategy)
        for L, C in [(1, 3), (2, 2)]:
            x = _buf(rank, 4 * L, C)
            ref = torch.empty_like(x)
            dist.all_to_all_single(ref, x, group=world)
            assert torch.equal(ex.start(x).wait(), ref), strategy
            x.requires_grad_()
            ex_out = ex(x)
            ex_out.backward(_weight(rank, 4 * L, C))
            ref_grad = torch.empty_like(x)
            dist.all_to_all_single(ref_grad, _weight(rank, 4 * L, C), group=world)
            assert torch.equal(x.grad, ref_grad), strategy

    # 2dh really is hierarchical: intra-node hops on the node's ranks, one inter-node message to the rank with
    # the same local index on the other node carrying everything for that node; nothing else crosses nodes, and
    # no rank sends its own block through the transport (with 2 per node, every rank's is first or last).
    node, local = divmod(rank, 2)
    L, C = 2, 3
    block = L * C * M
    intra_ranks, inter_ranks = (node * 2, node * 2 + 1), (local, local + 2)
    x = _buf(rank, 4 * L, C)
    with _Recorder() as rec:  # per node: my node's other block, the other node's 2 blocks, then the one for my peer
        comm.plan_exchange(world, "2dh", x.device, intra_strategy="per_node").start(x).wait()
    assert rec.calls == [(intra_ranks, block, True), (inter_ranks, 2 * block, True), (intra_ranks, block, True)]
    with _Recorder() as rec:  # transposed: the other node's 2 blocks, then both source nodes' blocks for my peer
        comm.plan_exchange(world, "2dh", x.device, intra_strategy="transposed").start(x).wait()
    assert rec.calls == [(inter_ranks, 2 * block, True), (intra_ranks, 2 * block, True)]
    with _Recorder() as rec:  # the layer's exchange: small messages on gloo take the transposed strategy
        _run_exchange(world, [0, 1, 2, 3], L, C, "2dh", 1)
    assert rec.calls == [(inter_ranks, 2 * block, True), (intra_ranks, 2 * block, True)] * 4  # (fwd+bwd) x 2
    with _Recorder() as rec:
        _run_exchange(world, [0, 1, 2, 3], L, C, "flat", 1)
    assert rec.calls == [((0, 1, 2, 3), 4 * block, True)] * 4
    # ... and the overlapped exchange issues all its communication asynchronously.
    with _Recorder() as rec:
        _run_exchange(world, [0, 1, 2, 3], L, C, "2dh", 3)
    assert len(rec.calls) == 3 * 4 * 2 and all(is_async for _, _, is_async in rec.calls)

    # auto: 2dh up to the threshold (bytes per rank), flat above, the same choice on every rank.
    x = torch.zeros(4, 2, M, dtype=torch.float64)  # 192 bytes
    assert comm.plan_exchange(world, "auto", x.device, threshold_bytes=192).algorithm_for(192) == "2dh"
    assert comm.plan_exchange(world, "auto", x.device, threshold_bytes=191).algorithm_for(192) == "flat"
    assert comm.plan_exchange(within[rank // 2], "auto", x.device, threshold_bytes=1 << 30).algorithm_for(8) == "flat"
    for threshold in (0, 1 << 20):
        with _Recorder() as rec:
            _run_exchange(world, [0, 1, 2, 3], 1, 2, "auto", 1, auto_threshold=threshold)
        used = {c[0] for c in rec.calls}
        assert used == ({(0, 1, 2, 3)} if threshold == 0 else {intra_ranks, inter_ranks}), used

    # The subgroups are created once per group and reused.
    h1 = comm.hierarchy(world, torch.device("cpu"))
    h2 = comm.plan_exchange(world, "2dh", torch.device("cpu")).hierarchy
    assert h1 is h2 and h1.num_nodes == 2 and h1.ranks_per_node == 2
    assert (h1.node_index, h1.local_index) == (node, local)
    assert tuple(dist.get_process_group_ranks(h1.intra)) == intra_ranks
    assert tuple(dist.get_process_group_ranks(h1.inter)) == inter_ranks
    assert comm.hierarchy(strided[rank % 2], torch.device("cpu")) is None
    return checked


def test_2dh_equals_flat_and_analytic_on_2_nodes_x_2():
    results = run_ranks(_check_2x2, 4, local_size=2, timeout=240)
    assert results == [results[0]] * 4 and results[0] == 4 * 4 * 3


def _check_2x4(rank, world_size):
    import torch.distributed as dist
    from ds_tutel.parallel import alltoall as comm

    world = dist.new_group(list(range(8)))
    halves = [dist.new_group([0, 2, 4, 6]), dist.new_group([1, 3, 5, 7])]  # 2 nodes x 2 of each group
    groups = [(world, list(range(8))), (halves[rank % 2], list(range(rank % 2, 8, 2)))]
    default_min_bytes = comm.GLOO_PER_NODE_MIN_BYTES
    for group, ranks in groups:
        me = ranks.index(rank)
        # A zero size limit gives these small messages the per-node strategy (middle ranks of 4 per node send
        # their own block through the transport), the default the transposed one.
        for L, C, degree, min_bytes in [(1, 3, 1, 0), (2, 4, 2, default_min_bytes), (1, 5, 4, 0)]:
            comm.GLOO_PER_NODE_MIN_BYTES = min_bytes
            expected = _expected(ranks, me, L, C)
            flat = _run_exchange(group, ranks, L, C, "flat", degree)
            two = _run_exchange(group, ranks, L, C, "2dh", degree)
            for g, f, e in zip(two, flat, expected):
                torch.testing.assert_close(g, e)
                assert torch.equal(g, f)
    return True


def test_2dh_equals_flat_on_2_nodes_x_4():
    assert run_ranks(_check_2x4, 8, local_size=4, timeout=240) == [True] * 8
