"""The compiled CPU dispatch loops: built here, used by the layer on the CPU, switchable, and a failed build
falls back (or fails loudly when required). Their numerics against the torch path: tests/test_dispatch.py."""
import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch

import ds_tutel
from ds_tutel.dispatch.grouped import grouped_plan
from ds_tutel.kernels.cpu import build as cpu_kernels
from ds_tutel.kernels.cpu import grouped as grouped_kernels
from ds_tutel.kernels.cpu.row_buckets import round_rows
from ds_tutel.routing import choices
from ds_tutel.routing.deepspeed import route_deepspeed
from ds_tutel.routing.slots import rank_by_score_within_groups, rank_within_groups, top2_slots
from helpers import expert_ffn, run_step
from hypothesis import given, settings
from hypothesis import strategies as st


def test_the_loops_build_on_this_machine():
    """The suite runs with DS_TUTEL_CPU_KERNELS=1 (conftest): a broken build or source fails here by name."""
    module = cpu_kernels.load()
    assert module is not None
    assert {"combine_forward", "combine_backward", "gather_backward", "rank_within_groups",
            "rank_by_score_within_groups", "argmax_rows", "top2_rows", "top2_slots", "own_column_picks", "grouped_rows",
            "padded_tokens"} <= set(dir(module))


CPU = torch.device("cpu")
OPERATIONS = ("expert_row_rounding", "grouped_plan", "own_column_picks", "rank_by_score_within_groups",
              "rank_within_groups", "router_softmax", "run_experts", "top1", "top2", "top2_slots")


def test_the_provider_registers_its_operations_and_they_apply_to_cpu_tensors():
    """What the tests below compare against the torch path is what the core finds in the registry."""
    from ds_tutel import kernels
    from ds_tutel.kernels.cpu import routing as cpu_routing
    assert kernels.provider_loaded("cpu") and kernels.registered("cpu") == OPERATIONS
    score_SE, group_J = torch.rand(8, 4), torch.randint(0, 3, (10,))
    routing = route_deepspeed(torch.randn(16, 4), k=2, capacity_factor=1.0, min_capacity=0)[0]
    assert kernels.find("top1", CPU, score_SE) is cpu_routing.top1
    assert kernels.find("top2", CPU, score_SE, score_SE) is cpu_routing.top2
    assert kernels.find("rank_within_groups", CPU, group_J, 3) is cpu_routing.rank_within_groups
    assert kernels.find("top2_slots", CPU, group_J.view(5, 2), None, 3) is cpu_routing.top2_slots
    assert kernels.find("grouped_plan", CPU, routing) is grouped_kernels.compiled_plan
    assert kernels.find("run_experts", CPU) is not None
    # not for what the torch path does as fast, nor for tensors elsewhere
    assert kernels.find("top1", CPU, score_SE.double()) is None
    assert kernels.find("rank_within_groups", CPU, group_J.int(), 3) is None
    assert kernels.find("top1", torch.device("meta"), score_SE) is None
    assert kernels.find("router_softmax", CPU, torch.rand(8, 64)) is None
    assert kernels.find("router_softmax", CPU, torch.rand(8, 2)) is cpu_routing.column_softmax


def test_an_unknown_setting_is_rejected(monkeypatch):
    monkeypatch.setenv("DS_TUTEL_CPU_KERNELS", "yes")
    with pytest.raises(ValueError, match="DS_TUTEL_CPU_KERNELS"):
        cpu_kernels.load()


def test_switched_off_the_plan_uses_the_torch_path_and_requiring_the_loops_raises(monkeypatch):
    monkeypatch.setenv("DS_TUTEL_CPU_KERNELS", "0")
    routing = route_deepspeed(torch.randn(16, 4), k=2, capacity_factor=1.0, min_capacity=0)[0]
    assert cpu_kernels.load() is None
    assert grouped_plan(routing).compiled is None
    from ds_tutel import kernels
    assert kernels.find("top1", CPU, torch.rand(8, 4)) is None  # the compiled routing passes step aside too
    with pytest.raises(RuntimeError, match="use_kernels=True"):
        grouped_plan(routing, use_kernels=True)


def test_a_compiled_plan_runs_its_loops_even_where_the_setting_changes_after_it(monkeypatch):
    from ds_tutel.dispatch.grouped import grouped_decode, grouped_encode
    routing = route_deepspeed(torch.randn(16, 4), k=2, capacity_factor=1.0, min_capacity=0)[0]
    plan = grouped_plan(routing, use_kernels=True)
    x_SM = torch.randn(16, 8, requires_grad=True)
    monkeypatch.setenv("DS_TUTEL_CPU_KERNELS", "0")
    y_SM = grouped_decode([2 * x_nM for x_nM in grouped_encode(x_SM, plan)], plan)
    y_SM.sum().backward()
    torch_plan = grouped_plan(routing)
    assert torch_plan.compiled is None
    x = x_SM.detach().requires_grad_(True)
    y = grouped_decode([2 * x_nM for x_nM in grouped_encode(x, torch_plan)], torch_plan)
    y.sum().backward()
    assert torch.equal(y_SM, y) and torch.equal(x_SM.grad, x.grad)


def test_a_built_module_loads_without_torchs_extension_builder():
    """Importing torch.utils.cpp_extension costs every process about 4.5 MB; a current build needs none of it."""
    code = ("import sys; from ds_tutel.kernels.cpu import build; assert build.load() is not None; "
            "print('torch.utils.cpp_extension' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DS_TUTEL_CPU_KERNELS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_a_failed_build_warns_and_falls_back_or_raises_when_required(monkeypatch, tmp_path):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise OSError("no C++ compiler")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no earlier build there
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("DS_TUTEL_CPU_KERNELS", "auto")
    with pytest.warns(RuntimeWarning, match="no C.. compiler"):
        assert cpu_kernels.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernels.load() is None  # warned once; the result is kept
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("DS_TUTEL_CPU_KERNELS", "1")
    with pytest.raises(RuntimeError, match="did not build"):
        cpu_kernels.load()


@pytest.mark.parametrize("dtype,k", [(torch.float32, 1), (torch.float32, 2), (torch.bfloat16, 2)])
def test_the_layer_runs_the_loops_on_the_cpu_with_the_torch_paths_results(dtype, k, monkeypatch):
    """Same layer, same tokens: with the loops (counted) and without, outputs and the experts' gradients are
    bitwise equal; the gates' gradients differ by summation order only, and through the router so do the
    router's and the tokens' gradients."""
    torch.manual_seed(0)
    layer = ds_tutel.MoE(16, expert_ffn(16), num_experts=4, k=k, capacity_factor=1.0).to(dtype)
    x = torch.randn(3, 40, 16).to(dtype)
    calls = []
    compiled_combine = grouped_kernels.CompiledPlanOps.combine
    monkeypatch.setattr(grouped_kernels.CompiledPlanOps, "combine",
                        lambda *a: calls.append(1) or compiled_combine(*a))
    results = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("DS_TUTEL_CPU_KERNELS", setting)
        results[setting] = run_step(copy.deepcopy(layer), x)
    assert len(calls) == 1  # only the run with the loops on went through them
    (out0, aux0, counts0, dx0, grads0), (out1, aux1, counts1, dx1, grads1) = results["0"], results["1"]
    assert torch.equal(out0, out1) and torch.equal(aux0, aux1) and torch.equal(counts0, counts1)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(dx0, dx1, rtol=tolerance, atol=tolerance)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        if ".gate." in name:
            torch.testing.assert_close(grads0[name], grads1[name], rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(grads0[name], grads1[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_loops_give_the_same_bits_on_one_thread_and_on_several(dtype):
    """Each token's sum is one thread's work, in a fixed order: the thread count cannot change a bit."""
    from ds_tutel.dispatch.grouped import grouped_decode, grouped_encode
    S, E, M, k = 333, 5, 40, 2
    gen = torch.Generator().manual_seed(7)
    routing = route_deepspeed(torch.randn(S, E, generator=gen), k=k, capacity_factor=1.0, min_capacity=0)[0]
    x0 = torch.randn(S, M, generator=gen).to(dtype)
    dy = torch.randn(S, M, generator=gen).to(dtype)
    weights = [torch.randn(M, generator=gen).to(dtype) for _ in range(E)]

    def step(threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            x = x0.clone().requires_grad_(True)
            gates = routing.gates_SK.detach().float().requires_grad_(True)
            routing.gates_SK = gates
            plan = grouped_plan(routing, use_kernels=True)
            # elementwise experts: a matmul's own blocking may change with the thread count
            y = grouped_decode([(t * w).sin() for t, w in zip(grouped_encode(x, plan), weights)], plan)
            y.backward(dy)
            return y.detach(), x.grad, gates.grad
        finally:
            torch.set_num_threads(previous)

    for a, b in zip(step(1), step(4)):
        assert torch.equal(a, b)


SCORE_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 400), st.integers(0, 40), st.integers(0, 2 ** 16), st.sampled_from(SCORE_DTYPES))
def test_compiled_ranks_are_the_torch_paths_integers(J, G, seed, dtype):
    """Every element's rank (excluded ones too) and the counts, bitwise; scores with many ties, NaNs and signed
    zeros, groups beyond num_groups (all excluded alike)."""
    gen = torch.Generator().manual_seed(seed)
    group_J = torch.randint(0, G + 3, (J,), generator=gen)
    pool = torch.tensor([0.0, -0.0, 0.25, 0.5, 1.0, float("nan"), float("inf"), -float("inf")])
    score_J = pool[torch.randint(0, len(pool), (J,), generator=gen)].to(dtype)
    compiled_rank_J, compiled_counts_G = rank_within_groups(group_J, G)
    torch_rank_J, torch_counts_G = rank_within_groups(group_J, G, use_kernels=False)
    assert torch.equal(compiled_rank_J, torch_rank_J)
    assert torch.equal(compiled_counts_G, torch_counts_G)
    assert torch.equal(rank_by_score_within_groups(group_J, score_J, G),
                       rank_by_score_within_groups(group_J, score_J, G, use_kernels=False))


def test_compiled_ranks_reject_negative_groups():
    with pytest.raises(RuntimeError, match="non-negative"):
        rank_within_groups(torch.tensor([0, -1, 2]), 3)
    with pytest.raises(RuntimeError, match="non-negative"):
        rank_by_score_within_groups(torch.tensor([0, -1, 2]), torch.rand(3), 3)


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 300), st.integers(1, 70), st.integers(0, 2 ** 16))
def test_compiled_choices_are_torchs_argmax(S, E, seed):
    """Top-1 and DeepSpeed's top-2 choices bitwise, on scores full of ties, NaNs, infinities and signed zeros
    (a row of -inf makes the second choice land on the first, as the overwrite with -inf does in torch)."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor([0.0, -0.0, 0.25, 1.0, float("nan"), float("inf"), -float("inf")])
    first_SE = pool[torch.randint(0, len(pool), (S, E), generator=gen)]
    second_SE = pool[torch.randint(0, len(pool), (S, E), generator=gen)]
    if S:
        second_SE[0] = -float("inf")
        first_SE[-1] = torch.rand(E, generator=gen)  # one row of ordinary scores
    assert torch.equal(choices.top1(first_SE), choices.top1(first_SE, use_kernels=False))
    assert torch.equal(choices.top2(first_SE, second_SE), choices.top2(first_SE, second_SE, use_kernels=False))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 300), st.integers(1, 40), st.booleans(), st.integers(0, 2 ** 16))
def test_compiled_top2_slots_are_the_torch_paths(S, E, with_used, seed):
    """Locations of used tokens and both counts, bitwise; first and second choices may name one expert."""
    gen = torch.Generator().manual_seed(seed)
    choice_SK = torch.randint(0, E, (S, 2), generator=gen)
    used_S = torch.rand(S, generator=gen) > 0.25 if with_used else None
    compiled = top2_slots(choice_SK, used_S, E)
    torch_path = top2_slots(choice_SK, used_S, E, use_kernels=False)
    used = torch.ones(S, dtype=torch.bool) if used_S is None else used_S
    assert torch.equal(compiled[0][used], torch_path[0][used])
    assert torch.equal(compiled[1], torch_path[1]) and torch.equal(compiled[2], torch_path[2])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 40), st.integers(0, 2 ** 16))
def test_compiled_top1_capacity_rule_is_the_torch_paths(S, E, seed):
    """Tokens kept by topk's column picks: picks of other columns, unwanted tokens and capacities above the
    column counts (picks of zeros) included."""
    gen = torch.Generator().manual_seed(seed)
    choice_S = torch.randint(0, E, (S,), generator=gen)
    wanted_S = torch.rand(S, generator=gen) > 0.2
    table_SE = torch.zeros(S, E, dtype=torch.uint8).scatter_(1, choice_S.unsqueeze(1),
                                                             wanted_S.to(torch.uint8).unsqueeze(1))
    top_CE = torch.topk(table_SE, k=int(torch.randint(1, S + 1, (1,), generator=gen)), dim=0)[1]
    assert torch.equal(choices.own_column_picks(top_CE, choice_S, wanted_S),
                       choices.own_column_picks(top_CE, choice_S, wanted_S, use_kernels=False))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.integers(1, 40), st.sampled_from([1, 2, 3, 4]), st.sampled_from([0.5, 1.0, 2.0]),
       st.booleans(), st.integers(0, 2 ** 16))
def test_the_compiled_plan_is_the_torch_paths_plan(S, E, k, capacity_factor, bucket_rows, seed):
    """Rows per expert, each row's token (pad rows included) and each kept choice's row, against the torch
    path's plan; dropped choices, empty experts and unused tokens included."""
    gen = torch.Generator().manual_seed(seed)
    used_S = (torch.rand(S, generator=gen) > 0.2).long()
    k = min(k, E)
    routing = route_deepspeed(torch.randn(S, E, generator=gen), k=k, capacity_factor=capacity_factor,
                              min_capacity=0, used_token_S=used_S, use_rts=False)[0]
    rounding = round_rows if bucket_rows else None
    compiled = grouped_plan(routing, round_rows=rounding, use_kernels=True)
    torch_path = grouped_plan(routing, round_rows=rounding, use_kernels=False)
    assert isinstance(compiled.compiled, grouped_kernels.CompiledPlanOps) and torch_path.compiled is None
    assert compiled.rows_per_expert == torch_path.rows_per_expert
    assert compiled.expert_rows == torch_path.expert_rows
    assert torch.equal(compiled.token_J, torch_path.token_J)
    assert torch.equal(compiled.token_P, torch_path.token_P)
    kept_SK = routing.kept_SK
    choice_J = kept_SK.reshape(-1).nonzero().squeeze(1)
    assert torch.equal(compiled.row_SK[~kept_SK], torch.full_like(compiled.row_SK[~kept_SK], -1))
    # a kept choice's row holds its token and its gate in the torch path's layout
    assert torch.equal(torch_path.token_J[compiled.row_SK.reshape(-1)[choice_J]], choice_J // k)
    assert torch.equal(torch_path.gates_J[compiled.row_SK.reshape(-1)[choice_J]],
                       routing.gates_SK.reshape(-1)[choice_J])


def test_the_compiled_plan_rejects_slots_that_are_not_a_prefix():
    """Kept choices must number each expert's slots 0..n-1 once each: a gap or a repeat raises instead of
    writing rows out of bounds."""
    kernels = cpu_kernels.load()
    indices_SK = torch.tensor([[0], [0], [1]])
    for locations in ([[0], [2], [0]], [[0], [0], [0]], [[1], [-1], [0]]):
        with pytest.raises(RuntimeError, match="slots 0"):
            kernels.grouped_rows(indices_SK, torch.tensor(locations), 2)
    with pytest.raises(RuntimeError, match="lie in"):
        kernels.grouped_rows(torch.tensor([[0], [2]]), torch.tensor([[0], [0]]), 2)
