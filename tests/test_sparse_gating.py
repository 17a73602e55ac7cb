"""The sparse router equals DeepSpeed's dense gating functions, and its slot arithmetic equals a one-hot cumsum."""
import pytest
import torch
import torch.nn.functional as F
from deepspeed.moe import sharded_moe
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_tutel.routing.deepspeed import route_deepspeed
from ds_tutel.routing.slots import rank_by_score_within_groups, rank_within_groups
from ds_tutel.routing.softmax import router_softmax


def _dense_combine(routing, S, E):
    """[S, E, C] combine weights from a sparse routing (what DeepSpeed's gates return)."""
    combine_SEC = torch.zeros(S, E, routing.capacity)
    s_J, k_J = torch.nonzero(routing.kept_SK, as_tuple=True)
    combine_SEC[s_J, routing.indices_SK[s_J, k_J], routing.locations_SK[s_J, k_J]] += routing.gates_SK[s_J, k_J]
    return combine_SEC


def _deepspeed_gate(logits_SE, k, cf, drop, used_S):
    if k == 1:
        return sharded_moe.top1gating(logits_SE, cf, 4, used_S, None, drop, False)[:4]
    if k == 2:
        return sharded_moe.top2gating(logits_SE, cf, 4, drop, None, False)[:4]
    return sharded_moe.topkgating(logits_SE, k, cf, 4, drop)[:4]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("E", [4, 8, 16, 64])
@pytest.mark.parametrize("drop", [True, False])
def test_route_deepspeed_equals_deepspeeds_gating(k, E, drop):
    for seed, S, cf, scale in [(0, 64, 1.0, 0.3), (1, 200, 0.5, 3.0), (2, 97, 1.25, 1.0)]:
        gen = torch.Generator().manual_seed(seed)
        logits_SE = torch.randn(S, E, generator=gen) * scale
        used_S = (torch.rand(S, generator=gen) > 0.2).long() if k == 1 and seed == 1 else None
        l_aux_ref, combine_ref, _, counts_ref = _deepspeed_gate(logits_SE, k, cf, drop, used_S)
        routing, l_aux = route_deepspeed(logits_SE, k=k, capacity_factor=cf, min_capacity=4, drop_tokens=drop,
                                         used_token_S=used_S)
        assert routing.capacity == combine_ref.shape[2]
        assert torch.equal(routing.counts_E, counts_ref.long())
        torch.testing.assert_close(_dense_combine(routing, S, E), combine_ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(l_aux, l_aux_ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("S,E,cf,with_used", [(4096, 8, 0.5, False), (2048, 64, 1.0, True), (3000, 16, 1.25, False)])
def test_top1_keeps_deepspeeds_tokens_at_training_sizes(S, E, cf, with_used):
    """Which of an overflowing expert's tokens stay is torch.topk's pick down the [S, E] table; ours runs it on a
    uint8 table, DeepSpeed on an int64 one-hot. At these sizes topk takes its selection path, not a full sort."""
    gen = torch.Generator().manual_seed(S + E)
    logits_SE = torch.randn(S, E, generator=gen)
    used_S = (torch.rand(S, generator=gen) > 0.3).long() if with_used else None
    _, combine_ref, _, counts_ref = _deepspeed_gate(logits_SE, 1, cf, True, used_S)
    routing, _ = route_deepspeed(logits_SE, k=1, capacity_factor=cf, min_capacity=4, used_token_S=used_S)
    assert torch.equal(routing.counts_E, counts_ref.long())
    s_J, e_J, c_J = torch.nonzero(combine_ref, as_tuple=True)
    assert torch.equal(torch.nonzero(routing.kept_SK[:, 0]).squeeze(1), s_J)  # the same tokens stay
    assert torch.equal(routing.indices_SK[s_J, 0], e_J) and torch.equal(routing.locations_SK[s_J, 0], c_J)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 70), st.integers(0, 2 ** 16))
def test_rank_within_groups_is_the_one_hot_cumsum(J, G, seed):
    gen = torch.Generator().manual_seed(seed)
    group_J = torch.randint(0, G + 1, (J,), generator=gen)  # group G = excluded
    rank_J, counts_G = rank_within_groups(group_J, G)
    one_hot_JG = F.one_hot(group_J, G + 1)[:, :G]
    included_J = group_J < G
    expected_J = (torch.cumsum(one_hot_JG, dim=0) - 1)[included_J, group_J[included_J]]
    assert torch.equal(rank_J[included_J], expected_J)
    assert torch.equal(counts_G, one_hot_JG.sum(dim=0))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 20), st.integers(0, 2 ** 16))
def test_rank_by_score_orders_each_group_by_descending_score(J, G, seed):
    gen = torch.Generator().manual_seed(seed)
    group_J = torch.randint(0, G + 1, (J,), generator=gen)
    score_J = torch.randint(0, 5, (J,), generator=gen).float()  # many ties: they must go to the earlier element
    rank_J = rank_by_score_within_groups(group_J, score_J, G)
    for g in range(G):
        members = (group_J == g).nonzero().squeeze(1).tolist()
        expected = sorted(members, key=lambda j: (-score_J[j].item(), j))
        assert [rank_J[j].item() for j in expected] == list(range(len(members)))


@pytest.mark.parametrize("capability,lanes", [("AVX512", 16), ("AVX2", 8), ("DEFAULT", 16)])
def test_router_softmax_takes_the_column_layout_below_one_vector_of_experts(monkeypatch, capability, lanes):
    from ds_tutel.kernels.cpu import routing as softmax
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    softmax.row_kernel_min_experts.cache_clear()
    try:
        assert softmax.row_kernel_min_experts() == lanes
        for E in (4, 8, 12, 16):
            logits_SE = torch.randn(257, E, generator=torch.Generator().manual_seed(E)) * 4
            columns_SE = F.softmax(logits_SE.t().contiguous(), dim=0).t()
            rows_SE = F.softmax(logits_SE, dim=1)
            assert not torch.equal(columns_SE, rows_SE), "the layouts must round differently somewhere to be told apart"
            want_SE = columns_SE if E < lanes else rows_SE
            assert torch.equal(router_softmax(logits_SE), want_SE), E
    finally:
        softmax.row_kernel_min_experts.cache_clear()


@pytest.mark.parametrize("E", [2, 8, 15, 16, 64])
def test_router_softmax_matches_softmax_forward_and_backward(E):
    gen = torch.Generator().manual_seed(E)
    logits_SE = (torch.randn(333, E, generator=gen) * 4).requires_grad_(True)
    grad_SE = torch.randn(333, E, generator=gen)
    ours_SE = router_softmax(logits_SE)
    assert ours_SE.is_contiguous()
    (ours_grad_SE,) = torch.autograd.grad(ours_SE, logits_SE, grad_SE)
    ref_SE = F.softmax(logits_SE, dim=1)
    (ref_grad_SE,) = torch.autograd.grad(ref_SE, logits_SE, grad_SE)
    # The row and the column kernels round differently: 1 ulp apart with AVX-512, up to 5.3e-7 relative with AVX2
    # (both within 1.3e-6 of the float64 softmax there). Ours must be as accurate as torch's own kernel.
    torch.testing.assert_close(ours_SE, ref_SE, atol=0, rtol=1e-6)
    exact_SE = F.softmax(logits_SE.detach().double(), dim=1)
    worst = lambda p_SE: ((p_SE.detach().double() - exact_SE).abs() / exact_SE).max().item()
    assert worst(ours_SE) <= 1.5 * worst(ref_SE)
    torch.testing.assert_close(ours_grad_SE, ref_grad_SE, atol=1e-6, rtol=1e-5)  # cancellation: ulps of |grad|
