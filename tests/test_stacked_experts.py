"""Stacked gated experts (ds_tutel.stacked_experts): the same outputs and gradients as one module per expert on
every path the layer takes, DeepSpeed's per-expert state-dict entries (loadable both ways), and the grouped GEMM
of the GPU path under Triton's interpreter, biases and GPT-OSS's interleaved activation included.

Shape legend: L local experts, W ranks, C capacity, M model dim, H hidden dim, N rows sorted expert after expert,
S tokens.
"""
from __future__ import annotations

import importlib.util
import os
from typing import List

import pytest
import torch
from torch import nn

from ds_tutel import MoE, kernels
from ds_tutel.experts import Experts, grouped_linear_reference
from ds_tutel.hf.layouts import ChunkedGLU, ClampedInterleavedGLU
from ds_tutel.stacked_experts import GLUExpert, StackedGLUExperts

M, H, L = 8, 4, 4  # rows of whole 16-byte units: the grouped GEMM takes views of the stacked biases
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_KERNEL = importlib.util.find_spec("triton") is not None and os.path.exists(
    os.path.join(REPO, "triton_kernels", "grouped_gemm.py"))
if HAS_KERNEL:  # the kernels must be imported interpreted, before anything imports triton (see load_interpreted)
    from test_triton_interpreter import load_interpreted

    load_interpreted()

GLUS = {"swiglu": lambda: ChunkedGLU(nn.SiLU()), "clamped": lambda: ClampedInterleavedGLU(1.702, 0.5)}


class PerExpertGLU(GLUExpert):
    """A GLUExpert the layer copies once per expert (no stacking): the reference."""

    stack_experts = None  # type: ignore[assignment]


def _pair(glu: str, bias: bool, seed: int = 0):
    """(stacked, per-expert) local experts with the same, distinct, weights."""
    torch.manual_seed(seed)
    stacked = GLUExpert(M, H, GLUS[glu](), bias=bias).stack_experts(L, "ep_size_1")
    with torch.no_grad():
        for p in stacked.parameters():
            p.normal_()
    plain = Experts(PerExpertGLU(M, H, GLUS[glu](), bias=bias), L, "ep_size_1")
    plain.load_state_dict(stacked.state_dict())
    return stacked, plain


def _assert_same_grads(stacked: StackedGLUExperts, plain: Experts) -> None:
    for l, expert in enumerate(plain.deepspeed_experts):
        for name, p in expert.named_parameters():
            torch.testing.assert_close(stacked.get_parameter(name).grad[l], p.grad, msg=f"expert {l} {name}")


def test_stack_experts_copies_the_template_and_marks_expert_parameters():
    template = GLUExpert(M, H, ChunkedGLU(nn.SiLU()), bias=True)
    stacked = template.stack_experts(3, "ep_size_2")
    assert [n for n, _ in stacked.named_parameters()] == ["gate_up_proj.weight", "gate_up_proj.bias",
                                                          "down_proj.weight", "down_proj.bias"]
    assert stacked.gate_up_proj.weight.shape == (3, 2 * H, M) and stacked.down_proj.weight.shape == (3, M, H)
    for name, p in template.named_parameters():
        assert all(torch.equal(piece, p) for piece in stacked.get_parameter(name)), name
    assert all(p.allreduce is False and p.group_name == "ep_size_2" for p in stacked.parameters())
    # Initialised as nn.Linear initialises each expert: distinct experts, within nn.Linear's bounds.
    fresh = StackedGLUExperts(3, M, H, nn.ReLU(), bias=False, group_name="ep_size_1")
    w_LOI = fresh.gate_up_proj.weight
    assert not torch.equal(w_LOI[0], w_LOI[1]) and w_LOI.abs().max() <= 1 / M ** 0.5


@pytest.mark.parametrize("glu, bias", [("swiglu", False), ("clamped", True)])
def test_every_path_equals_one_module_per_expert(glu, bias):
    stacked, plain = _pair(glu, bias)
    # Capacity buffers [W, L, C, M].
    buf_WLCM = torch.randn(2, L, 3, M)
    a, b = buf_WLCM.clone().requires_grad_(True), buf_WLCM.clone().requires_grad_(True)
    out_WLCM = stacked(a)
    torch.testing.assert_close(out_WLCM, plain(b))
    dy_WLCM = torch.randn_like(out_WLCM)
    out_WLCM.backward(dy_WLCM)
    plain(b).backward(dy_WLCM)
    torch.testing.assert_close(a.grad, b.grad)
    _assert_same_grads(stacked, plain)
    # Exact rows, one expert with none.
    for p in list(stacked.parameters()) + list(plain.parameters()):
        p.grad = None
    counts = [3, 0, 2, 4]
    xs = [torch.randn(n, M) for n in counts]
    outs_s, outs_p = stacked.forward_grouped(xs), plain.forward_grouped(xs)
    for s, p in zip(outs_s, outs_p):
        torch.testing.assert_close(s, p)
    sum(o.square().sum() for o in outs_s).backward()
    sum(o.square().sum() for o in outs_p).backward()
    _assert_same_grads(stacked, plain)
    assert stacked.gate_up_proj.weight.grad[1].abs().max() == 0  # the expert without rows: a zero gradient
    # Rows sorted by expert, no grouped GEMM on the torch backend: the loop, rows of no expert zero.
    x_NM = torch.cat(xs + [torch.randn(2, M)])
    offsets_L1 = torch.tensor([0] + counts).cumsum(0)
    out_NM = stacked.forward_rows(x_NM, offsets_L1, "torch")
    torch.testing.assert_close(out_NM[:9], torch.cat(outs_p).detach())
    assert out_NM[9:].abs().max() == 0


def test_forward_rows_takes_the_backends_grouped_gemm_on_the_stacked_weights(monkeypatch):
    stacked, plain = _pair("clamped", True)
    calls: List[int] = []

    def counting(x_NI, offsets_L1, weights, biases=None):
        calls.append(len(weights))
        assert all(w.data_ptr() == stacked.gate_up_proj.weight[l].data_ptr() for l, w in enumerate(weights)) or all(
            w.data_ptr() == stacked.down_proj.weight[l].data_ptr() for l, w in enumerate(weights))
        return grouped_linear_reference(x_NI, offsets_L1, weights, biases)

    monkeypatch.setitem(kernels._providers, "triton", True)  # the stand-in alone, whether triton is there or not
    monkeypatch.setitem(kernels._table, ("triton", "grouped_linear"), kernels.Implementation(counting))
    counts = [2, 0, 3, 1]
    x_NM = torch.randn(8, M)
    out_NM = stacked.forward_rows(x_NM, torch.tensor([0] + counts).cumsum(0), "triton")
    assert calls == [L, L]  # one grouped call per Linear, on views of the stacked weights (no copies)
    torch.testing.assert_close(out_NM[:6], torch.cat(plain.forward_grouped(torch.split(x_NM[:6], counts))))


def test_state_dict_shows_deepspeeds_per_expert_entries_and_loads_them_back():
    stacked, plain = _pair("swiglu", False)
    state = stacked.state_dict()
    assert list(state) == list(plain.state_dict())  # deepspeed_experts.{l}.gate_up_proj.weight, ...
    assert torch.equal(state["deepspeed_experts.2.down_proj.weight"], stacked.down_proj.weight[2])
    twin, _ = _pair("swiglu", False, seed=1)
    assert not torch.equal(twin.down_proj.weight, stacked.down_proj.weight)
    twin.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(twin.parameters(), stacked.parameters()))
    # An expert missing (or one too many) is reported, never stacked short.
    partial = {k: v for k, v in state.items() if not k.startswith("deepspeed_experts.3.")}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*gate_up_proj.weight"):
        twin.load_state_dict(partial)
    extra = dict(state, **{"deepspeed_experts.4.down_proj.weight": state["deepspeed_experts.0.down_proj.weight"]})
    with pytest.raises(RuntimeError, match="deepspeed_experts.4.down_proj.weight"):
        twin.load_state_dict(extra)


@pytest.mark.parametrize("mode", ["capacity", "dropless"])
def test_moe_layer_builds_stacked_experts_from_a_glu_expert_and_equals_per_expert_copies(mode):
    options = dict(num_experts=L, k=2, dispatch_backend="torch")
    if mode == "dropless":
        options.update(capacity_mode="tutel", capacity_factor=0.0, eval_capacity_factor=0.0, min_capacity=0,
                       drop_tokens=False)
    torch.manual_seed(0)
    stacked = MoE(M, GLUExpert(M, H, ChunkedGLU(nn.SiLU())), **options)
    plain = MoE(M, PerExpertGLU(M, H, ChunkedGLU(nn.SiLU())), **options)
    assert isinstance(stacked.deepspeed_moe.experts, StackedGLUExperts)
    assert not isinstance(plain.deepspeed_moe.experts, StackedGLUExperts)
    with torch.no_grad():  # distinct experts, so that a routing difference shows
        for p in stacked.deepspeed_moe.experts.parameters():
            p.normal_()
    plain.load_state_dict(stacked.state_dict())
    x_SM = torch.randn(12, M)
    a, b = x_SM.clone().requires_grad_(True), x_SM.clone().requires_grad_(True)
    torch.manual_seed(1)  # the same draws for DeepSpeed's random routing choices
    y_s = stacked(a)[0]
    torch.manual_seed(1)
    y_p = plain(b)[0]
    assert torch.equal(stacked.deepspeed_moe.exp_counts, plain.deepspeed_moe.exp_counts)
    torch.testing.assert_close(y_s, y_p)
    y_s.square().sum().backward()
    y_p.square().sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    _assert_same_grads(stacked.deepspeed_moe.experts, plain.deepspeed_moe.experts)


@pytest.mark.skipif(not HAS_KERNEL, reason="triton_kernels/grouped_gemm.py is not there yet")
@pytest.mark.parametrize("glu, bias", [("swiglu", False), ("clamped", True)])
def test_forward_rows_through_the_triton_kernel_equals_one_module_per_expert(glu, bias):
    """Under Triton's interpreter: the registered grouped GEMM on the stacked weights' views, forward and
    backward, against the per-expert modules (GPT-OSS's biased, interleaved form included)."""
    import importlib

    load_interpreted()
    importlib.import_module("triton_kernels.grouped_gemm")
    assert kernels.provider_loaded("triton")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        stacked, plain = _pair(glu, bias)
        counts = [3, 0, 2, 1]
        J = sum(counts)
        x_NM = torch.randn(J + 3, M)
        offsets_L1 = torch.tensor([0] + counts).cumsum(0)
        assert kernels.lookup("triton", "grouped_linear", x_NM, offsets_L1, *stacked.gate_up_proj.unbind())
        xs, xp = x_NM.clone().requires_grad_(True), x_NM.clone().requires_grad_(True)
        out_NM = stacked.forward_rows(xs, offsets_L1, "triton")
        want_JM = torch.cat(plain.forward_grouped(torch.split(xp[:J], counts)))
        torch.testing.assert_close(out_NM[:J], want_JM, atol=1e-5, rtol=1e-5)
        dy_JM = torch.randn(J, M)
        out_NM[:J].backward(dy_JM)
        want_JM.backward(dy_JM)
        torch.testing.assert_close(xs.grad[:J], xp.grad[:J], atol=1e-5, rtol=1e-5)
        for l, expert in enumerate(plain.deepspeed_experts):
            for name, p in expert.named_parameters():
                torch.testing.assert_close(stacked.get_parameter(name).grad[l], p.grad, atol=1e-5, rtol=1e-5)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
