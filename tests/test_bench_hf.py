"""benchmarks/bench_hf.py: ds_tutel.hf against DeepSpeed's AutoEP through the engine. One spawned rank runs the
bench's own comparison path on a tiny Mixtral for two steps (its losses must agree with AutoEP's and with the
unconverted model's); the summary's disagreement check is tested on made-up records."""
import pytest

pytest.importorskip("transformers")

from benchmarks import bench_hf  # noqa: E402


def test_one_rank_two_steps_ours_and_autoep_agree():
    [row] = bench_hf.compare(["mixtral"], 1, steps=2, warmup=1, hidden=32, layers=1, B=2, T=8, timeout=120)
    assert row["ran"] == ["ours", "autoep", "hf"] and row["errors"] == {}
    assert row["autoep_preset"] == "mixtral"
    assert all(len(losses) == 3 for losses in row["losses_rank0"].values())  # 2 steps and the profiled one
    assert row["agree"] == {"ours_vs_autoep": True, "ours_vs_hf": True, "autoep_vs_hf": True}, row["max_loss_diff"]
    assert bench_hf.strict_failures(row) == []
    assert row["time_ours_over_autoep"] > 0 and row["step_live_MB"]["ours"] > 0
    assert "| mixtral | 1 | mixtral |" in bench_hf.markdown(
        {"versions": {"deepspeed": "x", "transformers": "y", "torch": "z"}, "cpu_count": 2, "rows": [row],
         "settings": {"layers": 1, "hidden": 32, "batch": 2, "seq": 8, "stage": 0, "steps": 2, "warmup": 1}})


def _record(losses, preset="mixtral", optimizer="sgd"):
    return {"errors": {}, "preset": preset, "losses": losses, "seconds": {k: [0.1, 0.1] for k in losses},
            "live_bytes": {k: 1 for k in losses}, "param_bytes": {k: 1 for k in losses}, "optimizer": optimizer}


def test_a_loss_difference_beyond_fp32_rounding_fails_the_run():
    close = _record({"ours": [5.0, 4.9], "autoep": [5.0, 4.9 + 1e-6], "hf": [5.0, 4.9]})
    row = bench_hf.summarize("mixtral", 1, [close], warmup=1, oversubscribed=False)
    assert bench_hf.strict_failures(row) == []
    apart = _record({"ours": [5.0, 4.9], "autoep": [5.0, 4.95], "hf": [5.0, 4.9]})
    row = bench_hf.summarize("mixtral", 1, [apart], warmup=1, oversubscribed=False)
    assert row["agree"]["ours_vs_autoep"] is False and row["agree"]["ours_vs_hf"] is True
    assert any("ours_vs_autoep" in f for f in bench_hf.strict_failures(row))
    # AutoEP run by auto-detection on a type it has no preset for: reported, not failed on.
    row = bench_hf.summarize("olmoe", 1, [dict(apart, preset=None)], warmup=1, oversubscribed=False)
    assert row["agree"]["autoep_vs_hf"] is False and bench_hf.strict_failures(row) == []


def test_adamw_losses_are_held_to_the_sgd_check_of_the_same_steps():
    """AdamW magnifies rounding until a near-tie choice flips: its losses are reported, and the SGD pass of the same
    steps is what must agree to fp32 rounding."""
    close = _record({"ours": [5.0, 4.9], "autoep": [5.0, 4.9], "hf": [5.0, 4.9]})
    apart = _record({"ours": [5.0, 4.9], "autoep": [5.0, 4.95], "hf": [5.0, 4.9]}, optimizer="adamw")
    timed = bench_hf.summarize("mixtral", 1, [apart], warmup=1, oversubscribed=False)
    assert timed["agree"]["ours_vs_autoep"] is False and bench_hf.strict_failures(timed) == []
    bench_hf.attach_check([timed], [bench_hf.summarize("mixtral", 1, [close], warmup=1, oversubscribed=False)])
    assert timed["check"]["optimizer"] == "sgd" and bench_hf.strict_failures(timed) == []
    check_apart = dict(apart, optimizer="sgd")
    bench_hf.attach_check([timed], [bench_hf.summarize("mixtral", 1, [check_apart], warmup=1, oversubscribed=False)])
    assert any("sgd: ours_vs_autoep" in f for f in bench_hf.strict_failures(timed))
