"""The training job: a resumed run equals an uninterrupted one step for step; a killed rank fails the job fast and
--resume continues from the last complete checkpoint (through the real deepspeed launcher).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ds_tutel.ranks import run_ranks

pytestmark = pytest.mark.multirank  # spawns ranks or launched jobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "deepspeed_config.json")
# A model small enough that a step takes milliseconds; everything else is the repository's config.
TINY = ["--config", CONFIG, "--model", "d_model=32", "--model", "n_layers=2", "--model", "n_heads=2",
        "--model", "seq_len=32", "--max-bytes", "120000", "--eval-windows", "8", "--eval-batch", "4",
        "--sample-tokens", "8"]


def _train(rank, world_size, argv):
    from ds_tutel.train.loop import run
    return run(argv)


def _train_runs(rank, world_size, argvs):
    from ds_tutel.train.loop import run
    return [run(argv) for argv in argvs]


def train_on_ranks(world_size, argv, timeout=240):
    """ds_tutel.train.loop.run(argv) on spawned gloo ranks; returns rank 0's summary."""
    return run_ranks(_train, world_size, argv, timeout=timeout)[0]


def read_records(out_dir, kind):
    from ds_tutel.train.report import read_log
    return [r for r in read_log(os.path.join(out_dir, "log.jsonl")) if r["type"] == kind]


def test_resumed_run_matches_uninterrupted_run_step_for_step(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = TINY + ["--steps", "8", "--save-every", "3", "--eval-every", "4", "--precision", "fp32"]
    # The uninterrupted run and the one stopped at step 5 share ranks (any state one left behind would show as a
    # difference in their first steps); the resumed run starts in fresh processes, as a resumed job does.
    summary_a, stopped = run_ranks(_train_runs, 2, [args + ["--out", a], args + ["--out", b, "--stop-at", "5"]],
                                   timeout=240)[0]
    assert stopped["stopped_at"] == 5
    summary_b = train_on_ranks(2, args + ["--out", b, "--resume"])
    assert summary_b["resumed_from"] == 5

    train_a, train_b = read_records(a, "train"), read_records(b, "train")
    assert [r["step"] for r in train_b] == list(range(1, 9))  # the log holds each step once
    for ra, rb in zip(train_a, train_b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=0), ra["step"]
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-9)
        assert rb["expert_load"] == ra["expert_load"]
    assert summary_b["final_val_loss"] == pytest.approx(summary_a["final_val_loss"], rel=1e-6)
    assert summary_a["final_val_loss"] < summary_a["initial_val_loss"]

    from ds_tutel.train.optimizer_state import read_full_states
    from ds_tutel.train.checkpoint import verify
    ckpt_a, ckpt_b = os.path.join(a, "checkpoints"), os.path.join(b, "checkpoints")
    states_a = read_full_states(os.path.join(ckpt_a, "global_step8"), verify(ckpt_a, "global_step8"))
    states_b = read_full_states(os.path.join(ckpt_b, "global_step8"), verify(ckpt_b, "global_step8"))
    for name, state in states_a["params"].items():
        for key, value in state.items():
            assert (states_b["params"][name][key] - value).abs().max() <= 1e-6, (name, key)
    for name in ("log.jsonl", "training.png", "sample.txt", "summary.json"):
        assert os.path.getsize(os.path.join(b, name)) > 0


def _launcher() -> list:
    script = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "deepspeed.launcher.runner"]


def _launch(out_dir, extra, **popen):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    cmd = _launcher() + ["--num_gpus", "2", "--master_port", str(_free_port()), "--module", "ds_tutel.train"]
    return subprocess.Popen(cmd + TINY + ["--out", out_dir] + extra, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _free_port():
    from ds_tutel.ranks import free_port
    return free_port()


def _rank_process(launcher_pid, local_rank):
    import psutil
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if f"--local_rank={local_rank}" in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def _latest_step(ckpt_dir):
    try:
        with open(os.path.join(ckpt_dir, "latest")) as f:
            return int(f.read().strip().replace("global_step", ""))
    except (OSError, ValueError):
        return None


def test_killed_rank_fails_the_job_and_resume_continues_from_last_complete_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    ckpt = os.path.join(out, "checkpoints")
    args = ["--steps", "400", "--save-every", "4", "--eval-every", "1000"]
    proc = _launch(out, args)
    try:
        victim, deadline = None, time.monotonic() + 180
        while victim is None:
            assert proc.poll() is None, f"training ended before the kill:\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "training made no progress"
            latest = _latest_step(ckpt)
            steps = [r["step"] for r in read_records(out, "train")] if os.path.exists(os.path.join(out, "log.jsonl")) else []
            if latest is not None and steps and steps[-1] > latest and steps[-1] % 4 == 2:
                victim = _rank_process(proc.pid, 1)
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        output, _ = proc.communicate(timeout=60)
        took = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0, output[-3000:]
    assert took < 30, f"the job took {took:.0f}s to fail after a rank died"

    from ds_tutel.train.checkpoint import verify
    before = read_records(out, "train")
    latest = _latest_step(ckpt)
    verify(ckpt, f"global_step{latest}")  # `latest` names a complete checkpoint, even if a save was cut short
    assert before[-1]["step"] > latest

    end = latest + 3
    resumed = _launch(out, ["--steps", "400", "--save-every", "4", "--eval-every", "1000", "--resume",
                            "--stop-at", str(end)])
    output, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, output[-3000:]
    after = {r["step"]: r for r in read_records(out, "train")}
    assert sorted(after) == list(range(1, end + 1))
    assert _latest_step(ckpt) == end
    overlap = [r for r in before if latest < r["step"] <= end]
    assert overlap, "the killed run logged no step after its last checkpoint"
    for r in overlap:  # the same steps, recomputed after the restart, give the same losses
        assert after[r["step"]]["loss"] == pytest.approx(r["loss"], rel=1e-6), r["step"]
    events = [r for r in read_records(out, "event")]
    assert events[-1]["event"] == "resume" and events[-1]["step"] == latest


def test_config_csv_monitor_receives_step_metrics_and_routing_stats(tmp_path):
    """A DeepSpeed csv_monitor in the JSON config gets the loss and every MoE layer's routing statistics."""
    with open(CONFIG) as f:
        config = json.load(f)
    config["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "monitor"), "job_name": "job"}
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    args = TINY + ["--config", str(config_path), "--steps", "3", "--eval-every", "3", "--save-every", "3",
                   "--precision", "fp32", "--out", str(tmp_path / "run")]
    train_on_ranks(2, args)
    files = {os.path.relpath(os.path.join(d, n), tmp_path / "monitor" / "job")
             for d, _, names in os.walk(tmp_path / "monitor" / "job") for n in names}
    losses = [line.split(",") for line in open(tmp_path / "monitor" / "job" / "Train_ds_tutel_loss.csv")][1:]
    logged = [r["loss"] for r in read_records(str(tmp_path / "run"), "train")]
    assert [int(step) for step, _ in losses] == [1, 2, 3]
    assert [float(v) for _, v in losses] == pytest.approx(logged, rel=1e-6)
    assert any("imbalance" in name for name in files) and any("load_expert_0" in name for name in files), files
