"""Triton encode/decode kernels against the torch path, forward and backward, under Triton's CPU interpreter.

Every kernel output is allocated poisoned (NaN / sentinel), so an element a kernel does not write fails the
comparison. Sizes are odd on purpose: S not a multiple of the row block, M not a power of two and, for M = 200,
more than one block of M (the interpreter uses BLOCK_M = 128).

Shape legend: S tokens, M model dim, E experts, K choices per token, C capacity, R output rows, G rows per output.
"""
from __future__ import annotations

import pytest
import torch

from test_triton_interpreter import load_interpreted, poisoned  # noqa: F401  (poisoned is a fixture)

from ds_tutel.dispatch import capacity as torch_dispatch
from ds_tutel.strategies import dispatch_functions
from ds_tutel.routing.types import Routing
from ds_tutel.routing.tutel import route_tutel

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tolerance(dtype: torch.dtype, k: int) -> dict:
    """Sums of k terms rounded to `dtype` at different points (torch path vs fp32 accumulation) differ by a few ulps
    of the terms; a wrong row or gate would be off by O(1)."""
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-6
    return dict(rtol=2 * k * eps, atol=2 * k * eps)


def _routing(S: int, E: int, k: int, seed: int, capacity_factor: float = 1.0, used_fraction: float = 0.85,
             empty_slots: bool = True) -> Routing:
    """A Tutel routing with dropped choices (expert 0 is favoured beyond its capacity), empty slots (the other
    experts get fewer choices than their capacity) and unused tokens (all their choices dropped)."""
    gen = torch.Generator().manual_seed(seed)
    logits_SE = torch.randn(S, E, generator=gen)
    logits_SE[:, 0] += 1.5
    used_S = (torch.rand(S, generator=gen) < used_fraction).long()
    routing = route_tutel(logits_SE, k=k, capacity_factor=capacity_factor, used_token_S=used_S)
    routing.gates_SK = routing.gates_SK.detach()
    assert (routing.locations_SK < 0).any() and (routing.locations_SK >= 0).any()
    assert (routing.kept_per_expert() < routing.capacity).any() == empty_slots
    return routing


def _triton():
    load_interpreted()
    return dispatch_functions("triton")


@pytest.mark.parametrize("M", [37, 200])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_encode_forward_backward_match_torch(poisoned, dtype, k, M):
    encode, _ = _triton()
    seed = 100 * k + M + DTYPES.index(dtype)
    routing = _routing(S=45, E=5, k=k, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x_SM = torch.randn(45, M, generator=gen).to(dtype)
    x_ref = x_SM.clone().requires_grad_()
    x_tri = x_SM.clone().requires_grad_()

    buf_ref = torch_dispatch.encode(x_ref, routing)
    buf_tri = encode(x_tri, routing)
    assert buf_tri.shape == buf_ref.shape and buf_tri.dtype == dtype
    assert torch.equal(buf_tri, buf_ref)  # pure row copies: bit-exact
    filled = torch.zeros(routing.num_experts * routing.capacity, dtype=torch.bool)
    filled[routing.slots_SK()[routing.kept_SK]] = True
    empty_rows = buf_tri.reshape(-1, M)[~filled]
    assert empty_rows.numel() > 0 and torch.equal(empty_rows, torch.zeros_like(empty_rows))

    grad_ECM = torch.randn(buf_ref.shape, generator=gen).to(dtype)
    buf_ref.backward(grad_ECM)
    buf_tri.backward(grad_ECM)
    torch.testing.assert_close(x_tri.grad, x_ref.grad, **_tolerance(dtype, k))
    unused = (routing.locations_SK < 0).all(dim=1)
    assert unused.any() and torch.equal(x_tri.grad[unused], torch.zeros_like(x_tri.grad[unused]))


@pytest.mark.parametrize("M", [37, 200])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_forward_backward_match_torch(poisoned, dtype, k, M):
    _, decode = _triton()
    seed = 1000 + 100 * k + M + DTYPES.index(dtype)
    routing = _routing(S=45, E=5, k=k, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    buf_ECM = torch.randn(routing.num_experts, routing.capacity, M, generator=gen).to(dtype)
    buf_ref = buf_ECM.clone().requires_grad_()
    buf_tri = buf_ECM.clone().requires_grad_()
    gates_ref = routing.gates_SK.clone().requires_grad_()
    gates_tri = routing.gates_SK.clone().requires_grad_()

    routing.gates_SK = gates_ref
    y_ref = torch_dispatch.decode(buf_ref, routing)
    routing.gates_SK = gates_tri
    y_tri = decode(buf_tri, routing)
    assert y_tri.dtype == dtype
    torch.testing.assert_close(y_tri, y_ref, **_tolerance(dtype, k))
    unused = (routing.locations_SK < 0).all(dim=1)
    assert unused.any() and torch.equal(y_tri[unused], torch.zeros_like(y_tri[unused]))

    grad_SM = torch.randn(y_ref.shape, generator=gen).to(dtype)
    y_ref.backward(grad_SM)
    y_tri.backward(grad_SM)
    torch.testing.assert_close(buf_tri.grad, buf_ref.grad, **_tolerance(dtype, 1))
    torch.testing.assert_close(gates_tri.grad, gates_ref.grad, rtol=1e-5, atol=1e-4)
    dropped = routing.locations_SK < 0
    assert torch.equal(gates_tri.grad[dropped], torch.zeros_like(gates_tri.grad[dropped]))
    filled = torch.zeros(routing.num_experts * routing.capacity, dtype=torch.bool)
    filled[routing.slots_SK()[routing.kept_SK]] = True
    empty_grad = buf_tri.grad.reshape(-1, M)[~filled]
    assert torch.equal(empty_grad, torch.zeros_like(empty_grad))


def test_many_experts_and_k_equal_to_experts(poisoned):
    encode, decode = _triton()
    # With k = E every token wants every expert, so all experts fill equally: no empty slots there.
    for S, E, k, cf in ((20, 256, 4, 1.0), (30, 6, 6, 0.5)):
        routing = _routing(S=S, E=E, k=k, seed=E, capacity_factor=cf, empty_slots=k < E)
        x_SM = torch.randn(S, 24, dtype=torch.bfloat16, requires_grad=True)
        buf_tri = encode(x_SM, routing)
        assert torch.equal(buf_tri, torch_dispatch.encode(x_SM, routing))
        out_ECM = torch.randn(buf_tri.shape, dtype=torch.bfloat16)
        torch.testing.assert_close(decode(out_ECM, routing), torch_dispatch.decode(out_ECM, routing),
                                   **_tolerance(torch.bfloat16, k))


def test_zero_capacity_gives_empty_buffer_and_zero_outputs(poisoned):
    encode, decode = _triton()
    logits_SE = torch.randn(9, 4)
    routing = route_tutel(logits_SE, k=2, capacity_factor=0.0, used_token_S=torch.zeros(9))
    assert routing.capacity == 0
    x_SM = torch.randn(9, 33, requires_grad=True)
    buf_ECM = encode(x_SM, routing)
    assert buf_ECM.shape == (4, 0, 33)
    buf_ECM.sum().backward()
    assert torch.equal(x_SM.grad, torch.zeros_like(x_SM))
    y_SM = decode(torch.zeros(4, 0, 33), routing)
    assert torch.equal(y_SM, torch.zeros(9, 33))


def test_gather_rows_weighted_sum_with_missing_sources(poisoned):
    dispatch, _ = load_interpreted()
    gen = torch.Generator().manual_seed(7)
    src_XM = torch.randn(11, 150, generator=gen)
    idx_RG = torch.randint(-1, 11, (35, 3), generator=gen)
    w_RG = torch.rand(35, 3, generator=gen)
    out_RM, dot_R = dispatch.gather_rows(src_XM, idx_RG, w_RG)
    assert dot_R is None
    padded_XM = torch.cat([src_XM, torch.zeros(1, 150)])
    expected_RM = (padded_XM[torch.where(idx_RG >= 0, idx_RG, 11)] * w_RG.unsqueeze(2)).sum(dim=1)
    torch.testing.assert_close(out_RM, expected_RM, rtol=1e-6, atol=1e-6)

    unweighted_RM, _ = dispatch.gather_rows(src_XM, idx_RG)
    torch.testing.assert_close(unweighted_RM, padded_XM[torch.where(idx_RG >= 0, idx_RG, 11)].sum(dim=1))


def test_gather_rows_fused_dot_sums_over_blocks_of_m(poisoned):
    dispatch, _ = load_interpreted()
    gen = torch.Generator().manual_seed(8)
    src_XM = torch.randn(7, 300, generator=gen)  # three blocks of M under the interpreter
    idx_R1 = torch.tensor([[3], [-1], [0], [6], [-1], [5]])
    w_R1 = torch.rand(6, 1, generator=gen)
    other_RM = torch.randn(6, 300, generator=gen)
    out_RM, dot_I = dispatch.gather_rows(src_XM, idx_R1, w_R1, dot_RM=other_RM, num_idx=9)
    live = idx_R1[:, 0] >= 0
    rows_RM = torch.where(live.unsqueeze(1), src_XM[idx_R1[:, 0].clamp(min=0)], torch.zeros(1))
    torch.testing.assert_close(out_RM, rows_RM * w_R1)
    expected_I = torch.zeros(9)
    expected_I[idx_R1[live, 0]] = (rows_RM * other_RM).sum(dim=1)[live]
    torch.testing.assert_close(dot_I, expected_I, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one source row"):
        dispatch.gather_rows(src_XM, idx_R1.repeat(1, 2), dot_RM=other_RM, num_idx=9)


def test_gather_rows_index_divisor_and_weights_by_index(poisoned):
    dispatch, _ = load_interpreted()
    gen = torch.Generator().manual_seed(9)
    src_XM = torch.randn(5, 70, generator=gen)
    idx_R1 = torch.tensor([[9], [-1], [0], [4], [7]])  # index j reads source row j // 2 with weight w[j]
    w_J = torch.rand(10, generator=gen)
    out_RM, _ = dispatch.gather_rows(src_XM, idx_R1, w_J, idx_div=2, w_by_idx=True)
    live = idx_R1[:, 0] >= 0
    j = idx_R1[:, 0].clamp(min=0)
    expected_RM = torch.where(live.unsqueeze(1), src_XM[j // 2] * w_J[j].unsqueeze(1), torch.zeros(1))
    torch.testing.assert_close(out_RM, expected_RM)


def test_slot_maps_are_inverse(poisoned):
    dispatch, _ = load_interpreted()
    routing = _routing(S=40, E=4, k=3, seed=3)
    slots_SK, choice_N = dispatch.slot_maps(routing.indices_SK, routing.locations_SK, routing.capacity, 4)
    kept_SK = routing.kept_SK
    assert torch.equal(slots_SK[kept_SK], routing.slots_SK()[kept_SK])
    assert (slots_SK[~kept_SK] == -1).all()
    filled_N = choice_N >= 0
    assert int(filled_N.sum()) == int(kept_SK.sum())
    assert torch.equal(slots_SK.reshape(-1)[choice_N[filled_N]], torch.nonzero(filled_N).squeeze(1))


def test_slot_maps_drop_choices_outside_the_buffer(poisoned):
    # Experts outside [0, E) or slots outside [0, C) (a routing from elsewhere, or a kernel's sentinel) never reach
    # a buffer: they are dropped, as a location of -1 is.
    dispatch, _ = load_interpreted()
    E, C = 3, 2
    indices_SK = torch.tensor([[0, 2], [E, 1], [-1, 0], [1, 2], [2, 0]])
    locations_SK = torch.tensor([[0, 0], [0, 0], [1, 1], [C, 1], [-1, 0]])
    slots_SK, choice_N = dispatch.slot_maps(indices_SK, locations_SK, C, E)
    assert torch.equal(slots_SK, torch.tensor([[0, 4], [-1, 2], [-1, 1], [-1, 5], [-1, 0]]))
    assert choice_N.shape == (E * C,)
    # Slot 0 is claimed twice here ((0, 0) and (4, 1)): a broken routing; which claim wins is unspecified.
    assert choice_N[0].item() in (0, 9) and torch.equal(choice_N[1:], torch.tensor([5, 3, -1, 1, 7]))
    x_SM = torch.randn(5, 8)
    buf_ECM = dispatch.encode(x_SM, indices_SK, locations_SK, C, E)
    assert buf_ECM.shape == (E, C, 8) and torch.equal(buf_ECM[1, 1], torch.zeros(8))
    y_SM = dispatch.decode(buf_ECM, torch.ones(5, 2), indices_SK, locations_SK)
    assert torch.equal(y_SM[1], buf_ECM[1, 0]) and torch.equal(y_SM[2], buf_ECM[0, 1])


def test_slot_maps_are_built_once_per_forward(poisoned, monkeypatch):
    import ds_tutel
    from helpers import expert_ffn
    dispatch, _ = load_interpreted()
    calls = []
    real_slot_maps = dispatch.slot_maps

    def counting_slot_maps(*args, **kwargs):
        calls.append(args[2:])
        return real_slot_maps(*args, **kwargs)

    monkeypatch.setattr(dispatch, "slot_maps", counting_slot_maps)
    torch.manual_seed(0)
    encode, decode = _triton()
    for k in (1, 2):
        calls.clear()
        # At ep_size 1 the layer runs the grouped strategy on every backend: no capacity buffer, no slot map.
        layer = ds_tutel.MoE(8, expert_ffn(8), num_experts=4, k=k, dispatch_backend="triton")
        x_SM = torch.randn(20, 8, requires_grad=True)
        out_SM, l_aux, _ = layer(x_SM)
        (out_SM.sum() + l_aux).backward()
        assert calls == [] and x_SM.grad is not None and torch.isfinite(x_SM.grad).all()
        # The capacity path: encode builds the maps, decode and both backwards reuse them.
        routing = route_tutel(torch.randn(20, 4), k=k, capacity_factor=1.0)
        x_SM = torch.randn(20, 8, requires_grad=True)
        out_SM = decode(encode(x_SM, routing), routing)
        out_SM.sum().backward()
        assert len(calls) == 1, calls
        # A routing changed in place after encode gets fresh maps.
        buf_ECM = encode(x_SM.detach(), routing)
        routing.locations_SK.fill_(-1)
        assert torch.equal(decode(buf_ECM, routing), torch.zeros(20, 8))
        assert len(calls) == 2
