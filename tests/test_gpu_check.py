"""The device check (benchmarks/gpu_check.sh, issue 29) cannot rot: its dry run runs here, on the CPU (Triton's
interpreter, tiny shapes), through the same driver a GPU run uses, and must report every part with a status and
real comparisons in parts a (ours = DeepSpeed's layer), b (host syncs of each layer) and e (the grouped GEMM
against the per-expert loop)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the dry run needs triton")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The dry run's outputs (it runs once for the module's tests)."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    result = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), "--dry-run"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return out, json.loads((out / "gpu_check.json").read_text()), result.stdout


@needs_triton
@pytest.mark.slow
def test_dry_run_reports_every_part_with_a_status(dry_run):
    out, doc, stdout = dry_run
    assert doc["mode"] == "dry-run"
    assert list(doc["parts"]) == list(gpu_check.PARTS)
    for part, record in doc["parts"].items():
        assert record["status"] in gpu_check.STATUSES, (part, record)
        assert record["detail"], part
    for part in "abcd":
        assert doc["parts"][part]["status"] == "ok", (part, doc["parts"][part]["detail"])
    assert doc["parts"]["e"]["status"] == ("not built" if importlib.util.find_spec("triton_kernels.grouped_gemm")
                                           is None else "ok"), doc["parts"]["e"]["detail"]
    names = set(os.listdir(out))
    assert {"gpu_check.json", "gpu_check.md", "gpu_check.log", "kernels.json", "layer_dryrun.json"} <= names
    assert len(names) <= 8  # what a device machine sends back
    table = (out / "gpu_check.md").read_text()
    for part in gpu_check.PARTS:
        assert f"| {part} | {gpu_check.PARTS[part]} |" in table
    assert "== part e: not built" in stdout or "== part e: ok" in stdout


@needs_triton
@pytest.mark.slow
def test_dry_run_compares_the_layers_and_counts_their_syncs(dry_run):
    _, doc, _ = dry_run
    a = doc["parts"]["a"]["results"]
    assert a["ours_options"] == {"dispatch_backend": "triton"}  # ours on the CUDA code path
    assert {(c["k"], c["dtype"]) for c in a["cases"]} == {(k, d) for k in (1, 2, 4) for d in ("fp32", "bf16")}
    for case in a["cases"]:
        assert case["equal"] and case["exp_counts_equal"] and not case["failing"], case["key"]
        assert sum(case["exp_counts"]) > 0
        assert case["param_grads"]["count"] > 0 and case["output"]["scale"] > 0
    b = doc["parts"]["b"]["results"]
    assert [c["k"] for c in b["cases"]] == [1, 2, 4]
    for case in b["cases"]:
        assert isinstance(case["ours"], int) and isinstance(case["deepspeed"], int)
        assert case["ours"] == sum(case["ours_sites"].values())
    assert any(c["deepspeed"] > 0 for c in b["cases"])  # the counter sees DeepSpeed's syncs
    c = doc["parts"]["c"]["results"]
    assert c["rows"] and c["copy_GBps"] > 0
    d = doc["parts"]["d"]["results"]
    assert len(d["rows"]) == 2 and all(r["ours_ms"] > 0 and r["floor_ms"] > 0 for r in d["rows"])


@needs_triton
@pytest.mark.slow
def test_dry_run_checks_and_times_the_grouped_gemm(dry_run):
    _, doc, _ = dry_run
    if importlib.util.find_spec("triton_kernels.grouped_gemm") is None:
        pytest.skip("no grouped GEMM to check")
    e = doc["parts"]["e"]["results"]
    assert [r["key"] for r in e["rows"]] == [f"E{E}_M{M}_I{I}" for E, M, I in gpu_check.GROUPED_DRY_POINTS]
    for row in e["rows"]:
        assert row["min_rows"] == 0 < row["max_rows"]  # an empty expert and uneven ones
        assert all(d["within_tol"] for d in row["checks"]["ours"].values()), row["checks"]["ours"]
        for phase in ("fwd", "fwd_bwd"):
            assert row[phase]["ours_ms"] > 0 and row[phase]["loop_ms"] > 0 and row[phase]["ours_over_loop"] > 0
    assert "ours/loop" in doc["parts"]["e"]["detail"]


def test_a_failing_part_keeps_its_results_and_reports_its_last_line(tmp_path, monkeypatch):
    def failing(ctx, rec):
        rec.add("cases", {"key": "first"})
        raise ValueError("while comparing\nk2 bf16: output differs")

    monkeypatch.setitem(gpu_check.PART_FUNCTIONS, "a", failing)
    ctx = gpu_check.Context(dry_run=True, out=str(tmp_path), work=str(tmp_path), cap_s=10)
    assert gpu_check.run_part("a", ctx) == 1
    record = json.loads((tmp_path / "part_a.json").read_text())
    assert record["status"] == "failed"
    assert record["detail"] == "k2 bf16: output differs"
    assert record["results"]["cases"] == [{"key": "first"}]


def test_a_part_past_its_cap_is_killed_and_reported_failed(tmp_path):
    ctx = gpu_check.Context(dry_run=True, out=str(tmp_path), work=str(tmp_path), cap_s=0)
    record = gpu_check.run_child("d", ctx, cap_s=1.5)
    assert record["status"] == "failed"
    assert "timed out at its cap" in record["detail"]


def test_parts_not_asked_for_are_skipped(tmp_path):
    assert gpu_check.main(["--dry-run", "--parts", "", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    for part in gpu_check.PARTS:
        assert doc["parts"][part]["status"] == "skipped"
        assert "not asked for" in doc["parts"][part]["detail"]
    assert "skipped" in (tmp_path / "gpu_check.md").read_text()


def test_the_grouped_gemm_is_looked_for_not_faked(monkeypatch):
    real_find_spec = importlib.util.find_spec
    built = real_find_spec("triton_kernels.grouped_gemm") is not None
    assert gpu_check.grouped_gemm_state()[0] == ("ok" if built else "not built")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton_kernels.grouped_gemm" else real_find_spec(name, *a))
    status, detail = gpu_check.grouped_gemm_state()
    assert status == "not built" and "does not exist" in detail


def test_grouped_gemm_row_splits_are_uneven_with_an_empty_expert():
    for E in (8, 128):
        counts = gpu_check.grouped_row_counts(E, 16384, seed=E)
        assert len(counts) == E and sum(counts) == 16384 and counts[-1] == 0 and max(counts) > 16384 // E


def test_kernel_rows_are_read_back_from_the_benchmarks_output():
    text = ("# copy bandwidth 100.0 GB/s (read + write)\n"
            " 2048   32  2   1024 encode triton       0.120       0.300   1500.0   75.0%\n"
            " 4096  128  4    512 gate   deepspeed    0.050       0.090    800.5   40.0%\n")
    rows = gpu_check.parse_kernel_rows(text)
    assert rows == [dict(M=2048, E=32, k=2, C=1024, op="encode", path="triton", fwd_ms=0.12, fwd_bwd_ms=0.3,
                         GBps=1500.0, copy_fraction=0.75),
                    dict(M=4096, E=128, k=4, C=512, op="gate", path="deepspeed", fwd_ms=0.05, fwd_bwd_ms=0.09,
                         GBps=800.5, copy_fraction=0.4)]
    summary = gpu_check.kernel_summary(rows)
    assert summary["triton_rows_M2048_plus"] == 1 and summary["triton_rows_at_target"] == 1
