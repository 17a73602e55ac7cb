"""A converted transformers model through the real DeepSpeed engine (1 gloo rank, ZeRO 1 with SGD and ZeRO 2 with
AdamW): the engine groups the expert parameters, and its losses follow the unconverted model trained by a plain
torch loop step for step; in bf16 (ZeRO 2) they follow the unconverted model's own bf16 engine (gradient clipping off on both sides: DeepSpeed 0.19 clips at 1.0 by default). Under ZeRO
stage 3 DeepSpeed refuses the converted model (it refuses every deepspeed.moe.layer.MoE there).

Shape legend: B batch, T sequence length.
"""
from __future__ import annotations

import copy

import pytest
import torch

from ds_tutel.ranks import run_ranks

pytest.importorskip("transformers")

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

STEPS = 3
VOCAB = 128


def _tiny_qwen3_moe():
    import transformers
    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.for_model(
        "qwen3_moe", vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def _losses(rank: int, world_size: int, stage: int, optimizer: str):
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    import ds_tutel.hf as hf
    original = _tiny_qwen3_moe()
    converted = hf.convert(copy.deepcopy(original))
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(converted.parameters()), "name": "parameters"})
    expert_group = [g for g in groups if g.get("moe")]
    assert len(expert_group) == 1 and expert_group[0]["name"] == "ep_size_1"
    expert_params = {id(p) for _, b in hf.converted_blocks(converted) for p in b.moe.deepspeed_moe.experts.parameters()}
    assert {id(p) for p in expert_group[0]["params"]} == expert_params
    engine, reference = engine_and_reference(converted, groups, original, optimizer, stage, micro_batch=2)
    ours, theirs = [], []
    for step in range(STEPS):
        ids_BT = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(step))
        loss = engine(input_ids=ids_BT, labels=ids_BT, output_router_logits=True).loss
        engine.backward(loss)
        engine.step()
        ref_loss = original(input_ids=ids_BT, labels=ids_BT, output_router_logits=True).loss
        reference.zero_grad()
        ref_loss.backward()
        reference.step()
        ours.append(loss.item())
        theirs.append(ref_loss.item())
    return ours, theirs


CASES = [(1, "SGD"), (2, "AdamW")]


def _zero3_refusal(rank: int, world_size: int) -> str:
    """What deepspeed.initialize says to a converted model under ZeRO stage 3 (docs/HF.md, "ZeRO-3")."""
    import deepspeed

    import ds_tutel.hf as hf
    converted = hf.convert(_tiny_qwen3_moe())
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    try:
        deepspeed.initialize(model=converted, model_parameters=converted.parameters(), config=config)
    except AssertionError as e:
        return str(e)
    return "accepted"


def _bf16_losses(rank: int, world_size: int):
    """The converted and the unconverted model, each through a bf16 engine (ZeRO 2, AdamW): losses per step,
    and the dtype of the converted experts' weights in the engine."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    import ds_tutel.hf as hf
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0, "bf16": {"enabled": True},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 6,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": 2, "reduce_bucket_size": 1 << 20, "allgather_bucket_size": 1 << 20}}
    original = _tiny_qwen3_moe()
    converted = hf.convert(copy.deepcopy(original))
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(converted.parameters()), "name": "parameters"})
    ours = deepspeed.initialize(model=converted, model_parameters=groups, config=config)[0]
    theirs = deepspeed.initialize(model=original, model_parameters=list(original.parameters()), config=config)[0]
    losses = {"ours": [], "theirs": []}
    for step in range(STEPS + 2):
        ids_BT = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(step))
        for name, engine in (("ours", ours), ("theirs", theirs)):
            loss = engine(input_ids=ids_BT, labels=ids_BT, output_router_logits=True).loss
            engine.backward(loss)
            engine.step()
            losses[name].append(loss.item())
    expert_dtype = hf.converted_blocks(ours.module)[0][1].local_experts().gate_up_proj.weight.dtype
    return losses, expert_dtype


def _all_losses(rank: int, world_size: int):
    """Every case in one spawned rank: its start-up (DeepSpeed, transformers) is most of the time."""
    losses = [_losses(rank, world_size, stage, optimizer) for stage, optimizer in CASES]
    return losses, _bf16_losses(rank, world_size), _zero3_refusal(rank, world_size)


def test_engine_steps_follow_the_unconverted_model():
    [(results, (bf16, expert_dtype), zero3)] = run_ranks(_all_losses, 1, timeout=300)
    for (stage, optimizer), (ours, theirs) in zip(CASES, results):
        assert ours == pytest.approx(theirs, abs=1e-5), (stage, optimizer)
    # bf16 through DeepSpeed's bf16 engine on both sides: the same losses to bf16 rounding (the experts' outputs
    # are combined in fp32 here, in bf16 by the HF block), falling alike.
    assert expert_dtype == torch.bfloat16
    assert bf16["ours"] == pytest.approx(bf16["theirs"], abs=2e-2), bf16
    assert bf16["ours"][-1] < bf16["ours"][0] and bf16["theirs"][-1] < bf16["theirs"][0], bf16
    # DeepSpeed 0.19 refuses every deepspeed.moe.layer.MoE (ds_tutel.MoE is one) under ZeRO-3; when a release
    # accepts it, this fails, and docs/HF.md's ZeRO-3 section needs revisiting.
    assert "Native DeepSpeed MoE is not supported with ZeRO Stage 3" in zero3, zero3


def engine_and_reference(converted, groups, original, optimizer: str, stage: int, micro_batch: int):
    """DeepSpeed's engine over the converted model and a plain torch optimizer over the original one, with the
    same hyperparameters (gradient clipping off: DeepSpeed clips at 1.0 by default)."""
    import deepspeed
    params = {"lr": 0.5} if optimizer == "SGD" else {"lr": 1e-3, "torch_adam": True}
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_clipping": 0.0,
              "zero_allow_untested_optimizer": True, "optimizer": {"type": optimizer, "params": params},
              "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 6}
    engine, *_ = deepspeed.initialize(model=converted, model_parameters=groups, config=config)
    reference = (torch.optim.SGD(original.parameters(), lr=0.5) if optimizer == "SGD"
                 else torch.optim.AdamW(original.parameters(), lr=1e-3))
    return engine, reference
