"""Converted HF models through the DeepSpeed engine on 2 gloo ranks, configured from the JSON's "ds_tutel": {"hf"}
section: save_checkpoint / load_checkpoint resume with the losses of an uninterrupted run (ZeRO 1 and 2, ep_size 2
and 1); an interrupted save leaves the previous checkpoint loadable; a ZeRO 2 checkpoint saved at ep_size 2 loads
in full at ep_size 1 and the reverse (weights, optimizer state, LR scheduler, steps) and resumes with the losses of
the uninterrupted run, and on 1 rank with the saved Adam state exactly, also from optimizer groups at different
learning rates; module_only=True loads the weights alone; a ZeRO 0 checkpoint at another layout is refused naming
module_only; save_pretrained writes what from_pretrained of the unconverted class loads, with the same logits. The
config section's checks and the model check of a checkpoint run without ranks.

Shape legend: B batch, T sequence length, V vocabulary, P parameter elements (flattened).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

import pytest
import torch

from ds_tutel.ranks import run_ranks

pytest.importorskip("transformers")

VOCAB, B, T = 64, 2, 12
STEPS, SAVE_AT = 4, 2
CASES = [(1, 2), (2, 2), (1, 1), (2, 1)]  # (ZeRO stage, ep_size)
NO_DECAY_LR = 3e-3


# A tiny DeepSeek-V3: its correction bias is the gate's selection-bias buffer, moved in training by aux-loss-free
# balancing (the options in the config section).
DEEPSEEK = dict(model_type="deepseek_v3", n_routed_experts=4, n_shared_experts=1, n_group=2, topk_group=1,
                first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                v_head_dim=8, num_key_value_heads=4)
BALANCING = {"expert_bias": True, "expert_bias_rate": 0.01}


def _tiny(seed: int, model_type: str = "qwen3_moe", **fields: Any):
    import transformers
    transformers.logging.set_verbosity_error()
    values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                  norm_topk_prob=True, max_position_embeddings=32, tie_word_embeddings=False)
    config = transformers.AutoConfig.for_model(model_type, **{**values, **fields})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def _ds_config(stage: int, ep_size: int, **hf_options: Any) -> Dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": B, "gradient_clipping": 1.0, "steps_per_print": 10 ** 6,
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                         "warmup_num_steps": 3}},
            "ds_tutel": {"hf": {"ep_size": ep_size, "dispatch_backend": "torch", **hf_options}}}


def _engine(seed: int, stage: int, ep_size: int, two_lrs: bool = False, deepseek: bool = False):
    """A tiny Qwen3-MoE (or DeepSeek-V3 with balancing) converted from the config section, in DeepSpeed's engine
    (which reads the same JSON). two_lrs: no LR scheduler, and the vectors in a group of their own at lr
    NO_DECAY_LR without weight decay."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    import ds_tutel.hf as hf
    config = _ds_config(stage, ep_size, **(BALANCING if deepseek else {}))
    model = hf.convert_from_config(_tiny(seed, **(DEEPSEEK if deepseek else {})), config)
    assert hf.converted_blocks(model)[0][1].moe.ep_size == ep_size
    if two_lrs:
        config.pop("scheduler")
        groups = split_params_into_different_moe_groups_for_optimizer([
            {"params": [p for p in model.parameters() if p.dim() >= 2], "name": "decay"},
            {"params": [p for p in model.parameters() if p.dim() < 2], "name": "no_decay", "lr": NO_DECAY_LR,
             "weight_decay": 0.0}])
    else:
        groups = split_params_into_different_moe_groups_for_optimizer(
            {"params": list(model.parameters()), "name": "params"})
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    engine.train()  # from_config leaves the model in eval mode; balancing moves the bias in training only
    return engine


def _batch(step: int, rank: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(100 * step + rank))


def _step(engine, step: int, rank: int) -> float:
    ids_BT = _batch(step, rank)
    loss = engine(input_ids=ids_BT, labels=ids_BT, output_router_logits=True).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


@torch.no_grad()
def _logits(engine) -> torch.Tensor:
    """[B, T, V] logits in eval mode on one fixed batch (the same on every rank)."""
    engine.module.eval()
    logits_BTV = engine.module(input_ids=_batch(999, 0)).logits.clone()
    engine.module.train()
    return logits_BTV


def _interrupted_save(engine, ckpt: str) -> None:
    """A save that dies after writing part of its files: `latest` must keep naming the previous tag."""
    import ds_tutel.hf as hf
    real = engine.save_checkpoint

    def dies_half_way(save_dir, tag, **kwargs):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        raise KeyboardInterrupt("killed while saving")

    engine.save_checkpoint = dies_half_way
    try:
        hf.save_checkpoint(engine, ckpt)
    except KeyboardInterrupt:
        pass
    finally:
        engine.save_checkpoint = real


def _all_cases(rank: int, world_size: int, tmp: str) -> Dict[str, Any]:
    import torch.distributed as dist

    import ds_tutel.hf as hf
    from ds_tutel.train.checkpoint import CheckpointError, read_latest
    out: Dict[str, Any] = {"resume": {}, "ep_change": {}}
    saved_logits = {}
    for stage, ep_size in CASES:
        ckpt = os.path.join(tmp, f"zero{stage}-ep{ep_size}")
        first = _engine(0, stage, ep_size)
        losses: List[float] = []
        for step in range(1, STEPS + 1):
            losses.append(_step(first, step, rank))
            if step == SAVE_AT:
                hf.save_checkpoint(first, ckpt, client_state={"note": "mid-run"})
                saved_logits[(stage, ep_size)] = _logits(first)
        _interrupted_save(first, ckpt)
        assert read_latest(ckpt) == f"global_step{SAVE_AT}"

        second = _engine(1, stage, ep_size)  # other weights: everything must come from the checkpoint
        manifest = hf.load_checkpoint(second, ckpt)
        assert manifest["client"] == {"note": "mid-run"} and second.global_steps == SAVE_AT
        resumed = [_step(second, step, rank) for step in range(SAVE_AT + 1, STEPS + 1)]
        out["resume"][(stage, ep_size)] = (losses[SAVE_AT:], resumed, second.get_lr()[0] == first.get_lr()[0])

    # Expert-parallel size changed between save and load: everything loads (the optimizer state resharded) and
    # the run goes on with the uninterrupted run's losses.
    for saved_ep, load_ep in ((2, 1), (1, 2)):
        engine = _engine(1, 2, load_ep)
        first = out["resume"][(2, saved_ep)]
        hf.load_checkpoint(engine, os.path.join(tmp, f"zero2-ep{saved_ep}"))
        logits_diff = (_logits(engine) - saved_logits[(2, saved_ep)]).abs().max().item()
        steps = engine.global_steps
        resumed = [_step(engine, step, rank) for step in range(SAVE_AT + 1, STEPS + 1)]
        out["ep_change"][(saved_ep, load_ep)] = (logits_diff, steps, first[0], resumed)

    # DeepSeek-V3 with balancing: the moved correction bias (a gate buffer beside the experts) saves and loads with
    # the model, at the same and at another layout.
    engine = _engine(0, 1, 2, deepseek=True)
    _step(engine, 1, rank)  # (a second step's loads happen to move the bias back to 0 here)
    (_, block), = hf.converted_blocks(engine.module)
    saved_bias_E = block.moe_gate.selection_bias.clone()
    hf.save_checkpoint(engine, os.path.join(tmp, "deepseek"))
    deepseek_logits = _logits(engine)
    out["deepseek"] = {"bias_moved": saved_bias_E.abs().max().item()}
    for load_ep in (2, 1):
        engine = _engine(1, 1, load_ep, deepseek=True)
        hf.load_checkpoint(engine, os.path.join(tmp, "deepseek"))
        (_, block), = hf.converted_blocks(engine.module)
        out["deepseek"][load_ep] = ((block.moe_gate.selection_bias - saved_bias_E).abs().max().item(),
                                    (_logits(engine) - deepseek_logits).abs().max().item())

    # module_only=True: the weights alone, the optimizer untouched; a ZeRO 0 checkpoint (its optimizer state in
    # DeepSpeed's own per-rank files) is refused at another layout without it, on every rank before any collective.
    engine = _engine(1, 2, 1)
    zero0 = _engine(0, 0, 2)
    _step(zero0, 1, rank)
    hf.save_checkpoint(zero0, os.path.join(tmp, "zero0-ep2"))
    with pytest.raises(CheckpointError, match=r"ZeRO stage 0.*module_only=True"):
        hf.load_checkpoint(engine, os.path.join(tmp, "zero0-ep2"))
    hf.load_checkpoint(engine, os.path.join(tmp, "zero2-ep2"), module_only=True)
    out["module_only"] = ((_logits(engine) - saved_logits[(2, 2)]).abs().max().item(),
                          len(engine.optimizer.optimizer.state), engine.global_steps)

    # Optimizer groups at different learning rates, for the 1-rank load.
    engine = _engine(0, 2, 2, two_lrs=True)
    for step in range(1, SAVE_AT + 1):
        _step(engine, step, rank)
    hf.save_checkpoint(engine, os.path.join(tmp, "two-lrs"))

    # save_pretrained at ep_size 2 after training: from_pretrained of the unconverted class, same logits.
    engine = _engine(0, 2, 2)
    for step in (1, 2):
        _step(engine, step, rank)
    pretrained = os.path.join(tmp, "pretrained")
    hf.save_pretrained(engine.module, pretrained)
    if rank == 0:
        import transformers
        loaded = transformers.AutoModelForCausalLM.from_pretrained(pretrained).eval()
        assert type(loaded).__name__ == "Qwen3MoeForCausalLM"
        with torch.no_grad():
            out["pretrained"] = (loaded(input_ids=_batch(999, 0)).logits - _logits(engine)).abs().max().item()
        out["pretrained_files"] = sorted(os.listdir(pretrained))
    else:
        _logits(engine)
    dist.barrier()
    return out


pytestmark = pytest.mark.multirank


def _one_rank_loads(rank: int, world_size: int, tmp: str) -> Dict[str, Any]:
    """2-rank, ep_size 2 checkpoints loaded in full on 1 rank at ep_size 1: every parameter's fp32 master weights,
    exp_avg and exp_avg_sq as DeepSpeed gives them back against the saved ones by global name (max |difference|),
    the step, the learning rates, the LR scheduler and step counters; then a step."""
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    import ds_tutel.hf as hf
    from ds_tutel.train.optimizer_state import expert_names, read_engine_counters, read_full_states
    out: Dict[str, Any] = {}
    for name, two_lrs in (("zero2-ep2", False), ("two-lrs", True)):
        engine = _engine(1, 2, 1, two_lrs)
        inner = engine.optimizer.optimizer
        for group in inner.param_groups:
            group["lr"] = 0.5  # to be replaced by the saved learning rates
        ckpt = os.path.join(tmp, name)
        manifest = hf.load_checkpoint(engine, ckpt)
        tag_dir = os.path.join(ckpt, manifest["tag"])
        saved = {**read_full_states(tag_dir, manifest, one_lr=False), **read_engine_counters(tag_dir, manifest)}
        diffs, covered = {"fp32": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}, []
        for param_name, param in engine.module.named_parameters():
            names = expert_names(param_name, 0, 4) if is_moe_param(param) else [param_name]
            ours_P = {"fp32": safe_get_full_fp32_param(param).flatten(),
                      **{key: safe_get_full_optimizer_state(param, key).flatten() for key in ("exp_avg", "exp_avg_sq")}}
            for key, value_P in ours_P.items():
                saved_P = torch.cat([saved["params"][n][key] for n in names])
                diffs[key] = max(diffs[key], (value_P - saved_P).abs().max().item())
            covered.extend(names)
        out[name] = {
            "diffs": diffs, "all_covered": sorted(covered) == sorted(saved["params"]),
            "steps": {float(inner.state[flat]["step"]) for group in inner.param_groups for flat in group["params"]},
            "saved_step": float(saved["step"]),
            "lrs": sorted({(group["name"], group["lr"]) for group in inner.param_groups}),
            "saved_lrs": sorted(set(saved["lrs"].values())),
            "scheduler": (engine.lr_scheduler.state_dict() == saved["lr_scheduler"]) if not two_lrs else None,
            "counters": (engine.global_steps, engine.global_samples, saved["global_samples"]),
            "resumed": _step(engine, SAVE_AT + 1, 0), "steps_after": engine.global_steps}
    return out


def test_checkpoints_resume_reshard_and_save_pretrained_through_the_engine(tmp_path):
    results = run_ranks(_all_cases, 2, str(tmp_path), timeout=240)
    for rank, result in enumerate(results):
        for case, (uninterrupted, resumed, same_lr) in result["resume"].items():
            assert resumed == pytest.approx(uninterrupted, abs=1e-6), (rank, case)
            assert uninterrupted[0] != uninterrupted[1] and same_lr, (rank, case)
        for case, (logits_diff, steps, uninterrupted, resumed) in result["ep_change"].items():
            assert logits_diff < 1e-5 and steps == SAVE_AT, (rank, case, logits_diff, steps)
            assert resumed == pytest.approx(uninterrupted, abs=1e-5), (rank, case)  # fp32 rounding of the layouts
        deepseek = result["deepseek"]
        assert deepseek["bias_moved"] > 0 and deepseek[2] == (0.0, 0.0), deepseek
        assert deepseek[1][0] == 0.0 and deepseek[1][1] < 1e-5, deepseek
        logits_diff, optimizer_states, steps = result["module_only"]
        assert logits_diff < 1e-5 and optimizer_states == 0 and steps == 0, result["module_only"]
    assert results[0]["pretrained"] < 1e-5
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(results[0]["pretrained_files"])
    files = os.listdir(tmp_path / "zero2-ep2" / "global_step2")
    assert {f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in (0, 1) for e in range(4)} <= set(files)
    assert ".partial-global_step4" in os.listdir(tmp_path / "zero2-ep2")  # the interrupted save, never published

    from ds_tutel.train.checkpoint import CheckpointError
    from ds_tutel.train.reshard import reshard
    with pytest.raises(CheckpointError, match=r"ds_tutel\.hf\.load_checkpoint"):  # its optimizer groups: the caller's
        reshard(str(tmp_path / "zero2-ep2"), str(tmp_path / "one"), world_size=1)

    [one] = run_ranks(_one_rank_loads, 1, str(tmp_path), timeout=120)
    for name, result in one.items():
        assert result["diffs"] == {"fp32": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}, (name, result["diffs"])
        assert result["all_covered"] and result["steps"] == {result["saved_step"]} == {float(SAVE_AT)}, name
        assert result["counters"] == (SAVE_AT, SAVE_AT * 2 * B, SAVE_AT * 2 * B), (name, result["counters"])
        assert torch.isfinite(torch.tensor(result["resumed"])) and result["steps_after"] == SAVE_AT + 1, name
    assert one["zero2-ep2"]["scheduler"] and [lr for _, lr in one["zero2-ep2"]["lrs"]] == \
        [one["zero2-ep2"]["saved_lrs"][0]] * 2
    # Each group took its parameters' saved learning rate, the experts' group included (the experts have no vectors).
    assert one["two-lrs"]["saved_lrs"] == [NO_DECAY_LR, 1e-2]
    assert one["two-lrs"]["lrs"] == [("decay", 1e-2), ("ep_size_1", 1e-2), ("no_decay", NO_DECAY_LR)], \
        one["two-lrs"]["lrs"]


@pytest.mark.parametrize("section, message", [
    ({"hf": {"capcity_factor": 1.0}}, r"unknown keys \['capcity_factor'\]"),
    ({"hf": {"k": 2}}, r"\['k'\] follow from the model"),
    ({"hf": {"ep_size": 0}}, "ep_size must be a positive int"),
    ({"hf": {"aux_loss": "nope"}}, "aux_loss must be one of"),
    ({"hf": {"capacity_mode": "deepspeed", "capacity_factor": -1}}, "capacity_factor must be >= 0"),
    ({"hf": ["ep_size", 2]}, "must be a JSON object"),
    ({"hff": {}}, r"unknown keys in the \"ds_tutel\" config section: \['hff'\]"),
])
def test_config_section_errors_are_clear_and_come_before_any_collective(section, message):
    import ds_tutel.hf as hf
    with pytest.raises(ValueError, match=message):
        hf.convert_from_config(torch.nn.Linear(2, 2), {"ds_tutel": section})  # fails before reading the model


def test_config_section_from_a_json_file(tmp_path):
    import json

    import ds_tutel.hf as hf
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(_ds_config(2, 1) | {"ds_tutel": {"hf": {"capacity_factor": 1.25}}}))
    assert hf.hf_options(str(path)) == (None, {"capacity_factor": 1.25})
    assert hf.hf_options({}) == (None, {})
    model = hf.convert_from_config(_tiny(0), str(path), eval_capacity_factor=2.0)
    gate = hf.converted_blocks(model)[0][1].moe.deepspeed_moe.gate
    assert (gate.capacity_factor, gate.eval_capacity_factor, hf.converted_blocks(model)[0][1].moe.ep_size) == \
        (1.25, 2.0, 1)


def test_a_checkpoint_of_another_model_is_refused_naming_what_differs():
    import ds_tutel.hf as hf
    from ds_tutel.hf.checkpoint import check_same_model, model_meta
    from ds_tutel.train.checkpoint import CheckpointError
    ours = model_meta(hf.convert(_tiny(0)))
    saved = {**ours, "hf_config": {**ours["hf_config"], "hidden_size": 48, "dtype": "bfloat16"}}
    with pytest.raises(CheckpointError, match="different model .*hidden_size: checkpoint 48 vs model 32"):
        check_same_model(saved, ours, "ckpt/global_step2")
    check_same_model({**ours, "hf_config": {**ours["hf_config"], "dtype": "bfloat16"}}, ours, "ckpt")
    with pytest.raises(CheckpointError, match="not a checkpoint of a converted HF model"):
        check_same_model({"d_model": 32}, ours, "ckpt")
