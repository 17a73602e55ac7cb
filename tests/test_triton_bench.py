"""benchmarks/bench_kernels.py --smoke runs end to end on the CPU (Triton interpreter): its correctness checks of
the three paths pass and it reports every (shape, pass, path)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the benchmark needs the triton package")
def test_bench_kernels_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_kernels.py"), "--smoke",
                             "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checks passed on every shape" in result.stdout
    report = json.loads(out.read_text())
    assert report["copy_GBps"] > 0
    rows = report["results"]
    paths = {"triton", "torch"}
    if importlib.util.find_spec("deepspeed") is not None:
        paths.add("deepspeed")
    shapes = {(r["M"], r["E"], r["k"]) for r in rows}
    assert shapes == {(40, 4, 1), (40, 4, 2), (40, 6, 1), (40, 6, 2)}
    assert {(r["op"], r["path"]) for r in rows} == {(op, p) for op in ("gate", "encode", "decode") for p in paths}
    assert len(rows) == len(shapes) * 3 * len(paths)
    for row in rows:
        assert row["fwd_bwd_ms"] > 0 and row["fwd_ms"] > 0 and row["GBps"] > 0 and row["C"] > 0
