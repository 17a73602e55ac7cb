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
