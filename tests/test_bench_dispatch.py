"""benchmarks/bench_dispatch.py: the dispatch alone, compiled loops against the torch path and the bytes floor."""
import json

import pytest
import torch

from benchmarks import bench_dispatch


def test_smoke_run_times_both_paths_on_every_shape_and_writes_its_files(tmp_path, capsys):
    doc = bench_dispatch.main(["--smoke", "--reps", "2", "--tag", "dispatch_smoke", "--out-dir", str(tmp_path)])
    rows = doc["rows"]
    assert [(r["dtype"], r["S"], r["M"], r["E"]) for r in rows] == [
        (d, S, M, E) for d in ("bf16", "fp32") for S, M, E in bench_dispatch.SMOKE_SHAPES]
    for r in rows:
        assert 0 < r["kept_choices"] <= 2 * r["S"]
        assert r["compiled_s"] > 0 and r["torch_s"] > 0 and r["bytes_floor_s"] > 0
        assert r["compiled_over_bytes"] == pytest.approx(r["compiled_s"] / r["bytes_floor_s"])
    assert json.loads((tmp_path / "dispatch_smoke.json").read_text())["rows"] == rows
    assert "| 64, 32, 4 | bf16 |" in (tmp_path / "dispatch_smoke.md").read_text()


def test_the_two_paths_are_checked_for_equal_bits_before_timing(monkeypatch):
    """A path whose output differs is an error, not a timing."""
    real = bench_dispatch.dispatch_step

    def skewed(S, M, E, dtype, use_kernels, seed=0):
        step, kept = real(S, M, E, dtype, use_kernels, seed)
        if use_kernels:
            return (lambda: tuple(t + 1 for t in step())), kept
        return step, kept

    monkeypatch.setattr(bench_dispatch, "dispatch_step", skewed)
    with pytest.raises(AssertionError, match="differ"):
        bench_dispatch.measure(64, 32, 4, "bf16", reps=1, bandwidth_Bps=1e9)


def test_an_unknown_dtype_is_rejected():
    with pytest.raises(SystemExit):
        bench_dispatch.main(["--smoke", "--dtypes", "fp8"])
