"""ds_tutel.hf.convert on tiny random-weight transformers models (the real config and model classes, nothing
downloaded): the converted model gives the original's logits, loss, router-logit aux loss (where the model has
one) and gradients of every parameter within fp32 rounding, and its export loads strictly into the unconverted
class with the same logits. Biases and DeepSeek-V3's correction bias, zero at initialisation, are drawn at random
so that they count; GPT-OSS's clamp limit is lowered in one layer so that its clamps bind.

Shape legend: B batch, T sequence length, V vocabulary.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import subprocess
import sys
import types
from typing import Dict, Tuple

import pytest
import torch

transformers = pytest.importorskip("transformers")

import deepspeed.moe.layer as ds_layer  # noqa: E402

import ds_tutel.hf as hf  # noqa: E402
import ds_tutel.hf.block as block_module  # noqa: E402
from ds_tutel.stacked_experts import StackedGLUExperts  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-5
VOCAB, B, T = 128, 2, 16

# DeepSeek-V3's attention (multi-head latent attention), tiny.
MLA = dict(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
# GPT-OSS's clamp limit (7.0 in the model) in its last layer: tiny random activations cross this one.
GPT_OSS_LIMIT = 0.1
# Granite's multipliers (1.0 by default), in the range of the released Granite-3.0 MoE configs: the decoder layer
# scales the block's output by residual_multiplier outside the block, which must stay so. Weights drawn with
# std 0.1 (0.02 by default): with the small multipliers the experts' share of the logits would otherwise be near
# the tolerance (gate and up swapped moved them by only 4e-5; here by 2e-2, tests/test_hf_granite.py).
GRANITE = dict(num_local_experts=8, embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=6.0,
               attention_multiplier=0.0625, initializer_range=0.1)

# Tiny configs: 2 layers, hidden 64, 8 experts, top-2, model-specific knobs where the routing depends on them.
CASES: Dict[str, Tuple[str, dict]] = {
    "qwen3_moe": ("qwen3_moe", dict(num_experts=8, moe_intermediate_size=32, norm_topk_prob=False)),
    "qwen3_moe-norm": ("qwen3_moe", dict(num_experts=8, moe_intermediate_size=32, norm_topk_prob=True,
                                         num_experts_per_tok=3)),
    "mixtral": ("mixtral", dict(num_local_experts=8)),
    "mixtral-jitter": ("mixtral", dict(num_local_experts=4, router_jitter_noise=0.1)),
    "olmoe": ("olmoe", dict(num_experts=8, norm_topk_prob=False)),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                    norm_topk_prob=False)),
    # A dense MLP in layer 0 (mlp_only_layers): only the sparse block is converted.
    "qwen2_moe-mixed": ("qwen2_moe", dict(num_experts=4, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=48, norm_topk_prob=True,
                                          mlp_only_layers=[0])),
    # 4 groups of 2 experts, the best 2 groups, scaled gates; layer 0 dense (first_k_dense_replace).
    "deepseek_v3": ("deepseek_v3", dict(**MLA, n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1,
                                        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                                        first_k_dense_replace=1)),
    "deepseek_v3-flat": ("deepseek_v3", dict(**MLA, n_routed_experts=8, moe_intermediate_size=32,
                                             n_shared_experts=2, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                                             norm_topk_prob=False, first_k_dense_replace=0, num_experts_per_tok=3)),
    "glm4_moe": ("glm4_moe", dict(n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1, n_group=2,
                                  topk_group=1, routed_scaling_factor=1.5, first_k_dense_replace=1)),
    "gpt_oss": ("gpt_oss", dict(num_local_experts=8, head_dim=16)),
    "granitemoe": ("granitemoe", GRANITE),
    # The dense shared_mlp (in the decoder layer, beside the block) is off unless its size is set.
    "granitemoeshared": ("granitemoeshared", dict(GRANITE, shared_intermediate_size=48)),
    # Phi-MoE samples its picks in training among the experts within a margin of the best: a wide margin (0.01 by
    # default) leaves several to sample from here. With input jitter, drawn by the block and again by its router.
    "phimoe": ("phimoe", dict(num_local_experts=8, router_jitter_noise=0.5)),
    "phimoe-jitter": ("phimoe", dict(num_local_experts=4, input_jitter_noise=0.1, router_jitter_noise=0.3)),
}


def tiny_config(model_type: str, **overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    fields.update(overrides)
    return transformers.AutoConfig.for_model(model_type, **fields)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return exercised(transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)))


@torch.no_grad()
def exercised(model):
    """The model with what its initialisation leaves inert made to count: MoE biases (GPT-OSS's router and
    experts) and DeepSeek-V3's e_score_correction_bias drawn at random (from the global seed), GPT-OSS's clamp
    limit lowered in the last layer."""
    for name, param in model.named_parameters():
        if ".mlp." in name and name.endswith("bias"):
            param.normal_(0.0, 0.1)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.normal_(0.0, 0.05)
    gpt_oss_experts = [m for m in model.modules() if type(m).__name__ == "GptOssExperts"]
    if gpt_oss_experts:
        gpt_oss_experts[-1].limit = GPT_OSS_LIMIT
    return model


def moe_layer_count(model_type: str, overrides: dict) -> int:
    """How many of the 2 tiny layers hold a sparse-MoE block."""
    return 2 - len(overrides.get("mlp_only_layers", [])) - overrides.get("first_k_dense_replace", 0)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", autouse=True)
def _quiet_single_threaded():
    """Tiny matrices: one thread is fastest, and steady where other processes load the cores."""
    level, threads = transformers.logging.get_verbosity(), torch.get_num_threads()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity(level)


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request):
    """(case, original, converted deep copy, input ids [B, T]): the two models start from the same weights."""
    model_type, overrides = CASES[request.param]
    original = tiny_model(model_type, **overrides)
    converted = hf.convert(copy.deepcopy(original))
    ids_BT = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    return request.param, original, converted, ids_BT


# Granite-MoE records no router logits in transformers 5.15 (its _can_record_outputs has no "router_logits"), and
# its forward with labels and output_router_logits=True fails in the model itself (`0.to(...)` on the int aux loss
# it gets from no logits): these models are run without output_router_logits (tests/test_hf_granite.py checks
# that the converted model behaves as the unconverted one there).
NO_ROUTER_LOGITS = ("granitemoe", "granitemoeshared")
# DeepSeek-V3 and GLM-4-MoE have no router-logit aux loss (they balance through the correction bias); nor has
# Granite-MoE here.
NO_AUX_LOSS = ("deepseek_v3", "glm4_moe") + NO_ROUTER_LOGITS


def run(model, ids_BT: torch.Tensor, seed: int = 2):
    """Forward with labels and router logits (where the model records them), then backward of the loss (aux loss
    included)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # Mixtral's jitter draws the same numbers in both models
    out = model(input_ids=ids_BT, labels=ids_BT,
                output_router_logits=model.config.model_type not in NO_ROUTER_LOGITS)
    out.loss.backward()
    return out


def test_logits_loss_aux_and_grads_match(pair):
    case, original, converted, ids_BT = pair
    ref, got = run(original, ids_BT), run(converted, ids_BT)
    assert max_diff(ref.logits, got.logits) < ATOL, case                        # [B, T, V]
    assert abs(ref.loss.item() - got.loss.item()) < ATOL, case
    if CASES[case][0] in NO_AUX_LOSS:
        assert getattr(got, "aux_loss", None) is None and getattr(ref, "aux_loss", None) is None
    else:
        assert ref.aux_loss is not None and got.aux_loss is not None
        assert abs(ref.aux_loss.item() - got.aux_loss.item()) < ATOL, case
        assert len(got.router_logits) == len(ref.router_logits) == moe_layer_count(*CASES[case])
        for ref_SE, got_SE in zip(ref.router_logits, got.router_logits):
            assert got_SE.shape == ref_SE.shape and max_diff(ref_SE, got_SE) < ATOL
    grads = hf.export_grads(converted)
    names = [name for name, _ in original.named_parameters()]
    assert list(grads) == names
    for name, param in original.named_parameters():
        assert param.grad is not None and grads[name] is not None, name
        assert grads[name].shape == param.grad.shape, name
        assert max_diff(param.grad, grads[name]) < ATOL, (case, name)


def test_eval_mode_and_generate_match(pair):
    case, original, converted, ids_BT = pair
    original.eval(), converted.eval()
    try:
        with torch.no_grad():
            assert max_diff(original(input_ids=ids_BT).logits, converted(input_ids=ids_BT).logits) < ATOL
            kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert torch.equal(original.generate(ids_BT[:, :6], **kw), converted.generate(ids_BT[:, :6], **kw))
    finally:
        original.train(), converted.train()


def test_export_loads_strictly_with_same_logits(pair):
    case, original, converted, ids_BT = pair
    model_type, overrides = CASES[case]
    fresh = tiny_model(model_type, seed=123, **overrides)
    state = hf.export_state_dict(converted)
    assert list(state) == list(original.state_dict())
    fresh.load_state_dict(state, strict=True)
    fresh.eval(), converted.eval()
    try:
        with torch.no_grad():
            assert max_diff(fresh(input_ids=ids_BT).logits, converted(input_ids=ids_BT).logits) < ATOL
    finally:
        converted.train()


def test_converted_blocks_are_deepspeed_moe_layers(pair):
    case, original, converted, _ = pair
    blocks = hf.converted_blocks(converted)
    model_type, overrides = CASES[case]
    assert len(blocks) == moe_layer_count(model_type, overrides)
    for _, block in blocks:
        assert isinstance(block.moe, ds_layer.MoE)
        experts = list(block.moe.deepspeed_moe.experts.parameters())
        assert experts and all(p.allreduce is False and p.group_name == "ep_size_1" for p in experts)
        assert not hasattr(block.router_weight, "allreduce")  # the router is a dense (data-parallel) parameter
        assert block.router_logits.weight is block.router_weight
    names = [name for name, _ in converted.named_parameters()]
    assert f"{blocks[0][0]}.moe.deepspeed_moe.gate.wg.weight" in names
    # The experts stacked: 2 parameter tensors per block (4 with GPT-OSS's biases), whatever the expert count,
    # while the state dict keeps DeepSpeed's per-expert entries (its per-expert checkpoint files key on them).
    local = blocks[0][1].local_experts()
    assert isinstance(local, StackedGLUExperts) and local.num_local_experts == len(local.gate_up_proj.weight)
    stacked = {"gate_up_proj.weight", "down_proj.weight"} | (
        {"gate_up_proj.bias", "down_proj.bias"} if model_type == "gpt_oss" else set())
    prefix = f"{blocks[0][0]}.moe.deepspeed_moe.experts."
    assert {name[len(prefix):] for name in names if name.startswith(prefix)} == stacked
    keys = [key for key in converted.state_dict() if key.startswith(prefix)]
    assert sorted(keys) == sorted(f"{prefix}deepspeed_experts.{l}.{name}" for l in range(local.num_local_experts)
                                  for name in stacked)


def test_recorded_router_logits_are_the_gates_without_a_second_matmul(monkeypatch):
    """While the model records router logits (its aux loss), the block hands the recorder the logits the gate
    routed with: no linear map of the router weight runs in the block (fp32), and the aux loss and router
    gradient are still the original's. With gate input noise in training the block computes them itself."""
    original = tiny_model("qwen3_moe", num_experts=4, moe_intermediate_size=16)
    converted = hf.convert(copy.deepcopy(original))
    router_maps = []

    def counting(x, weight, bias=None):
        router_maps.append(x.shape)
        return torch.nn.functional.linear(x, weight, bias)

    monkeypatch.setattr(block_module, "F", types.SimpleNamespace(linear=counting))  # the block's router map
    ids_BT = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    ref, got = run(original, ids_BT), run(converted, ids_BT)
    assert router_maps == []
    assert len(got.router_logits) == 2 and abs(ref.aux_loss.item() - got.aux_loss.item()) < ATOL
    grads = hf.export_grads(converted)
    for name, param in original.named_parameters():
        if name.endswith("mlp.gate.weight"):
            assert max_diff(param.grad, grads[name]) < ATOL, name
    for _, block in hf.converted_blocks(converted):
        block.moe_gate.options = dataclasses.replace(block.moe_gate.options, input_jitter=0.01)
    run(converted, ids_BT)
    assert len(router_maps) == 2


def test_hooks_installed_before_conversion_still_record():
    """A recorded forward before convert installs transformers' hooks on the HF routers: they move over."""
    original = tiny_model("olmoe", num_experts=4)
    ids_BT = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = original(input_ids=ids_BT, output_router_logits=True)
        got = hf.convert(copy.deepcopy(original))(input_ids=ids_BT, output_router_logits=True)
    assert len(got.router_logits) == 2
    assert abs(ref.aux_loss.item() - got.aux_loss.item()) < ATOL


def test_deepcopy_of_converted_model_keeps_its_own_router():
    converted = hf.convert(tiny_model("qwen3_moe", num_experts=4, moe_intermediate_size=16))
    twin = copy.deepcopy(converted)
    for (_, a), (_, b) in zip(hf.converted_blocks(converted), hf.converted_blocks(twin)):
        assert b.router_logits.weight is b.router_weight and b.router_weight is not a.router_weight


def test_converted_model_pickles():
    """torch.save of a whole converted model (its router stand-in's class is made at run time) loads back."""
    converted = hf.convert(tiny_model("qwen2_moe", num_experts=4, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=16))
    twin = pickle.loads(pickle.dumps(converted))
    ids_BT = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(converted(input_ids=ids_BT).logits, twin(input_ids=ids_BT).logits)
        assert len(twin(input_ids=ids_BT, output_router_logits=True).router_logits) == 2
    for _, block in hf.converted_blocks(twin):
        assert block.router_logits.weight is block.router_weight


def test_options_reach_the_layer_and_fixed_ones_are_refused():
    model = hf.convert(tiny_model("mixtral", num_local_experts=4), capacity_factor=1.0, dispatch_backend="torch")
    gate = hf.converted_blocks(model)[0][1].moe.deepspeed_moe.gate
    assert gate.options.capacity_mode == "tutel" and gate.capacity_factor == 1.0 and gate.options.normalize_gate
    with pytest.raises(TypeError, match="num_experts"):
        hf.convert(tiny_model("mixtral", num_local_experts=4), num_experts=8)
    with pytest.raises(ValueError, match="ep_size"):
        hf.convert(tiny_model("mixtral", num_local_experts=4), ep_size=0)
    with pytest.raises(TypeError, match="routing_rule"):
        hf.convert(tiny_model("mixtral", num_local_experts=4), routing_rule="topk_softmax")


def test_routing_rules_and_biases_reach_the_gate():
    """DeepSeek-V3: the group-limited sigmoid rule with the model's settings, its correction bias a buffer of the
    gate (exported under the HF name); GPT-OSS: top-k then softmax, the router bias as `wg.bias`; the stand-in
    routers show the same tensors under the HF names."""
    model_type, overrides = CASES["deepseek_v3"]
    original = tiny_model(model_type, **overrides)
    converted = hf.convert(copy.deepcopy(original))
    (name, block), = hf.converted_blocks(converted)
    gate = block.moe.deepspeed_moe.gate
    opts = gate.options
    assert (opts.routing_rule, opts.n_group, opts.topk_group, opts.routed_scaling_factor, opts.normalize_gate) == (
        "sigmoid_group_topk", 4, 2, 2.5, True)
    hf_bias_E = original.get_submodule(name).gate.e_score_correction_bias
    assert hf_bias_E.abs().max() > 0 and torch.equal(gate.selection_bias, hf_bias_E)
    assert f"{name}.moe.deepspeed_moe.gate.selection_bias" in converted.state_dict()
    assert block.router_logits.e_score_correction_bias is gate.selection_bias
    assert torch.equal(hf.export_state_dict(converted)[f"{name}.gate.e_score_correction_bias"], hf_bias_E)
    assert not opts.expert_bias  # balancing updates are off unless asked for

    converted = hf.convert(tiny_model("gpt_oss", **CASES["gpt_oss"][1]))
    block = hf.converted_blocks(converted)[0][1]
    gate = block.moe.deepspeed_moe.gate
    assert gate.options.routing_rule == "topk_softmax" and block.router_logits.bias is gate.wg.bias
    assert [n for n, _ in gate.named_parameters()] == ["wg.weight", "wg.bias"]
    assert not hasattr(gate, "selection_bias")
    assert [n for n, _ in block.local_experts().named_parameters()] == [
        f"{p}_proj.{w}" for p in ("gate_up", "down") for w in ("weight", "bias")]


def test_gpt_oss_clamp_binds_in_the_tests():
    """The lowered clamp limit changes the model's output (so the exactness tests check the clamped branch), and
    a converted expert that ignored it would differ."""
    model_type, overrides = CASES["gpt_oss"]
    model = tiny_model(model_type, **overrides)
    converted = hf.convert(copy.deepcopy(model))
    ids_BT = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clamped_BTV = converted(input_ids=ids_BT).logits
        glu = hf.converted_blocks(converted)[-1][1].local_experts().glu
        assert glu.limit == GPT_OSS_LIMIT
        glu.limit = 7.0
        assert max_diff(converted(input_ids=ids_BT).logits, clamped_BTV) > 1e-3


@pytest.mark.parametrize("case", ["deepseek_v3", "glm4_moe"])
def test_aux_loss_free_balancing_moves_the_correction_bias(case):
    """convert(expert_bias=True): each training forward moves the correction bias by rate * sign(mean load -
    load); eval forwards leave it; the first forward still routes exactly as the model; the export carries it."""
    model_type, overrides = CASES[case]
    original = tiny_model(model_type, **overrides)
    rate = 0.01
    converted = hf.convert(copy.deepcopy(original), expert_bias=True, expert_bias_rate=rate)
    ids_BT = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    (name, block), = hf.converted_blocks(converted)
    gate = block.moe.deepspeed_moe.gate
    before_E = gate.selection_bias.clone()
    ref, got = run(original, ids_BT), run(converted, ids_BT)
    assert max_diff(ref.logits, got.logits) < ATOL
    load_E = block.moe.deepspeed_moe.exp_counts.float()
    assert load_E.sum() == B * T * overrides.get("num_experts_per_tok", 2)
    expected_E = before_E + rate * torch.sign(load_E.mean() - load_E)
    assert torch.equal(gate.selection_bias, expected_E) and not torch.equal(expected_E, before_E)
    converted.eval()
    with torch.no_grad():
        converted(input_ids=ids_BT)
    assert torch.equal(gate.selection_bias, expected_E)
    assert torch.equal(hf.export_state_dict(converted)[f"{name}.gate.e_score_correction_bias"], expected_E)


def test_balancing_off_by_default_leaves_the_bias():
    model_type, overrides = CASES["deepseek_v3"]
    converted = hf.convert(tiny_model(model_type, **overrides))
    gate = hf.converted_blocks(converted)[0][1].moe.deepspeed_moe.gate
    before_E = gate.selection_bias.clone()
    run(converted, torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(1)))
    assert torch.equal(gate.selection_bias, before_E)


def test_unsupported_model_type_names_the_supported_ones():
    model = torch.nn.Linear(2, 2)
    model.config = types.SimpleNamespace(model_type="jetmoe")
    with pytest.raises(hf.UnsupportedModelError) as err:
        hf.convert(model)
    for model_type in ("qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "glm4_moe", "gpt_oss",
                       "granitemoe", "granitemoeshared", "phimoe"):
        assert model_type in str(err.value)
    assert "jetmoe" in str(err.value)
    with pytest.raises(hf.UnsupportedModelError):
        hf.convert(torch.nn.Linear(2, 2))  # no config at all


def test_converting_twice_is_refused():
    model = hf.convert(tiny_model("olmoe", num_experts=4))
    with pytest.raises(ValueError, match="already converted"):
        hf.convert(model)


TRITON_SCRIPT = """
import copy, sys, torch
sys.path.insert(0, "tests")
import ds_tutel.hf as hf
from ds_tutel import kernels
from test_hf_convert import B, CASES, VOCAB, tiny_model
torch.set_num_threads(1)
worst = 0.0
for case in ("deepseek_v3", "gpt_oss"):
    model_type, overrides = CASES[case]
    original = tiny_model(model_type, **overrides)
    converted = hf.convert(copy.deepcopy(original), dispatch_backend="triton")
    assert kernels.provider_loaded("triton")
    ids_BT = torch.randint(3, VOCAB, (B, 8), generator=torch.Generator().manual_seed(1))
    logits = []
    for model in (original, converted):
        out = model(input_ids=ids_BT, labels=ids_BT)
        out.loss.backward()
        logits.append(out.logits)
    grads = hf.export_grads(converted)
    worst = max(worst, (logits[0] - logits[1]).abs().max().item(),
                max((p.grad - grads[n]).abs().max().item() for n, p in original.named_parameters()))
assert worst < 1e-5, worst
"""


def test_routing_rules_on_the_triton_backend():
    """dispatch_backend="triton" (Triton's interpreter here): the Triton gate computes only the default rule, so
    DeepSeek-V3's and GPT-OSS's rules place their choices with the torch slot assignment; the model stays exact."""
    pytest.importorskip("triton")
    env = dict(os.environ, DS_ACCELERATOR="cpu", TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-c", TRITON_SCRIPT], cwd=REPO, env=env, check=True, timeout=600)


def test_import_ds_tutel_does_not_import_transformers():
    code = ("import sys, ds_tutel, ds_tutel.hf; ds_tutel.MoE; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=120)


@pytest.mark.parametrize("case", ["qwen3_moe-norm", "qwen2_moe"])
def test_bf16_model_agrees_to_bf16_rounding(case):
    """In bf16 ds_tutel keeps router logits and gates in fp32 where HF rounds them: the converted model is as
    close to the fp32 model as the bf16 HF model is."""
    model_type, overrides = CASES[case]
    reference = tiny_model(model_type, **overrides)
    original = copy.deepcopy(reference).to(torch.bfloat16)
    converted = hf.convert(copy.deepcopy(original))
    ids_BT = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp32_BTV = reference(input_ids=ids_BT).logits
        hf_error = max_diff(original(input_ids=ids_BT).logits.float(), fp32_BTV)
        ours_BTV = converted(input_ids=ids_BT).logits
    assert ours_BTV.dtype == torch.bfloat16
    assert max_diff(ours_BTV.float(), fp32_BTV) <= 2 * hf_error + 1e-2


def test_bf16_recorded_router_logits_are_the_routers_to_one_rounding():
    """In bf16 the recorder gets the gate's fp32 logits rounded to bf16: the first layer's (same input in both
    models) are the HF router's bf16 logits to one bf16 rounding."""
    original = tiny_model("qwen3_moe", num_experts=8, moe_intermediate_size=32).to(torch.bfloat16)
    converted = hf.convert(copy.deepcopy(original))
    ids_BT = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_SE = original(input_ids=ids_BT, output_router_logits=True).router_logits[0]
        got_SE = converted(input_ids=ids_BT, output_router_logits=True).router_logits[0]
    assert got_SE.dtype == ref_SE.dtype == torch.bfloat16
    ulp_SE = torch.finfo(torch.bfloat16).eps * ref_SE.float().abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
    assert ((got_SE.float() - ref_SE.float()).abs() <= ulp_SE).all()


@pytest.mark.parametrize("case", ["qwen2_moe", "mixtral-jitter", "deepseek_v3", "gpt_oss"])
def test_gradient_checkpointing_matches(case):
    """With transformers' gradient checkpointing the converted block is recomputed in the backward (routing,
    Mixtral's jitter draw included) and gives the original's gradients."""
    model_type, overrides = CASES[case]
    original = tiny_model(model_type, **overrides)
    original.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    converted = hf.convert(copy.deepcopy(original))
    ids_BT = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    ref, got = run(original, ids_BT), run(converted, ids_BT)
    assert max_diff(ref.logits, got.logits) < ATOL
    grads = hf.export_grads(converted)
    for name, param in original.named_parameters():
        assert max_diff(param.grad, grads[name]) < ATOL, name
