"""What the layer keeps from one step to the next: DeepSpeed's l_aux (with its graph, as DeepSpeed keeps it) and
the routing for statistics (without one), and neither past the start of the next forward.

Why it matters: a kept graph keeps the step's leaf inputs and their gradients alive until the next step has
routed. Those are among the last tensors a backward allocates, so they can sit at the top of the heap, where
glibc then cannot give back the memory that zero_grad frees below them (benchmarks/RESULTS.md, "The previous
step's graph is released when a forward starts").
"""
import weakref

import pytest
import torch

import ds_tutel
from helpers import expert_ffn

M = 16


def layer(k: int = 2) -> ds_tutel.MoE:
    torch.manual_seed(0)
    return ds_tutel.MoE(M, expert_ffn(M), num_experts=4, k=k, min_capacity=2)


def step(moe: ds_tutel.MoE, x_SM: torch.Tensor) -> None:
    out, l_aux, _ = moe(x_SM)
    (out.square().sum() + l_aux).backward()


@pytest.mark.parametrize("k", [1, 2])
def test_l_aux_is_deepspeeds_and_routing_has_no_graph(k):
    moe = layer(k)
    _, l_aux, _ = moe(torch.randn(10, M, requires_grad=True))
    assert moe.deepspeed_moe.l_aux is l_aux and l_aux.grad_fn is not None  # DeepSpeed's contract
    routing = moe.deepspeed_moe.last_routing
    for tensor in (routing.gates_SK, routing.probs_SE):
        assert tensor.grad_fn is None and not tensor.requires_grad
    assert moe.routing_stats() is not None


def test_previous_step_released_before_the_next_routes():
    moe = layer()
    x1 = torch.randn(10, M, requires_grad=True)
    step(moe, x1)
    assert x1.grad is not None
    first_input = weakref.ref(x1)
    del x1
    alive_when_routing = []
    gate = moe.deepspeed_moe.gate
    route_tokens = gate.route_tokens

    def watched(*args, **kwargs):
        alive_when_routing.append(first_input() is not None)
        return route_tokens(*args, **kwargs)

    gate.route_tokens = watched
    step(moe, torch.randn(10, M, requires_grad=True))
    assert alive_when_routing == [False]


def test_gradients_unchanged_by_release():
    """Two steps on one layer give the same gradients as each step on a fresh copy (nothing carried over)."""
    x1, x2 = torch.randn(10, M), torch.randn(10, M)
    moe = layer()
    step(moe, x1.clone().requires_grad_(True))
    moe.zero_grad(set_to_none=True)
    x = x2.clone().requires_grad_(True)
    torch.manual_seed(5)  # the same random token selection in both
    step(moe, x)
    fresh = layer()
    y = x2.clone().requires_grad_(True)
    torch.manual_seed(5)
    step(fresh, y)
    torch.testing.assert_close(x.grad, y.grad, atol=0, rtol=0)
    for (name, p), (_, q) in zip(moe.named_parameters(), fresh.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=0, rtol=0, msg=name)
