"""Triton Tutel gate against the torch path (route_tutel), forward and backward, under Triton's CPU interpreter.

The routing must be identical (experts, slots, capacity, counts) and the probabilities, gates and logit gradients
equal up to fp32 rounding. S = 150 spans three blocks of the slot kernels (64 tokens each, the last one partial),
so the queue offsets carried from block to block are exercised; E = 7 is not a power of two. Every kernel output
is allocated poisoned, so unwritten elements fail the comparison.

Shape legend: S tokens, E experts, K choices per token.
"""
from __future__ import annotations

import pytest
import torch

from test_triton_interpreter import load_interpreted, poisoned  # noqa: F401  (poisoned is a fixture)

from ds_tutel.strategies import tutel_router
from ds_tutel.routing.types import Routing
from ds_tutel.routing.tutel import route_tutel


def _assert_same_routing(got: Routing, want: Routing) -> None:
    assert got.capacity == want.capacity
    assert torch.equal(got.indices_SK, want.indices_SK)
    assert torch.equal(got.locations_SK, want.locations_SK)
    assert torch.equal(got.counts_E, want.counts_E)
    assert got.probs_SE.dtype == torch.float32 and got.gates_SK.dtype == torch.float32
    torch.testing.assert_close(got.probs_SE, want.probs_SE, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.gates_SK, want.gates_SK, rtol=1e-6, atol=1e-7)
    dropped = got.locations_SK < 0
    assert torch.equal(got.gates_SK[dropped], torch.zeros(int(dropped.sum())))


def _both(logits_SE: torch.Tensor, **options) -> tuple:
    """(reference routing, triton routing, reference logits leaf, triton logits leaf)."""
    ref_leaf = logits_SE.clone().requires_grad_()
    tri_leaf = logits_SE.clone().requires_grad_()
    return route_tutel(ref_leaf, **options), tutel_router("triton")(tri_leaf, **options), ref_leaf, tri_leaf


@pytest.mark.parametrize("capacity_factor", [1.0, 0.5, 0.0, -0.5])
@pytest.mark.parametrize("normalize_gate", [True, False])
@pytest.mark.parametrize("batch_prioritized_routing", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_gate_matches_torch(poisoned, k, batch_prioritized_routing, normalize_gate, capacity_factor):
    seed = 7 * k + 3 * batch_prioritized_routing + 11 * normalize_gate + int(10 * capacity_factor)
    gen = torch.Generator().manual_seed(seed)
    S, E = 150, 7
    logits_SE = torch.randn(S, E, generator=gen) * 2
    logits_SE[:, 1] += 1.0  # expert 1 is popular: with a capacity it drops choices
    used_S = (torch.rand(S, generator=gen) < 0.8).long() if seed % 2 else None
    ref, tri, ref_leaf, tri_leaf = _both(logits_SE, k=k, capacity_factor=capacity_factor, min_capacity=2,
                                         batch_prioritized_routing=batch_prioritized_routing,
                                         normalize_gate=normalize_gate, used_token_S=used_S)
    _assert_same_routing(tri, ref)
    if capacity_factor > 0:
        assert (ref.locations_SK < 0).any()  # the capacity mask is exercised

    grad_gates_SK = torch.randn(S, k, generator=gen)
    grad_probs_SE = torch.randn(S, E, generator=gen)
    for routing in (ref, tri):
        ((routing.gates_SK * grad_gates_SK).sum() + (routing.probs_SE * grad_probs_SE).sum()).backward()
    torch.testing.assert_close(tri_leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_prioritized_routing", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_gate_with_selection_scores_matches_torch(poisoned, k, batch_prioritized_routing):
    gen = torch.Generator().manual_seed(40 + k + batch_prioritized_routing)
    S, E = 100, 6
    logits_SE = torch.randn(S, E, generator=gen)
    # Noise plus a balancing bias: the chosen experts differ from the top-k of the probabilities.
    selection_SE = logits_SE + torch.randn(S, E, generator=gen) + torch.linspace(-1, 1, E)
    ref, tri, ref_leaf, tri_leaf = _both(logits_SE, k=k, capacity_factor=1.0, selection_scores_SE=selection_SE,
                                         batch_prioritized_routing=batch_prioritized_routing)
    assert not torch.equal(ref.indices_SK, torch.topk(ref.probs_SE, k, dim=1).indices)
    _assert_same_routing(tri, ref)
    grad_gates_SK = torch.randn(S, k, generator=gen)
    for routing in (ref, tri):
        (routing.gates_SK * grad_gates_SK).sum().backward()
    torch.testing.assert_close(tri_leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-6)


def test_gate_backward_through_gates_only_and_probs_only(poisoned):
    gen = torch.Generator().manual_seed(5)
    logits_SE = torch.randn(70, 9, generator=gen)
    for loss in (lambda r: (r.gates_SK ** 2).sum(), lambda r: (r.probs_SE.mean(dim=0) ** 2).sum()):
        ref, tri, ref_leaf, tri_leaf = _both(logits_SE, k=2, capacity_factor=0.5)
        loss(ref).backward()
        loss(tri).backward()
        torch.testing.assert_close(tri_leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-7)
        assert tri_leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("S,E,k", [(40, 256, 4), (33, 5, 5), (65, 64, 1)])
def test_gate_many_experts_and_k_up_to_experts(poisoned, S, E, k):
    gen = torch.Generator().manual_seed(E + k)
    logits_SE = torch.randn(S, E, generator=gen)
    ref, tri, ref_leaf, tri_leaf = _both(logits_SE, k=k, capacity_factor=1.0, batch_prioritized_routing=True)
    _assert_same_routing(tri, ref)
    ref.gates_SK.sum().backward()
    tri.gates_SK.sum().backward()
    torch.testing.assert_close(tri_leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-7)


def test_gate_uses_the_agreed_capacity(poisoned):
    logits_SE = torch.randn(50, 4, generator=torch.Generator().manual_seed(2))
    agreed = []

    def agree(capacity: int) -> int:
        agreed.append(capacity)
        return capacity + 3

    ref = route_tutel(logits_SE, k=2, capacity_factor=-1.0, agree_capacity=agree)
    calls_ref = list(agreed)
    agreed.clear()
    tri = tutel_router("triton")(logits_SE, k=2, capacity_factor=-1.0, agree_capacity=agree)
    assert agreed == calls_ref
    _assert_same_routing(tri, ref)


def test_gate_half_precision_logits_route_as_their_fp32_values(poisoned):
    # Distinct values within each row: bf16 rounding of random logits would create ties, which torch.topk breaks
    # in no specified order.
    gen = torch.Generator().manual_seed(4)
    logits_SE = (torch.stack([torch.randperm(6, generator=gen) for _ in range(40)]) * 0.37).to(torch.bfloat16)
    leaf = logits_SE.clone().requires_grad_()
    tri = tutel_router("triton")(leaf, k=2, capacity_factor=1.0)
    ref_leaf = logits_SE.float().requires_grad_()
    ref = route_tutel(ref_leaf, k=2, capacity_factor=1.0)
    _assert_same_routing(tri, ref)
    tri.gates_SK.sum().backward()
    ref.gates_SK.sum().backward()
    assert leaf.grad.dtype == torch.bfloat16
    torch.testing.assert_close(leaf.grad, ref_leaf.grad.to(torch.bfloat16))


def test_gate_ties_pick_the_lower_expert(poisoned):
    tri = tutel_router("triton")(torch.zeros(10, 6), k=3, capacity_factor=0.0)
    assert torch.equal(tri.indices_SK, torch.arange(3).expand(10, 3))
    assert torch.equal(tri.locations_SK, torch.arange(10).unsqueeze(1).expand(10, 3))


def test_gate_rejects_bad_shapes(poisoned):
    _, gate = load_interpreted()
    with pytest.raises(ValueError, match="k must be"):
        gate.tutel_gate(torch.randn(4, 3), 4, True, False, None, lambda counts_E: 4)
    with pytest.raises(ValueError, match=r"\[S, E\]"):
        gate.tutel_gate(torch.randn(4), 1, True, False, None, lambda counts_E: 4)
    with pytest.raises(ValueError, match="selection scores"):
        gate.tutel_gate(torch.randn(4, 3), 1, True, False, None, lambda counts_E: 4, torch.randn(4, 2))


def _nan_inf_logits(S: int, E: int, seed: int) -> torch.Tensor:
    """Random logits with NaN, +inf and -inf in some rows: a NaN or +inf anywhere in a row, or a row all -inf,
    makes that row's probabilities all NaN (on both paths); some -inf beside finite values do not."""
    logits_SE = torch.randn(S, E, generator=torch.Generator().manual_seed(seed))
    nan, inf = float("nan"), float("inf")
    logits_SE[0, 2] = nan
    logits_SE[1, :] = nan
    logits_SE[2, 0] = inf
    logits_SE[3, 1:3] = inf
    logits_SE[4, :] = -inf
    logits_SE[5, 1] = -inf
    logits_SE[6, 0] = nan
    logits_SE[6, 3] = -inf
    logits_SE[S - 1, E - 1] = nan  # the last block of tokens too
    return logits_SE


def _steered_to(indices_SK: torch.Tensor, E: int) -> torch.Tensor:
    """Selection scores whose top-k are exactly indices_SK, in that order (for the torch path to follow them)."""
    S, K = indices_SK.shape
    return torch.zeros(S, E).scatter_(1, indices_SK, torch.arange(K, 0, -1, dtype=torch.float32).expand(S, K))


def _assert_same_routing_nan(got: Routing, want: Routing) -> None:
    """_assert_same_routing where NaN probabilities and gates must sit at the same places. The kernel's gate of a
    dropped choice is 0 (Routing's contract); the torch path's is gate * 0, which is NaN for a NaN gate, so the
    gates are compared where kept."""
    assert got.capacity == want.capacity
    assert torch.equal(got.indices_SK, want.indices_SK)
    assert torch.equal(got.locations_SK, want.locations_SK)
    assert torch.equal(got.counts_E, want.counts_E)
    torch.testing.assert_close(got.probs_SE, want.probs_SE, rtol=1e-6, atol=1e-7, equal_nan=True)
    kept_SK = got.locations_SK >= 0
    torch.testing.assert_close(got.gates_SK[kept_SK], want.gates_SK[kept_SK], rtol=1e-6, atol=1e-7, equal_nan=True)
    assert torch.equal(got.gates_SK[~kept_SK], torch.zeros(int((~kept_SK).sum())))


# The interpreter computes inf - inf in numpy, which warns; the kernels mean it (a NaN row).
_NAN_ARITHMETIC = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@_NAN_ARITHMETIC
@pytest.mark.parametrize("k,capacity_factor,batch_prioritized_routing", [(1, 1.0, False), (2, 0.0, True),
                                                                         (3, 0.5, False)])
def test_gate_nan_and_inf_logits_route_in_range_as_torch(poisoned, k, capacity_factor, batch_prioritized_routing):
    S, E = 70, 6
    logits_SE = _nan_inf_logits(S, E, seed=k)
    options = dict(k=k, capacity_factor=capacity_factor, batch_prioritized_routing=batch_prioritized_routing)
    ref = route_tutel(logits_SE, **options)
    tri = tutel_router("triton")(logits_SE, **options)

    # Every choice is an expert in [0, E), distinct within its token.
    assert ((tri.indices_SK >= 0) & (tri.indices_SK < E)).all()
    assert all(len(set(row)) == k for row in tri.indices_SK.tolist())
    torch.testing.assert_close(tri.probs_SE, ref.probs_SE, rtol=1e-6, atol=1e-7, equal_nan=True)
    nan_S = ref.probs_SE.isnan().any(dim=1)
    assert nan_S[[0, 1, 2, 3, 4, 6, S - 1]].all() and not nan_S[5] and (~nan_S).sum() > S // 2
    # Rows of numbers choose as torch does. In an all-NaN row every expert ties (torch.topk ranks NaN above every
    # number and leaves the order of equals unspecified): the kernel takes the lowest indices, torch NaN ones too.
    assert torch.equal(tri.indices_SK[~nan_S], ref.indices_SK[~nan_S])
    assert torch.equal(tri.indices_SK[nan_S], torch.arange(k).expand(int(nan_S.sum()), k))
    assert ref.probs_SE.gather(1, ref.indices_SK)[nan_S].isnan().all()
    # Given the same choices, the rest of the routing (queue places, capacity, counts, gates) is the torch path's.
    followed = route_tutel(logits_SE, selection_scores_SE=_steered_to(tri.indices_SK, E), **options)
    _assert_same_routing_nan(tri, followed)


@_NAN_ARITHMETIC
def test_gate_nan_selection_scores_rank_above_every_number(poisoned):
    # At most one NaN per row, so torch.topk's order is fully specified: the NaN first, then the numbers.
    S, E, k = 40, 7, 3
    gen = torch.Generator().manual_seed(12)
    logits_SE = torch.randn(S, E, generator=gen)
    selection_SE = logits_SE + torch.randn(S, E, generator=gen)
    selection_SE[torch.arange(0, S, 3), torch.arange(0, S, 3) % E] = float("nan")
    selection_SE[1, :] = float("-inf")
    selection_SE[2, 4] = float("inf")
    options = dict(k=k, capacity_factor=1.0, selection_scores_SE=selection_SE)
    ref, tri = route_tutel(logits_SE, **options), tutel_router("triton")(logits_SE, **options)
    assert torch.equal(tri.indices_SK[torch.arange(0, S, 3), 0], torch.arange(0, S, 3) % E)
    assert torch.equal(tri.indices_SK[1], torch.arange(k))
    keep_S = torch.ones(S, dtype=torch.bool)
    keep_S[1] = False  # a row of -inf: all tie, torch's order is its own
    assert torch.equal(tri.indices_SK[keep_S], ref.indices_SK[keep_S])
    followed = route_tutel(logits_SE, **{**options, "selection_scores_SE": _steered_to(tri.indices_SK, E)})
    _assert_same_routing_nan(tri, followed)


@_NAN_ARITHMETIC
def test_encode_decode_of_nan_routing_stay_in_bounds(poisoned):
    from ds_tutel.dispatch import capacity as torch_dispatch
    from ds_tutel.strategies import dispatch_functions
    encode, decode = dispatch_functions("triton")
    S, E, M = 70, 6, 20
    routing = tutel_router("triton")(_nan_inf_logits(S, E, seed=4), k=2, capacity_factor=1.0)
    routing.gates_SK = routing.gates_SK.detach()
    gen = torch.Generator().manual_seed(3)
    x_SM = torch.randn(S, M, generator=gen)
    buf_ECM = encode(x_SM, routing)
    assert torch.equal(buf_ECM, torch_dispatch.encode(x_SM, routing))  # every row written, none NaN-poisoned
    out_ECM = torch.randn(buf_ECM.shape, generator=gen)
    y_SM = decode(out_ECM, routing)
    torch.testing.assert_close(y_SM, torch_dispatch.decode(out_ECM, routing), equal_nan=True)
    nan_S = routing.probs_SE.isnan().any(dim=1) & (routing.locations_SK >= 0).any(dim=1)
    assert nan_S.any() and y_SM[nan_S].isnan().all() and not y_SM[~nan_S].isnan().any()


@pytest.mark.parametrize("E", [300, 512])
def test_expert_histogram_is_tiled_over_many_experts(poisoned, E):
    # E beyond one histogram step (gate._HIST_BLOCK_E = 64 experts), and not a multiple of it; S spans 2 blocks.
    _, gate = load_interpreted()
    S, k = 90, 2
    gen = torch.Generator().manual_seed(E)
    indices_SK = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(S)])
    indices_SK[:, 0] = torch.randint(E - 70, E, (S,), generator=gen)  # the last, partial step is busy
    indices_SK[:, 1] = torch.where(indices_SK[:, 1] == indices_SK[:, 0], (indices_SK[:, 0] + 1) % E,
                                   indices_SK[:, 1])
    offsets_KBE, counts_E = gate.queue_offsets(indices_SK, None, None, E)
    assert torch.equal(counts_E, torch.bincount(indices_SK.reshape(-1), minlength=E))
    # Queue order is k-major, then token order: block b of choice k starts after all earlier (k, b) blocks.
    blocks_KB = indices_SK.t().reshape(k, -1)
    expected_KBE = torch.zeros_like(offsets_KBE)
    running_E = torch.zeros(E, dtype=torch.int64)
    for kk in range(k):
        for b in range(offsets_KBE.shape[1]):
            expected_KBE[kk, b] = running_E
            block = slice(gate._SLOT_BLOCK * b, gate._SLOT_BLOCK * (b + 1))
            running_E = running_E + torch.bincount(blocks_KB[kk, block], minlength=E)
    assert torch.equal(offsets_KBE, expected_KBE)


def test_gate_matches_torch_at_512_experts(poisoned):
    gen = torch.Generator().manual_seed(512)
    logits_SE = torch.randn(24, 512, generator=gen)
    ref, tri, ref_leaf, tri_leaf = _both(logits_SE, k=2, capacity_factor=0.0)
    _assert_same_routing(tri, ref)
    tri.gates_SK.sum().backward()
    ref.gates_SK.sum().backward()
    torch.testing.assert_close(tri_leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-7)
