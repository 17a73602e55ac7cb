"""The main job with a Hugging Face model (`python -m ds_tutel.train --hf qwen3_moe`, what `bash scripts/main.sh
--hf qwen3_moe` launches): a tiny Qwen3-MoE built from its config class, converted with the JSON's "ds_tutel":
{"hf"} section, trains on 2 gloo ranks through the same loop, logs, plots and checkpoints as the GPT-MoE job; the
validation loss goes down; its checkpoint reshards to one rank (checkpoint_cli's reshard) with the same validation
loss and optimizer state. Bad input exits 2 before any rank starts DeepSpeed. (Resuming converted models through the engine:
tests/test_hf_checkpoint.py.)
"""
import json
import os

import pytest

from test_train import CONFIG, read_records, train_on_ranks

pytest.importorskip("transformers")

pytestmark = pytest.mark.multirank

# seq_len 32 and a small corpus: a step takes milliseconds.
HF_TINY = ["--hf", "qwen3_moe", "--model", "seq_len=32", "--max-bytes", "120000", "--eval-windows", "8",
           "--eval-batch", "4", "--sample-tokens", "8", "--precision", "fp32"]


def _config(tmp_path, hf_section):
    with open(CONFIG) as f:
        config = json.load(f)
    config["ds_tutel"] = {"hf": hf_section}
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_hf_job_trains_logs_plots_and_reshards_on_two_ranks(tmp_path):
    config = _config(tmp_path, {"ep_size": 2, "dispatch_backend": "torch"})
    out = str(tmp_path / "run")
    args = HF_TINY + ["--config", config, "--out", out, "--steps", "6", "--eval-every", "6", "--save-every", "6"]
    summary = train_on_ranks(2, args, timeout=240)
    assert summary["ep_size"] == 2 and summary["world_size"] == 2
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    train = read_records(out, "train")
    assert [r["step"] for r in train] == list(range(1, 7))
    assert all(len(r["expert_load"]) == 2 and len(r["expert_load"][0]) == 4 for r in train)  # 2 MoE layers, 4 experts
    assert all(r["dropped"] == 0.0 for r in train)  # the model's own (dropless) routing
    for name in ("log.jsonl", "training.png", "sample.txt", "summary.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "checkpoints", "global_step6", "ds_tutel_manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["model"]["hf_model_type"] == "qwen3_moe" and manifest["model"]["ep_size"] == 2

    # Resharded to one rank (ep_size 1): the same validation loss from the checkpointed weights, the same
    # optimizer state per parameter.
    from test_checkpoint import _assert_same_states, _full_states

    from ds_tutel.train.reshard import reshard
    ckpt, one = os.path.join(out, "checkpoints"), str(tmp_path / "one")
    assert reshard(ckpt, one, world_size=1)["to"] == {"world_size": 1, "ep_size": 1}
    _assert_same_states(_full_states(ckpt), _full_states(one))
    val_one = train_on_ranks(1, HF_TINY + ["--config", config, "--out", str(tmp_path / "e1"), "--eval-only",
                                           "--checkpoint-dir", one, "--ep-size", "1"], timeout=240)
    assert (val_one["world_size"], val_one["ep_size"], val_one["step"]) == (1, 1, 6)
    assert val_one["val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)


@pytest.mark.parametrize("extra, hf_section, message", [
    (["--hf", "nope"], {}, "no tiny preset for model type 'nope'"),
    (["--hf", "qwen3_moe"], {"capacity_factr": 1.0}, "unknown keys ['capacity_factr']"),
    (["--hf", "qwen3_moe", "--dry-run"], {}, "--dry-run plans the GPT-MoE presets only"),
])
def test_hf_job_bad_input_exits_2_before_starting(tmp_path, capsys, extra, hf_section, message):
    from ds_tutel.train.loop import main
    assert main(["--config", _config(tmp_path, hf_section), "--out", str(tmp_path / "o")] + extra) == 2
    assert message in capsys.readouterr().err


def test_every_supported_type_has_a_tiny_preset_that_trains_a_step():
    """`--hf TYPE` works for every type ds_tutel.hf converts: its tiny preset builds, converts, and gives logits, a
    load-balancing loss where the model has one (zero where it has none) and gradients, in-process at ep_size 1."""
    import torch

    import ds_tutel.hf as hf
    from ds_tutel.train.hf_model import HF_PRESETS, HFJobConfig, HFLanguageModel
    assert sorted(HF_PRESETS) == sorted(hf.SUPPORTED_MODEL_TYPES)
    without_aux = {"deepseek_v3", "glm4_moe", "granitemoe", "granitemoeshared"}
    for model_type in HF_PRESETS:
        cfg = HFJobConfig(model_type=model_type, ep_size=1, seq_len=16)
        model = HFLanguageModel(cfg, seed=0).train()
        assert cfg.num_experts == 4 and len(model.moe_layers()) >= 1, model_type
        logits_BTV, aux = model(torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0)))
        assert logits_BTV.shape == (2, 16, 256) and torch.isfinite(logits_BTV).all(), model_type
        assert (aux.item() == 0.0) == (model_type in without_aux), (model_type, aux.item())
        (logits_BTV.logsumexp(-1).mean() + aux).backward()
        experts = [p for layer in model.moe_layers() for p in layer.deepspeed_moe.experts.parameters()]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in experts), model_type
