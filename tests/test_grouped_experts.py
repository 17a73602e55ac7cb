"""The GPU path's exact-row experts: the device row plan (ds_tutel.dispatch.rows), the FFN forms and their grouped
run (ds_tutel.experts: grouped_linear_reference, ffn_form, run_ffn, Experts.forward_rows), against the plain
per-expert modules and the torch path's grouped plan; and, where triton_kernels/grouped_gemm.py is present, the
same through the Triton kernel under Triton's interpreter (tiny shapes).

Shape legend: S tokens, M model dim, E experts, K choices per token, N rows sorted expert after expert (the last
ones of no expert), H hidden dim, L experts of one grouped run, L1 = L + 1 offsets.
"""
from __future__ import annotations

import copy
import importlib.util
import os
from typing import List, Sequence

import pytest
import torch
from torch import nn

from ds_tutel import kernels
from ds_tutel.dispatch import rows
from ds_tutel.dispatch.grouped import grouped_decode, grouped_encode, grouped_plan
from ds_tutel.experts import Experts, ffn_form, grouped_linear_reference, run_ffn
from ds_tutel.routing.types import Routing

M, H = 6, 10
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_KERNEL = importlib.util.find_spec("triton") is not None and os.path.exists(
    os.path.join(REPO, "triton_kernels", "grouped_gemm.py"))
if HAS_KERNEL:  # the kernels must be imported interpreted, before anything imports triton (see load_interpreted)
    from test_triton_interpreter import _is_interpreted, load_interpreted

    load_interpreted()


def _interpreted_grouped_gemm():
    """triton_kernels.grouped_gemm with its kernels interpreted, and the Triton provider registering it."""
    load_interpreted()
    gg = importlib.import_module("triton_kernels.grouped_gemm")
    assert _is_interpreted(gg._bias_grad_kernel)
    assert kernels.provider_loaded("triton")
    return gg


class Swiglu(nn.Module):
    """The GatedFFN protocol's form, defined here (the core recognises it by its attributes)."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(M, H, bias=bias), nn.Linear(M, H, bias=bias)
        self.down_proj = nn.Linear(H, M, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x_nM: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x_nM)) * self.up_proj(x_nM))


class FusedSwiglu(nn.Module):
    """The FusedGatedFFN protocol's form (gate and up in one Linear, gate outputs first), defined here."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(M, 2 * H, bias=bias)
        self.down_proj = nn.Linear(H, M, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x_nM: torch.Tensor) -> torch.Tensor:
        gate_nH, up_nH = self.gate_up_proj(x_nM).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate_nH) * up_nH)


def _sequential(bias: bool = True, act: nn.Module = None) -> nn.Module:
    return nn.Sequential(nn.Linear(M, H, bias=bias), act or nn.GELU(), nn.Linear(H, M, bias=bias))


def _experts(make, L: int, seed: int = 0) -> List[nn.Module]:
    torch.manual_seed(seed)
    return [make() for _ in range(L)]


def _offsets(counts: Sequence[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)


def test_ffn_forms_are_recognised_and_others_are_not():
    assert ffn_form(_experts(_sequential, 3)) == "sequential"
    assert ffn_form(_experts(lambda: _sequential(bias=False, act=nn.ReLU()), 2)) == "sequential"
    assert ffn_form(_experts(Swiglu, 2)) == "gated"
    assert ffn_form(_experts(lambda: Swiglu(bias=True), 2)) == "gated"
    assert ffn_form(_experts(FusedSwiglu, 2)) == "fused_gated"
    assert ffn_form(_experts(lambda: FusedSwiglu(bias=True), 2)) == "fused_gated"
    odd = FusedSwiglu()
    odd.gate_up_proj = nn.Linear(M, 2 * H + 1, bias=False)  # cannot be split in gate and up halves
    assert ffn_form([odd]) is None
    assert ffn_form([FusedSwiglu(), FusedSwiglu(bias=True)]) is None
    # Not an elementwise activation, a different activation per expert, other shapes, a custom forward, hooks.
    assert ffn_form(_experts(lambda: _sequential(act=nn.Dropout(0.1)), 2)) is None
    assert ffn_form([_sequential(act=nn.GELU()), _sequential(act=nn.GELU(approximate="tanh"))]) is None
    assert ffn_form([_sequential(), nn.Sequential(nn.Linear(M, 4), nn.GELU(), nn.Linear(4, M))]) is None
    assert ffn_form([nn.Sequential(nn.Linear(M, H), nn.GELU(), nn.Linear(H, M), nn.GELU())]) is None

    class Residual(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    assert ffn_form([Residual(nn.Linear(M, H), nn.GELU(), nn.Linear(H, M))]) is None
    hooked = _experts(_sequential, 2)
    hooked[1][0].register_forward_hook(lambda *args: None)
    assert ffn_form(hooked) is None
    assert ffn_form([nn.Linear(M, M)]) is None


def test_grouped_linear_reference_is_each_experts_linear_on_its_rows():
    linears = _experts(lambda: nn.Linear(M, H), 4)
    counts = [3, 0, 5, 1]
    x_NM = torch.randn(sum(counts) + 2, M, requires_grad=True)  # 2 rows of no expert
    y_NH = grouped_linear_reference(x_NM, _offsets(counts), [m.weight for m in linears], [m.bias for m in linears])
    start = 0
    for linear, n in zip(linears, counts):
        torch.testing.assert_close(y_NH[start:start + n], linear(x_NM[start:start + n]))
        start += n
    assert not y_NH[start:].any()
    y_NH.sum().backward()
    assert linears[1].weight.grad is not None and not linears[1].weight.grad.any()  # no rows, a zero gradient


@pytest.mark.parametrize("make", [_sequential, lambda: _sequential(bias=False, act=nn.ReLU()), Swiglu,
                                  lambda: Swiglu(bias=True), FusedSwiglu, lambda: FusedSwiglu(bias=True)],
                         ids=["seq_bias", "seq_nobias", "swiglu", "swiglu_bias", "fused", "fused_bias"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 4, 0], [0, 0, 0, 0]])
def test_grouped_run_equals_the_experts_one_by_one(make, counts):
    grouped, plain = _experts(make, 4), _experts(make, 4)
    x_NM = torch.randn(sum(counts) + 3, M)
    xg_NM, xp_NM = x_NM.clone().requires_grad_(True), x_NM.clone().requires_grad_(True)
    out_NM = run_ffn(ffn_form(grouped), grouped, xg_NM, _offsets(counts), lambda *args: grouped_linear_reference)
    J = sum(counts)
    want_JM = torch.cat([e(part) for e, part in zip(plain, torch.split(xp_NM[:J], counts))])
    torch.testing.assert_close(out_NM[:J], want_JM)
    grad_JM = torch.randn(J, M)
    out_NM[:J].backward(grad_JM)
    want_JM.backward(grad_JM)
    torch.testing.assert_close(xg_NM.grad[:J], xp_NM.grad[:J])
    for g, p in zip(grouped, plain):
        for (name, pg), pp in zip(g.named_parameters(), p.parameters()):
            torch.testing.assert_close(pg.grad, pp.grad, msg=name)


def _routing(S: int, K: int, E: int, capacity: int, seed: int) -> Routing:
    """A routing with dropped choices: slots given in token order per expert until the capacity is full."""
    g = torch.Generator().manual_seed(seed)
    indices_SK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(S)])
    locations_SK = torch.full_like(indices_SK, -1)
    filled = [0] * E
    for s in range(S):
        for k in range(K):
            e = int(indices_SK[s, k])
            if filled[e] < capacity and (s + k) % 7 != 3:
                locations_SK[s, k] = filled[e]
                filled[e] += 1
    gates_SK = torch.rand(S, K, generator=g).where(locations_SK >= 0, torch.zeros(()))
    return Routing(indices_SK=indices_SK, locations_SK=locations_SK, gates_SK=gates_SK.requires_grad_(True),
                   capacity=capacity, counts_E=torch.bincount(indices_SK.reshape(-1), minlength=E),
                   probs_SE=torch.rand(S, E, generator=g))


@pytest.mark.parametrize("S,K,E,capacity", [(9, 1, 4, 2), (11, 2, 4, 4), (7, 3, 5, 3), (5, 2, 3, 0)])
def test_row_plan_orders_rows_as_the_grouped_plan_and_its_gather_and_combine_equal_it(S, K, E, capacity):
    routing = _routing(S, K, E, capacity, seed=S)
    reference = grouped_plan(routing, use_kernels=False)
    plan = rows.row_plan(routing)
    J = sum(reference.rows_per_expert)
    assert plan.num_rows == min(S * K, E * capacity) and not plan.exact
    assert plan.offsets_E1.tolist() == [0, *torch.tensor(reference.rows_per_expert).cumsum(0).tolist()]
    assert torch.equal(plan.token_N[:J], reference.token_J)
    assert torch.equal(rows.kept_counts(routing), routing.kept_per_expert())

    x_SM = torch.randn(S, M, dtype=torch.float64)
    weight = torch.randn(M, M, dtype=torch.float64)
    grad_SM = torch.randn(S, M, dtype=torch.float64)
    results = []
    for path in ("rows", "grouped"):
        x = x_SM.clone().requires_grad_(True)
        routing.gates_SK.grad = None
        if path == "rows":
            # The experts as one matmul; rows of no expert hold NaN, as a grouped GEMM may leave them.
            out_NM = rows.gather(x, plan) @ weight
            y_SM = rows.combine(torch.cat([out_NM[:J], torch.full_like(out_NM[J:], float("nan"))]), plan)
        else:
            y_SM = grouped_decode([x_nM @ weight for x_nM in grouped_encode(x, reference)], reference)
        y_SM.backward(grad_SM)
        results.append((y_SM.detach(), x.grad, routing.gates_SK.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
    assert not torch.isnan(results[0][2]).any()


def test_gather_leaves_out_the_gradient_of_rows_of_no_expert():
    routing = _routing(8, 2, 3, 8, seed=1)
    plan = rows.row_plan(routing)
    J = int(plan.offsets_E1[-1])
    assert J < plan.num_rows
    x_SM = torch.randn(8, M, requires_grad=True)
    grad_NM = torch.randn(plan.num_rows, M)
    grad_NM[J:] = float("nan")
    rows.gather(x_SM, plan).backward(grad_NM)
    want_SM = torch.zeros(8, M).index_add_(0, plan.token_N[:J], grad_NM[:J])
    torch.testing.assert_close(x_SM.grad, want_SM)


def test_exact_plans_have_exactly_the_kept_rows():
    routing = _routing(8, 2, 4, 3, seed=2)
    rows_E = routing.kept_per_expert().tolist()
    plan = rows.row_plan(routing, rows_E=rows_E)
    assert plan.exact and plan.num_rows == sum(rows_E)
    assert torch.equal(plan.token_N, grouped_plan(routing, use_kernels=False).token_J)


@pytest.mark.parametrize("make", [_sequential, Swiglu, FusedSwiglu, lambda: nn.Sequential(nn.Linear(M, M), nn.Tanh())],
                         ids=["sequential", "swiglu", "fused", "other"])
def test_forward_rows_uses_the_backends_grouped_gemm_for_known_forms_and_loops_otherwise(make, monkeypatch):
    torch.manual_seed(0)
    experts = Experts(make(), 3, "ep_size_1")
    for e in experts.deepspeed_experts:  # distinct experts
        for p in e.parameters():
            p.data.normal_()
    calls: List[torch.Size] = []

    def counting(x_NI, offsets_L1, weights, biases=None):
        calls.append(x_NI.shape)
        return grouped_linear_reference(x_NI, offsets_L1, weights, biases)

    monkeypatch.setitem(kernels._providers, "triton", True)  # the stand-in alone, whether triton is there or not
    monkeypatch.setitem(kernels._table, ("triton", "grouped_linear"), kernels.Implementation(counting))
    counts = [2, 0, 3]
    x_NM = torch.randn(7, M, requires_grad=True)
    out_NM = experts.forward_rows(x_NM, _offsets(counts), "triton")
    plain = copy.deepcopy(experts)
    want_JM = torch.cat(plain.forward_grouped(torch.split(x_NM.detach()[:5], counts)))
    torch.testing.assert_close(out_NM[:5], want_JM)
    assert len(calls) == {"sequential": 2, "swiglu": 3, "fused": 2, "other": 0}[_id(make)]
    # Rows given on the host: the loop needs no read of the offsets.
    calls.clear()
    torch.testing.assert_close(experts.forward_rows(x_NM, _offsets(counts), "torch", counts)[:5], want_JM)
    assert calls == []


FIRST_LINEAR = {"sequential": "0", "swiglu": "gate_proj", "fused": "gate_up_proj"}


def _id(make) -> str:
    return {_sequential: "sequential", Swiglu: "swiglu", FusedSwiglu: "fused"}.get(make, "other")


@pytest.mark.skipif(not HAS_KERNEL, reason="triton_kernels/grouped_gemm.py is not there yet")
@pytest.mark.parametrize("make", [_sequential, Swiglu, FusedSwiglu], ids=["sequential", "swiglu", "fused"])
def test_grouped_run_through_the_triton_kernel_equals_the_experts_one_by_one(make, monkeypatch):
    """run_ffn on the registered Triton grouped GEMM, under the interpreter, with rows of no expert at the end
    (the layer's device plan sizes its buffers by a bound). The kernel's outputs are allocated poisoned (NaN): what
    it leaves unwritten in the rows of no expert must not reach the experts' rows or any parameter gradient."""
    from test_triton_interpreter import poisoning_empty

    gg = _interpreted_grouped_gemm()
    monkeypatch.setattr(gg, "_empty", poisoning_empty(gg._empty))
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        counts = [4, 0, 3, 1]
        grouped, plain = _experts(make, 4), _experts(make, 4)
        x_NM = torch.randn(sum(counts) + 5, M)
        found = kernels.lookup("triton", "grouped_linear", x_NM, _offsets(counts),
                               [e.get_submodule(FIRST_LINEAR[_id(make)]).weight for e in grouped], None)
        assert found is not None, "the Triton provider registers no grouped_linear that takes these tensors"
        xg_NM, xp_NM = x_NM.clone().requires_grad_(True), x_NM.clone().requires_grad_(True)
        out_NM = run_ffn(ffn_form(grouped), grouped, xg_NM, _offsets(counts),
                         lambda *args: kernels.lookup("triton", "grouped_linear", *args))
        J = sum(counts)
        tail_NM = out_NM[J:].detach()
        assert (torch.isnan(tail_NM) | (tail_NM == 0)).all()  # left alone (poisoned) or zero: never computed
        want_JM = torch.cat([e(part) for e, part in zip(plain, torch.split(xp_NM[:J], counts))])
        torch.testing.assert_close(out_NM[:J], want_JM, atol=1e-5, rtol=1e-5)
        grad_NM = torch.cat([torch.randn(J, M), torch.zeros(x_NM.shape[0] - J, M)])
        out_NM.backward(grad_NM)
        want_JM.backward(grad_NM[:J])
        torch.testing.assert_close(xg_NM.grad[:J], xp_NM.grad[:J], atol=1e-5, rtol=1e-5)
        for g, p in zip(grouped, plain):
            for (name, pg), pp in zip(g.named_parameters(), p.parameters()):
                torch.testing.assert_close(pg.grad, pp.grad, atol=1e-5, rtol=1e-5, msg=name)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def test_combine_passes_gradcheck():
    routing = _routing(7, 2, 3, 3, seed=3)
    plan = rows.row_plan(routing)
    out_NM = torch.randn(plan.num_rows, 4, dtype=torch.float64, requires_grad=True)
    gates_SK = routing.gates_SK.detach().double().requires_grad_(True)

    def combine(out_NM, gates_SK):
        return rows.combine(out_NM, rows.RowPlan(plan.token_N, plan.row_SK, plan.kept_SK, gates_SK, plan.offsets_E1,
                                                 plan.rows_E))

    assert torch.autograd.gradcheck(combine, (out_NM, gates_SK))
