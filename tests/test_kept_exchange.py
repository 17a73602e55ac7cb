"""The expert-parallel exchange of exactly the kept rows (ds_tutel.parallel.kept_exchange): its layout, the regrouping by
expert with its inverse, and on spawned gloo ranks the same outputs and gradients as the capacity buffers with
fewer rows on the wire."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_tutel.parallel.kept_exchange import KeptLayout, _ByExpert, _BySource, kept_layout
from ds_tutel.ranks import run_ranks

M = 8


def test_layout_of_two_ranks_with_two_local_experts():
    # I am rank 1. I keep 3, 0 | 2, 1 rows for experts 0, 1 (rank 0's) | 2, 3 (mine).
    # Rank 0 sends my experts 4 and 0 rows; I send them 2 and 1.
    layout = kept_layout([3, 0, 2, 1], [[4, 0], [2, 1]], me=1)
    assert layout.send_W == [3, 3] and layout.recv_W == [4, 3]
    assert layout.rows_L == [6, 1]
    # Received rows: rank 0's (4 for expert 0, none for expert 1), then mine (2 for expert 0, 1 for expert 1).
    assert layout.received_LW == [[slice(0, 4), slice(4, 6)], [slice(4, 4), slice(6, 7)]]
    # Expert 0 runs on rank 0's 4 rows then my 2; expert 1 on my 1 row.
    assert layout.within_expert_WL == [[slice(0, 4), slice(0, 0)], [slice(4, 6), slice(0, 1)]]


def test_layout_rejects_counts_of_another_expert_count():
    with pytest.raises(ValueError, match="3 experts' row counts, expected 2 ranks x 2"):
        kept_layout([1, 2, 3], [[1, 1], [1, 1]], me=0)


@st.composite
def _layouts(draw):
    W, L = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    filled_WL = [[draw(st.integers(0, 5)) for _ in range(L)] for _ in range(W)]
    layout = kept_layout([0] * (W * L), filled_WL, me=0)
    # Pad rows as row buckets would add them, whatever this machine's matmuls need.
    layout.expert_rows_L = [n + draw(st.integers(0, 3)) for n in layout.rows_L]
    return filled_WL, layout


@settings(max_examples=60, deadline=None)
@given(_layouts())
def test_regrouping_by_expert_is_a_permutation_plus_zero_pad_rows_and_its_backward_inverts_it(case):
    filled_WL, layout = case
    R = sum(layout.recv_W)
    recv_RM = torch.randn(R, M, dtype=torch.float64, requires_grad=True)
    inputs_pM = _ByExpert.apply(recv_RM, layout)
    start = 0
    for w, filled_L in enumerate(filled_WL):  # rank w's rows for expert l: its block, local experts in order
        for l, n in enumerate(filled_L):
            before = sum(filled_WL[v][l] for v in range(w))
            assert torch.equal(inputs_pM[l][before:before + n], recv_RM[start:start + n].detach())
            start += n
    for x_pM, n, p in zip(inputs_pM, layout.rows_L, layout.expert_rows_L):
        assert x_pM.shape == (p, M) and not x_pM[n:].any()
    # Experts as the identity: back by source gives the received rows, and gradients flow back unchanged.
    back_RM = _BySource.apply(layout, *inputs_pM)
    assert torch.equal(back_RM, recv_RM.detach())
    grad_RM = torch.randn(R, M, dtype=torch.float64)
    back_RM.backward(grad_RM)
    assert torch.equal(recv_RM.grad, grad_RM)


def test_pad_rows_get_a_zero_gradient():
    layout = KeptLayout(send_W=[2], recv_W=[2], rows_L=[2], expert_rows_L=[4], received_LW=[[slice(0, 2)]],
                        within_expert_WL=[[slice(0, 2)]], me=0)
    outs_pM = [torch.randn(4, M, requires_grad=True)]
    _BySource.apply(layout, *outs_pM).sum().backward()
    assert torch.equal(outs_pM[0].grad, torch.cat([torch.ones(2, M), torch.zeros(2, M)]))


@pytest.mark.parametrize("kwargs,kept", [
    (dict(), True),
    (dict(a2a_algorithm="auto"), True),  # auto's default threshold is 0: always flat
    (dict(a2a_algorithm="auto", a2a_auto_threshold=1 << 20), False),  # picks per message size
    (dict(a2a_algorithm="2dh"), False),
    (dict(a2a_ffn_overlap_degree=2), False),
    (dict(a2a_send="capacity"), False),
])
def test_which_exchanges_send_only_kept_rows(kwargs, kept, monkeypatch):
    import ds_tutel
    from ds_tutel import strategies
    from helpers import expert_ffn

    monkeypatch.delenv("DS_TUTEL_A2A_AUTO_THRESHOLD", raising=False)
    layer = ds_tutel.MoE(M, expert_ffn(M), num_experts=4, ep_size=2, **kwargs)
    chosen = strategies.choose(layer.ep_size, layer.deepspeed_moe.exchange)
    assert (chosen == strategies.KEPT_EXCHANGE) is kept


CASES = [  # (num_experts, k, drop_tokens, capacity_factor, dtype)
    (4, 1, True, 1.0, torch.float32),
    (4, 2, True, 1.0, torch.float32),
    (8, 3, True, 1.25, torch.float32),
    (4, 2, False, 1.0, torch.float32),
    (8, 2, True, 1.0, torch.bfloat16),
]


def _kept_against_capacity(rank, world_size):
    """Per case: the same layer with a2a_send 'kept' and 'capacity' on the same tokens (unequal counts per rank,
    a few tokens masked out); outputs, input and parameter gradients must match, and the kept exchange must put
    only kept rows on the wire."""
    import torch.distributed as dist

    import ds_tutel
    from helpers import expert_ffn

    sent_rows = []
    all_to_all_single = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
        if input.shape[-1] == M:  # the data rows, not the kept counts
            sent_rows.append(input.numel() // M if input_split_sizes is None else sum(input_split_sizes))
        return all_to_all_single(output, input, output_split_sizes, input_split_sizes, **kwargs)

    dist.all_to_all_single = counting
    report = []
    for num_experts, k, drop_tokens, capacity_factor, dtype in CASES:
        results = {}
        for send in ("kept", "capacity"):
            torch.manual_seed(0)
            layer = ds_tutel.MoE(M, expert_ffn(M), num_experts=num_experts, ep_size=world_size, k=k,
                                 capacity_factor=capacity_factor, drop_tokens=drop_tokens, min_capacity=2,
                                 use_rts=False, top2_2nd_expert_sampling=False, a2a_send=send).to(dtype)
            layer.set_deepspeed_parallelism()
            tokens = 6 + 5 * rank
            x = torch.randn(tokens, M, generator=torch.Generator().manual_seed(10 + rank)).to(dtype)
            x.requires_grad_(True)
            used = (torch.arange(tokens) % 5 != 2).to(dtype)
            sent_rows.clear()
            out, l_aux, counts = layer(x, used)
            (out.float().square().sum() + l_aux).backward()
            routing = layer.deepspeed_moe.last_routing
            results[send] = (out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()},
                             list(sent_rows), int(routing.kept_per_expert().sum()), routing.capacity)
        (out_k, dx_k, grads_k, rows_k, kept, capacity), (out_c, dx_c, grads_c, rows_c, _, _) = (
            results["kept"], results["capacity"])
        tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out_k, out_c, **tol)
        torch.testing.assert_close(dx_k, dx_c, **tol)
        for name in grads_c:
            torch.testing.assert_close(grads_k[name], grads_c[name], **tol, msg=lambda m: f"{name}: {m}")
        # Four data exchanges per step (out and back, forward and backward) in both: the capacity ones carry whole
        # buffers; the first kept one at most this rank's kept rows (less its own block, which stays here).
        assert len(rows_k) == 4 and rows_c == [num_experts * capacity] * 4
        assert rows_k[0] <= kept < num_experts * capacity
        report.append((rows_k, rows_c))
    return report


@pytest.mark.multirank
@pytest.mark.parametrize("world_size", [2, 4])
def test_kept_rows_give_the_capacity_buffers_results_with_fewer_rows_sent(world_size):
    reports = run_ranks(_kept_against_capacity, world_size, timeout=240)
    assert len(reports) == world_size
    total_kept = sum(sum(rows) for report in reports for rows, _ in report)
    total_capacity = sum(sum(rows) for report in reports for _, rows in report)
    assert total_kept < total_capacity / 2


def _a_rank_without_kept_rows(rank, world_size):
    """Rank 0 masks out all its tokens: it sends no rows but still receives and computes rank 1's; results as
    with the capacity buffers, and no hang."""
    import ds_tutel
    from helpers import expert_ffn

    results = {}
    for send in ("kept", "capacity"):
        torch.manual_seed(0)
        layer = ds_tutel.MoE(M, expert_ffn(M), num_experts=4, ep_size=world_size, k=2, use_rts=False,
                             top2_2nd_expert_sampling=False, a2a_send=send)
        layer.set_deepspeed_parallelism()
        x = torch.randn(8, M, generator=torch.Generator().manual_seed(rank), requires_grad=True)
        used = torch.zeros(8) if rank == 0 else torch.ones(8)
        out, l_aux, _ = layer(x, used)
        (out.square().sum() + l_aux).backward()
        kept = int(layer.deepspeed_moe.last_routing.kept_per_expert().sum())
        results[send] = (out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}, kept)
    (out_k, dx_k, grads_k, kept), (out_c, dx_c, grads_c, _) = results["kept"], results["capacity"]
    torch.testing.assert_close(out_k, out_c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx_k, dx_c, rtol=1e-6, atol=1e-6)
    for name in grads_c:
        torch.testing.assert_close(grads_k[name], grads_c[name], rtol=1e-6, atol=1e-6)
    return kept


@pytest.mark.multirank
def test_a_rank_that_keeps_no_rows_still_serves_its_experts():
    kept = run_ranks(_a_rank_without_kept_rows, 2, timeout=120)
    assert kept[0] == 0 and kept[1] > 0


def _triton_kept_against_torch_capacity(rank, world_size, variants):
    """The GPU path's kept exchange (Triton backend, device plan, under the interpreter) against the torch path's
    capacity exchange: outputs, l_aux, exp_counts, input and parameter gradients; unequal token counts per rank and
    masked tokens. variants: how the GPU path's experts run, each in turn ("loop"; "reference": the torch grouped
    GEMM reference registered for the Triton backend; "kernel": the Triton grouped GEMM as triton_kernels registers
    it)."""
    from ds_tutel import kernels
    from ds_tutel.experts import grouped_linear_reference

    kernels.DEVICE_BACKENDS = {}  # as on a GPU (this process is this test's alone)
    assert kernels.provider_loaded("triton")
    registered = kernels._table[("triton", "grouped_linear")]
    for experts in variants:
        gemm_calls = []
        if experts == "loop":
            kernels._table.pop(("triton", "grouped_linear"), None)
        else:
            gemm = grouped_linear_reference if experts == "reference" else registered.fn

            def counting(*args, gemm=gemm, gemm_calls=gemm_calls):
                gemm_calls.append(1)
                return gemm(*args)

            kernels.register("triton", "grouped_linear", counting,
                             accepts=None if experts == "reference" else registered.accepts)
        _kept_cases_match(rank, world_size, experts, gemm_calls)
    return True


def _kept_cases_match(rank, world_size, experts, gemm_calls):
    """One variant's cases: the kept exchange's results equal the capacity exchange's."""
    import ds_tutel
    from helpers import expert_ffn

    # The CASES, then one where rank 0 routes no token (it sends nothing, still serves its experts).
    for (num_experts, k, drop_tokens, capacity_factor, dtype), silent in [(case, False) for case in CASES[:4]] + [
            (CASES[1], True)]:
        results = {}
        for backend, send in (("triton", "kept"), ("torch", "capacity")):
            torch.manual_seed(0)
            layer = ds_tutel.MoE(M, expert_ffn(M), num_experts=num_experts, ep_size=world_size, k=k,
                                 capacity_factor=capacity_factor, drop_tokens=drop_tokens, min_capacity=2,
                                 use_rts=False, top2_2nd_expert_sampling=False, a2a_send=send,
                                 dispatch_backend=backend).to(dtype)
            layer.set_deepspeed_parallelism()
            assert layer.deepspeed_moe.strategy(torch.device("cpu")) == (
                "kept_exchange" if send == "kept" else "capacity")
            tokens = 6 + 5 * rank
            x = torch.randn(tokens, M, generator=torch.Generator().manual_seed(10 + rank)).to(dtype)
            x.requires_grad_(True)
            used = (torch.arange(tokens) % 5 != 2).to(dtype) * (0 if silent and rank == 0 else 1)
            out, l_aux, counts = layer(x, used)
            (out.float().square().sum() + l_aux).backward()
            results[backend] = (out.detach(), l_aux.detach(), counts, x.grad,
                                {n: p.grad for n, p in layer.named_parameters()})
        assert bool(gemm_calls) == (experts != "loop") or silent
        gemm_calls.clear()
        got, want = results["triton"], results["torch"]
        for a, b in zip(got[:4], want[:4]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        for name in want[4]:
            torch.testing.assert_close(got[4][name], want[4][name], rtol=1e-6, atol=1e-6,
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.multirank
def test_the_gpu_paths_kept_exchange_gives_the_torch_paths_results():
    """Experts in a loop, on the registered torch reference of the grouped GEMM and on the Triton kernel, in one
    start of the ranks."""
    env = {"TRITON_INTERPRET": "1", "DS_TUTEL_CPU_KERNELS": "0"}
    assert run_ranks(_triton_kept_against_torch_capacity, 2, ["loop", "reference", "kernel"], timeout=300,
                     env=env) == [True, True]
