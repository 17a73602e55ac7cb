"""Checkpoints: resharding 2->1 and 1->2 (same validation loss, same optimizer state, trains on), atomic saves,
and clear errors with exit status 2 for bad input (missing data, layouts that do not divide, corrupt, partial or
mismatched checkpoints, bad configs).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from ds_tutel.ranks import run_ranks
from test_train import CONFIG, REPO, TINY, read_records, train_on_ranks

pytestmark = pytest.mark.multirank  # spawns ranks or launched jobs


def _tree_digest(path):
    digest = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                digest[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return digest


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 2-rank, ep_size 2 run of 4 steps (precision "auto": bf16 where the CPU has it) with checkpoints."""
    out = str(tmp_path_factory.mktemp("source") / "run")
    summary = train_on_ranks(2, TINY + ["--out", out, "--steps", "4", "--save-every", "2", "--eval-every", "4"])
    return {"out": out, "ckpt": os.path.join(out, "checkpoints"), "summary": summary}


@pytest.fixture(scope="module")
def resharded(source, tmp_path_factory):
    """The source checkpoint converted to world size 1 by the command line tool, and its digest before."""
    before = _tree_digest(source["ckpt"])
    one = str(tmp_path_factory.mktemp("resharded") / "one")
    result = _reshard_cli(source["ckpt"], one, "--world-size", "1")
    return {"dir": one, "result": result, "source_digest": before}


def _eval(world_size, ckpt_dir, out_dir):
    return train_on_ranks(world_size, TINY + ["--out", out_dir, "--eval-only", "--checkpoint-dir", ckpt_dir])


def _reshard_cli(*args):
    return subprocess.run([sys.executable, "-m", "ds_tutel.train.checkpoint_cli", "reshard", *args], cwd=REPO,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=300)


def _full_states(ckpt_dir):
    from ds_tutel.train.checkpoint import read_latest, verify
    from ds_tutel.train.optimizer_state import read_full_states
    tag = read_latest(ckpt_dir)
    return read_full_states(os.path.join(ckpt_dir, tag), verify(ckpt_dir, tag))


def _assert_same_states(a, b):
    assert set(a["params"]) == set(b["params"])
    assert float(a["step"]) == float(b["step"]) and a["lr"] == b["lr"]
    for name, state in a["params"].items():
        for key, value in state.items():
            assert bool((b["params"][name][key] == value).all()), (name, key)


def test_reshard_2_to_1_and_1_to_2_keeps_validation_loss_and_optimizer_state(source, resharded, tmp_path):
    one, two, result = resharded["dir"], str(tmp_path / "two"), resharded["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout[result.stdout.index("{"):])["to"] == {"world_size": 1, "ep_size": 1}
    assert _tree_digest(source["ckpt"]) == resharded["source_digest"]  # the input is never modified

    val_two = source["summary"]["final_val_loss"]  # at step 4, on 2 ranks, from the checkpointed weights
    val_one = _eval(1, one, str(tmp_path / "e1"))
    assert (val_one["world_size"], val_one["ep_size"], val_one["step"]) == (1, 1, 4)
    assert val_one["val_loss"] == pytest.approx(val_two, rel=1e-4)  # bf16 matmuls batched differently
    _assert_same_states(_full_states(source["ckpt"]), _full_states(one))

    from ds_tutel.train.reshard import reshard
    reshard(one, two, world_size=2, ep_size=2)
    val_back = _eval(2, two, str(tmp_path / "e3"))
    assert (val_back["world_size"], val_back["ep_size"]) == (2, 2)
    assert val_back["val_loss"] == pytest.approx(val_two, rel=1e-6)  # the original layout, the same numbers
    _assert_same_states(_full_states(source["ckpt"]), _full_states(two))

    # A resharded checkpoint trains on at its new size.
    out, ckpt = str(tmp_path / "continued"), str(tmp_path / "continued-ckpt")
    shutil.copytree(one, ckpt)
    summary = train_on_ranks(1, TINY + ["--out", out, "--checkpoint-dir", ckpt, "--resume", "--steps", "6",
                                        "--save-every", "2", "--eval-every", "6"])
    assert summary["resumed_from"] == 4 and summary["world_size"] == 1
    assert [r["step"] for r in read_records(out, "train")] == [5, 6]


def test_reshard_refuses_to_overwrite_and_reports_bad_input(source, tmp_path):
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    result = _reshard_cli(source["ckpt"], str(existing), "--world-size", "1")
    assert result.returncode == 2 and "already exists; refusing to overwrite" in result.stderr
    assert (existing / "keep.txt").read_text() == "mine"
    result = _reshard_cli(str(tmp_path / "missing"), str(tmp_path / "new"), "--world-size", "1")
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = _reshard_cli(source["ckpt"], str(tmp_path / "new"), "--world-size", "3")
    assert result.returncode == 2 and "not divisible by ep_size (3)" in result.stderr
    assert not (tmp_path / "new").exists()


def test_info_prints_the_manifest_of_the_latest_checkpoint_and_refuses_an_empty_directory(source, tmp_path):
    run = [sys.executable, "-m", "ds_tutel.train.checkpoint_cli", "info"]
    result = subprocess.run(run + [source["ckpt"]], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["step"] == 4 and manifest["world_size"] == 2
    empty = subprocess.run(run + [str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and "no checkpoint" in empty.stderr


# Runs the training job's entry point (ds_tutel.train.loop.main, what `python -m ds_tutel.train` exits with) once
# per argument list, in one fresh process: each call's exit status and what it printed on stderr. One process for
# all the calls of a test pays for importing torch and DeepSpeed once; calls that build an engine go last.
_MANY_MAINS = r"""
import contextlib, io, json, sys
from ds_tutel.train.loop import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except BaseException as e:  # a traceback is a failure the test reports
            import traceback
            traceback.print_exc(file=err)
            code = 1
    results.append([code, err.getvalue()])
print("RESULTS " + json.dumps(results))
"""


def _train_cli(*calls, timeout=240):
    """[(exit status, stderr)] of the training job run with TINY plus each of `calls` (argument lists)."""
    proc = subprocess.run([sys.executable, "-c", _MANY_MAINS, json.dumps([TINY + list(c) for c in calls])],
                          cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True,
                          timeout=timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")), None)
    assert proc.returncode == 0 and line is not None, (proc.stdout + proc.stderr)[-3000:]
    return [tuple(r) for r in json.loads(line[len("RESULTS "):])]


def _error_line(result):
    code, stderr = result
    lines = [line for line in stderr.splitlines() if line.startswith("error")]
    assert code == 2 and len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


def test_bad_input_before_training_exits_2_with_one_clear_line(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"train_micro_batch_size_per_gpu": 4,')
    with open(CONFIG) as f:
        config = json.load(f)
    config["ds_tutel_train"]["stpes"] = 3
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps(config))
    results = _train_cli(["--data", str(tmp_path / "nope")], ["--ep-size", "3"], ["--ep-size", "2"],
                         ["--config", str(tmp_path / "none.json")], ["--config", str(broken)],
                         ["--config", str(typo)])
    expected = ["data path does not exist: ", "num_experts (4) is not divisible by ep_size (3)",
                "ep_size (2) does not divide the world size (1)", "DeepSpeed config not found", "is not valid JSON",
                "unknown keys"]
    for result, message in zip(results, expected, strict=True):
        assert message in _error_line(result)
    # The entry point as users run it: the same line and exit status from `python -m ds_tutel.train`.
    proc = subprocess.run([sys.executable, "-m", "ds_tutel.train", *TINY, "--ep-size", "3"], cwd=REPO,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=180)
    assert _error_line((proc.returncode, proc.stderr)) == _error_line(results[1])


def test_corrupt_partial_and_mismatched_checkpoints_are_refused(source, resharded, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(resharded["dir"], ckpt)
    tag_dir = os.path.join(ckpt, "global_step4")
    expert_file = os.path.join(tag_dir, "layer_0_expert_1_mp_rank_00_model_states.pt")
    truncated = str(tmp_path / "truncated")  # an expert file cut short: the manifest's sizes catch it
    shutil.copytree(resharded["dir"], truncated)
    with open(os.path.join(truncated, "global_step4", os.path.basename(expert_file)), "r+b") as f:
        f.truncate(100)
    partial = str(tmp_path / "partial")  # what a save cut off before publishing leaves
    shutil.copytree(resharded["dir"], partial)
    os.remove(os.path.join(partial, "global_step4", "ds_tutel_manifest.json"))
    # Same size, damaged bytes: the manifest passes, DeepSpeed's load fails, the message names the checkpoint.
    with open(expert_file, "r+b") as f:
        f.seek(0)
        f.write(b"\0" * 64)

    out = lambda name: ["--out", str(tmp_path / name)]  # noqa: E731
    mismatched, wrong_size, cut, partial_run, empty, existing, damaged = _train_cli(
        out("o1") + ["--checkpoint-dir", ckpt, "--resume", "--model", "d_model=64"],
        out("o2") + ["--checkpoint-dir", source["ckpt"], "--resume"],
        out("o3") + ["--checkpoint-dir", truncated, "--resume"],
        out("o5") + ["--checkpoint-dir", partial, "--eval-only"],
        out("o6") + ["--checkpoint-dir", str(tmp_path / "empty"), "--eval-only"],
        ["--out", source["out"]],
        out("o4") + ["--checkpoint-dir", ckpt, "--resume"])
    assert "different model (d_model: checkpoint 32 vs run 64)" in _error_line(mismatched)
    line = _error_line(wrong_size)
    assert "world size 2 and ep_size 2" in line and "ds_tutel.train.checkpoint_cli reshard" in line
    assert "is corrupt: layer_0_expert_1_mp_rank_00_model_states.pt has 100 bytes" in _error_line(cut)
    assert "it is partial" in _error_line(partial_run)
    assert "no checkpoint in" in _error_line(empty)
    assert "already holds checkpoints: pass --resume" in _error_line(existing)
    assert "could not load checkpoint" in _error_line(damaged)


def _interrupted_save(rank, world_size, ckpt_dir):
    from ds_tutel.train import checkpoint
    from ds_tutel.train.engine import build_engine, deepspeed_dict, load_config
    from ds_tutel.train.model import GPTMoE
    from ds_tutel.train.presets import get_preset
    cfg = get_preset("tiny", {"d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32}).resolved(world_size)
    engine = build_engine(GPTMoE(cfg), deepspeed_dict(load_config(CONFIG), "fp32", 10))
    checkpoint.save(engine, ckpt_dir, "global_step1", {"step": 1})
    real_save = engine.save_checkpoint

    def dies_half_way(save_dir, tag, **kwargs):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt("killed while saving")

    engine.save_checkpoint = dies_half_way
    try:
        checkpoint.save(engine, ckpt_dir, "global_step2", {"step": 2})
    except KeyboardInterrupt:
        pass
    after_interrupt = (checkpoint.read_latest(ckpt_dir), sorted(os.listdir(ckpt_dir)))
    engine.save_checkpoint = real_save
    checkpoint.save(engine, ckpt_dir, "global_step2", {"step": 2})
    return after_interrupt, (checkpoint.read_latest(ckpt_dir), sorted(os.listdir(ckpt_dir)))


def test_interrupted_save_never_moves_latest_and_is_cleaned_up_by_the_next_save(tmp_path):
    from ds_tutel.train.checkpoint import verify
    ckpt = str(tmp_path / "ckpt")
    (latest, names), (latest_after, names_after) = run_ranks(_interrupted_save, 1, ckpt, timeout=180)[0]
    assert latest == "global_step1"
    assert ".partial-global_step2" in names and "global_step2" not in names
    assert latest_after == "global_step2" and ".partial-global_step2" not in names_after
    assert verify(ckpt, "global_step1")["step"] == 1 and verify(ckpt, "global_step2")["step"] == 2
