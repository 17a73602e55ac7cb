"""Row buckets: the sizes themselves, and that padded experts give the same outputs and gradients as exact ones.

Shape legend: S tokens, M model dim, E experts, K choices per token, W ranks, L local experts, C capacity.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ds_tutel.dispatch.grouped import grouped_decode, grouped_encode, grouped_plan
from ds_tutel.experts import Experts
from ds_tutel.kernels.cpu import row_buckets
from ds_tutel.kernels.cpu.row_buckets import (BUCKETS_PER_OCTAVE, bucket, buckets_needed, onednn_half_matmuls,
                                              round_rows)
from ds_tutel.routing.deepspeed import route_deepspeed


@pytest.fixture
def onednn(monkeypatch):
    """Sets whether half-type CPU matmuls go through oneDNN, as on CPUs with or without AVX-512/AMX."""
    def set_present(present: bool) -> None:
        monkeypatch.setattr(row_buckets, "onednn_half_matmuls", lambda dtype: present)
    set_present(True)
    return set_present


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=1 << 20))
def test_bucket_rounds_up_by_under_a_sixteenth_and_is_its_own_bucket(n):
    b = bucket(n)
    assert b >= n and bucket(b) == b
    if n <= BUCKETS_PER_OCTAVE:
        assert b == n
    else:
        assert (b - n) * BUCKETS_PER_OCTAVE < n


@pytest.mark.parametrize("low", [17, 100, 1000, 4096])
def test_at_most_sixteen_sizes_between_n_and_2n(low):
    assert len({bucket(n) for n in range(low, 2 * low)}) <= BUCKETS_PER_OCTAVE + 1


def test_round_rows_rounds_each_count_to_its_bucket():
    assert round_rows([]) == []
    assert round_rows([0, 1, 16, 31, 33, 37, 130]) == [0, 1, 16, 31, 34, 38, 136]


def test_buckets_only_where_a_new_shape_costs(onednn):
    """The experts' rounding (through the registry's "expert_row_rounding") is row_buckets.round_rows exactly
    where buckets_needed: CPU half types whose matmuls go through oneDNN."""
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert buckets_needed(cpu, torch.bfloat16) and buckets_needed(cpu, torch.float16)
    assert not buckets_needed(cpu, torch.float32) and not buckets_needed(meta, torch.bfloat16)
    assert Experts.row_rounding(cpu, torch.float32) is None
    assert Experts.row_rounding(meta, torch.bfloat16) is None
    for dtype in (torch.bfloat16, torch.float16):
        assert Experts.row_rounding(cpu, dtype)([37, 130]) == [38, 136]
    onednn(False)  # half-type matmuls in ATen's own loops keep nothing per shape: padding would only add work
    assert not buckets_needed(cpu, torch.bfloat16) and not buckets_needed(cpu, torch.float16)
    assert Experts.row_rounding(cpu, torch.bfloat16) is None and Experts.row_rounding(cpu, torch.float16) is None


def test_the_onednn_check_is_torchs_own():
    assert onednn_half_matmuls(torch.bfloat16) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert onednn_half_matmuls(torch.float16) == torch.ops.mkldnn._is_mkldnn_fp16_supported()


def _experts(E, M, dtype, seed=0):
    torch.manual_seed(seed)
    experts = Experts(nn.Sequential(nn.Linear(M, 2 * M), nn.GELU(), nn.Linear(2 * M, M)), E, "ep_size_1")
    for module in experts.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    return experts.to(dtype)


def _row_counts(experts):
    seen = []
    for expert in experts.deepspeed_experts:
        expert.register_forward_pre_hook(lambda m, args: seen.append((args[0].shape[0], args[0].detach().clone())))
    return seen


def _grouped_step(experts, x_SM, gates_SK, routing, dy_SM, bucket_rows):
    routing.gates_SK = gates_SK
    plan = grouped_plan(routing, round_rows=round_rows if bucket_rows else None)
    y_SM = grouped_decode(experts.forward_grouped(grouped_encode(x_SM, plan)), plan)
    y_SM.backward(dy_SM)
    return plan, y_SM


@pytest.mark.parametrize("k", [1, 2])
def test_bucketed_grouped_path_gives_the_exact_paths_outputs_and_gradients(k):
    S, E, M = 300, 4, 8
    gen = torch.Generator().manual_seed(k)
    logits = torch.randn(S, E, generator=gen)
    routing = route_deepspeed(logits, k=k, capacity_factor=1.0, min_capacity=0)[0]
    x_SM = torch.randn(S, M, generator=gen)
    dy_SM = torch.randn(S, M, generator=gen)
    results = {}
    for bucket_rows in (False, True):
        experts = _experts(E, M, torch.float64)
        seen = _row_counts(experts)
        x = x_SM.double().requires_grad_(True)
        gates = routing.gates_SK.detach().double().requires_grad_(True)
        plan, y = _grouped_step(experts, x, gates, routing, dy_SM.double(), bucket_rows)
        results[bucket_rows] = (plan, seen, y, x.grad, gates.grad,
                                [p.grad for p in experts.parameters()])
    exact, padded = results[False], results[True]
    assert [n for n, _ in exact[1]] == exact[0].rows_per_expert
    assert [n for n, _ in padded[1]] == [bucket(n) for n in exact[0].rows_per_expert]
    assert padded[0].expert_rows != padded[0].rows_per_expert, "the test needs at least one padded expert"
    for (n_pad, x_pad), n in zip(padded[1], exact[0].rows_per_expert):
        assert torch.count_nonzero(x_pad[n:]) == 0  # pad rows are zeros
    for got, want in zip(padded[2:5], exact[2:5]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for got, want in zip(padded[5], exact[5]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_bucketed_filled_path_gives_the_exact_paths_outputs_and_gradients(onednn):
    W, L, C, M = 2, 3, 40, 8
    filled_WL = [[37, 0, 19], [5, 33, 40]]  # rows per local expert: 42, 33, 59 -> buckets 42, 34, 60
    gen = torch.Generator().manual_seed(0)
    buf = torch.randn(W, L, C, M, generator=gen, dtype=torch.float64)
    dy = torch.randn(W, L, C, M, generator=gen, dtype=torch.float64)
    results = []
    for dtype in (torch.float64, torch.bfloat16):  # bf16 on the CPU buckets, float64 does not
        experts = _experts(L, M, dtype)
        seen = _row_counts(experts)
        b = buf.detach().to(dtype).requires_grad_(True)
        out = experts.forward_filled(b, filled_WL)
        out.backward(dy.to(dtype))
        results.append(([n for n, _ in seen], out.double(), b.grad.double()))
    assert results[0][0] == [42, 33, 59] and results[1][0] == [42, 34, 60]
    for w in range(W):
        for l in range(L):
            n = filled_WL[w][l]
            for exact, padded in ((results[0][1], results[1][1]), (results[0][2], results[1][2])):
                assert torch.count_nonzero(padded[w, l, n:]) == 0
                torch.testing.assert_close(padded[w, l, :n], exact[w, l, :n], atol=0.1, rtol=0.05)


@pytest.mark.parametrize("onednn_present", [True, False])
def test_bf16_layer_on_the_cpu_buckets_rows_where_onednn_runs_and_still_matches_deepspeed(onednn, onednn_present):
    from helpers import paired_layers, run_step
    onednn(onednn_present)
    reference, ours = paired_layers(16, num_experts=4, k=2, capacity_factor=1.0, min_capacity=0,
                                    use_rts=False, top2_2nd_expert_sampling=False)
    reference, ours = reference.bfloat16(), ours.bfloat16()
    seen = _row_counts(ours.deepspeed_moe.experts)
    x = torch.randn(150, 16).bfloat16()
    out_r, laux_r, counts_r, gx_r, grads_r = run_step(reference, x)
    out_o, laux_o, counts_o, gx_o, grads_o = run_step(ours, x)
    kept = ours.deepspeed_moe.last_routing.kept_per_expert().tolist()
    if onednn_present:
        assert [n for n, _ in seen] == [bucket(n) for n in kept] != kept
    else:
        assert [n for n, _ in seen] == kept != [bucket(n) for n in kept]
    torch.testing.assert_close(out_o, out_r, atol=0.05, rtol=0.02)
    torch.testing.assert_close(gx_o, gx_r, atol=0.05, rtol=0.02)
    for name in grads_r:
        torch.testing.assert_close(grads_o[name].float(), grads_r[name].float(), atol=0.1, rtol=0.05, msg=name)
