"""Granite-MoE and Granite-MoE-Shared in ds_tutel.hf, beyond the exactness tests every type gets (their CASES
in tests/test_hf_convert.py: logits, loss, every gradient, eval and generate, strict export): the block's
router and experts reach the right ds_tutel parts, the shared MLP stays in the decoder layer, a converted
block computes the HF block's output and input gradient, those checks fail where the routing rule or the expert
layout were read wrongly, and the model's router-logit output behaves as the unconverted model's.

Granite's block (`block_sparse_moe`, GraniteMoeMoE): router GraniteMoeTopKRouter, a weight [E, M] without a bias,
top-k of the fp32 logits then softmax over the k ("topk_softmax"); experts GraniteMoeExperts, gate_up_proj
[E, 2I, M] (gate rows first) and down_proj [E, M, I], silu(gate) * up ("swiglu"). The decoder layer scales the
block's output by residual_multiplier and adds GraniteMoeShared's shared_mlp itself.

Shape legend: B batch, T sequence length, V vocabulary, M model dim, E experts, I expert intermediate dim.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ds_tutel.hf as hf  # noqa: E402
from ds_tutel.hf.layouts import ChunkedGLU  # noqa: E402
from ds_tutel.stacked_experts import StackedGLUExperts  # noqa: E402

from test_hf_convert import ATOL, B, CASES, T, VOCAB, max_diff, tiny_model  # noqa: E402
from test_hf_convert import _quiet_single_threaded  # noqa: E402,F401 (the module's autouse fixture)

GRANITE_CASES = ("granitemoe", "granitemoeshared")


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _models(case: str):
    model_type, overrides = CASES[case]
    original = tiny_model(model_type, **overrides)
    return original, hf.convert(copy.deepcopy(original))


def test_granite_types_are_supported():
    assert set(GRANITE_CASES) <= set(hf.SUPPORTED_MODEL_TYPES)
    assert set(GRANITE_CASES) <= set(CASES)  # so the exactness tests of test_hf_convert.py cover them


@pytest.mark.parametrize("case", GRANITE_CASES)
def test_router_and_experts_reach_the_layer(case):
    """The block at `block_sparse_moe` becomes an HFMoEBlock: rule topk_softmax, no router bias, no selection
    bias, the router weight as the gate's `wg.weight` (the stand-in router shows the same tensor, with top_k and
    num_experts), one fused SwiGLU expert per HF expert holding exactly its slices of gate_up_proj and down_proj.
    GraniteMoeShared's shared_mlp stays the decoder layer's HF module, a dense parameter owner."""
    original, converted = _models(case)
    blocks = hf.converted_blocks(converted)
    assert [name for name, _ in blocks] == ["model.layers.0.block_sparse_moe", "model.layers.1.block_sparse_moe"]
    for (name, block), layer in zip(blocks, converted.model.layers):
        hf_block = original.get_submodule(name)
        gate = block.moe_gate
        opts = gate.options
        assert (opts.routing_rule, opts.router_bias, opts.expert_bias, opts.capacity_mode) == (
            "topk_softmax", False, False, "tutel")
        assert [n for n, _ in gate.named_parameters()] == ["wg.weight"] and not hasattr(gate, "selection_bias")
        assert gate.k == hf_block.router.top_k == 2 and block.moe.num_experts == hf_block.router.num_experts == 8
        assert torch.equal(block.router_weight, hf_block.router.weight)
        router = block.router_logits
        assert isinstance(router, type(hf_block.router)) and router.weight is block.router_weight
        assert (router.top_k, router.num_experts) == (2, 8)
        experts = block.local_experts()
        assert isinstance(experts, StackedGLUExperts) and isinstance(experts.glu, ChunkedGLU)
        assert experts.num_local_experts == 8 and experts.gate_up_proj.bias is None
        assert torch.equal(experts.gate_up_proj.weight, hf_block.experts.gate_up_proj)  # [E, 2I, M], gate rows first
        assert torch.equal(experts.down_proj.weight, hf_block.experts.down_proj)
        assert layer.residual_multiplier == CASES[case][1]["residual_multiplier"]  # applied by the layer
        if case == "granitemoeshared":
            assert type(layer.shared_mlp).__name__ == "GraniteMoeSharedMLP"
            assert not any("shared" in n for n, _ in block.named_modules())
            assert all(not hasattr(p, "allreduce") for p in layer.shared_mlp.parameters())  # dense


@pytest.mark.parametrize("case", GRANITE_CASES)
def test_converted_block_is_the_hf_block(case):
    """One block alone, on inputs [B, T, M] of the scale the model feeds it: the same output and input gradient
    as the HF block (the decoder layer's residual_multiplier and shared MLP are outside both), the same router
    and expert gradients in the HF layout."""
    original, converted = _models(case)
    name, block = hf.converted_blocks(converted)[0]
    hf_block = original.get_submodule(name)
    x_BTM = torch.randn(B, T, 64, generator=torch.Generator().manual_seed(3))
    w_BTM = torch.randn(B, T, 64, generator=torch.Generator().manual_seed(4))
    outs = []
    for module in (hf_block, block):
        x = x_BTM.clone().requires_grad_(True)
        y_BTM = module(x)
        (y_BTM * w_BTM).sum().backward()
        outs.append((y_BTM.detach(), x.grad))
    (ref_y, ref_dx), (got_y, got_dx) = outs
    assert got_y.shape == ref_y.shape and max_diff(ref_y, got_y) < ATOL
    assert max_diff(ref_dx, got_dx) < ATOL
    grads = block.hf_tensors(lambda p: p.grad)
    assert sorted(grads) == sorted(n for n, _ in hf_block.named_parameters())
    for n, param in hf_block.named_parameters():
        assert param.grad.abs().max() > 0 and max_diff(param.grad, grads[n]) < ATOL, n


def _logits(model, ids_BT: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids_BT).logits


def test_a_wrong_rule_or_layout_would_fail_the_checks():
    """The tiny models tell the routing and layout apart: the converted model's logits move by far more than the
    tests' tolerance with the softmax top-k rule unnormalised, with gate and up swapped in every expert, or with
    the router weight's expert order reversed. Softmax top-k renormalised is topk_softmax by another road (equal
    gates up to rounding, same choices but for ties of the rounded probabilities): it agrees, and topk_softmax is
    kept as the rule the model itself computes."""
    case = "granitemoeshared"
    original, converted = _models(case)
    ids_BT = _ids()
    ref_BTV = _logits(original, ids_BT)
    assert max_diff(ref_BTV, _logits(converted, ids_BT)) < ATOL
    blocks = [block for _, block in hf.converted_blocks(converted)]

    def perturbed(change) -> float:
        twin = copy.deepcopy(converted)
        for block in (b for _, b in hf.converted_blocks(twin)):
            change(block)
        return max_diff(ref_BTV, _logits(twin, ids_BT))

    def rule(name: str, normalize: bool):
        def change(block):
            gate = block.moe_gate
            gate.configure(dataclasses.replace(gate.options, routing_rule=name, normalize_gate=normalize))
        return change

    @torch.no_grad()
    def swap_gate_up(block):
        gate_up_E2IM = block.local_experts().gate_up_proj.weight
        gate_EIM, up_EIM = gate_up_E2IM.chunk(2, dim=1)
        gate_up_E2IM.copy_(torch.cat([up_EIM, gate_EIM], dim=1))

    @torch.no_grad()
    def reverse_experts(block):
        block.router_weight.copy_(block.router_weight.flip(0))

    assert perturbed(rule("softmax_topk", False)) > 100 * ATOL
    assert perturbed(swap_gate_up) > 100 * ATOL
    assert perturbed(reverse_experts) > 100 * ATOL
    assert perturbed(rule("softmax_topk", True)) < ATOL
    assert all(b.moe_gate.options.routing_rule == "topk_softmax" for b in blocks)  # the twins' changes stay there


def test_shared_mlp_counts():
    """GraniteMoeShared's shared_mlp takes part (zeroing its output projection moves the logits), so the
    exactness tests check that the conversion leaves it in the path."""
    original, converted = _models("granitemoeshared")
    ids_BT = _ids()
    before_BTV = _logits(converted, ids_BT)
    with torch.no_grad():
        for layer in converted.model.layers:
            layer.shared_mlp.output_linear.weight.zero_()
    assert max_diff(before_BTV, _logits(converted, ids_BT)) > 100 * ATOL


@pytest.mark.parametrize("case", GRANITE_CASES)
def test_router_logit_output_behaves_as_the_unconverted_model(case):
    """transformers 5.15's Granite-MoE records no router logits (router_logits None, aux_loss 0 without labels; with
    labels its forward fails on the int aux loss): the converted model does the same, and would record the same
    logits where a later release records them."""
    original, converted = _models(case)
    ids_BT = _ids()
    with torch.no_grad():
        ref = original(input_ids=ids_BT, output_router_logits=True)
        got = converted(input_ids=ids_BT, output_router_logits=True)
    assert max_diff(ref.logits, got.logits) < ATOL
    assert (ref.router_logits is None) == (got.router_logits is None)
    if ref.router_logits is None:
        assert ref.aux_loss == got.aux_loss == 0
    else:
        assert abs(float(ref.aux_loss) - float(got.aux_loss)) < ATOL
        for ref_SE, got_SE in zip(ref.router_logits, got.router_logits):
            assert max_diff(ref_SE, got_SE) < ATOL
    outcomes = []
    for model in (original, converted):
        try:
            with torch.no_grad():
                outcomes.append(model(input_ids=ids_BT, labels=ids_BT, output_router_logits=True).loss.item())
        except Exception as e:  # transformers 5.15: AttributeError: 'int' object has no attribute 'to'
            outcomes.append(type(e))
    if isinstance(outcomes[0], float):
        assert isinstance(outcomes[1], float) and abs(outcomes[0] - outcomes[1]) < ATOL
    else:
        assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("case", GRANITE_CASES)
def test_bf16_model_agrees_to_bf16_rounding(case):
    """In bf16 the HF router rounds its softmax gates to bf16 (`type_as(hidden_states)`) where ds_tutel keeps them
    fp32: the converted model is as close to the fp32 model as the bf16 HF model is."""
    model_type, overrides = CASES[case]
    reference = tiny_model(model_type, **overrides)
    original = copy.deepcopy(reference).to(torch.bfloat16)
    converted = hf.convert(copy.deepcopy(original))
    ids_BT = _ids()
    fp32_BTV = _logits(reference, ids_BT)
    hf_error = max_diff(_logits(original, ids_BT).float(), fp32_BTV)
    ours_BTV = _logits(converted, ids_BT)
    assert ours_BTV.dtype == torch.bfloat16
    assert max_diff(ours_BTV.float(), fp32_BTV) <= 2 * hf_error + 1e-2
