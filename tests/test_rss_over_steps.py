"""benchmarks/cpu/rss_over_steps.py: which steps it reads, and a child run end to end."""
import pytest

from benchmarks.cpu.rss_over_steps import checkpoints, rss_over_steps, table
from benchmarks.layer_impls import parse_point


def test_checkpoints_are_1_2_5_per_decade_and_the_last():
    assert checkpoints(7) == [1, 2, 5, 7]
    assert checkpoints(200) == [1, 2, 5, 10, 20, 50, 100, 200]
    assert checkpoints(1) == [1]


def test_a_point_is_read_as_k_cf_E_M_dtype():
    point = parse_point("2,1.0,4,32,bf16", tokens=64)
    assert (point.k, point.capacity_factor, point.num_experts, point.model_dim, point.tokens, point.dtype) == (
        2, 1.0, 4, 32, 64, "bf16")
    assert parse_point("1,1.25,8,512,fp32").tokens == 1024  # the grids' tokens for M=512
    for bad in ("2,1.0,4,32", "2,1.0,4,32,fp8"):
        with pytest.raises(SystemExit, match="--point"):
            parse_point(bad)


def test_children_report_resident_memory_after_each_checkpoint():
    point = parse_point("2,1.0,4,32,fp32", tokens=64)
    results = rss_over_steps(point, ["ours", "deepspeed"], steps=3, timeout=300)
    assert set(results) == {"ours", "deepspeed"}
    for resident in results.values():
        assert sorted(resident) == [1, 2, 3] and all(mb > 50 for mb in resident.values())  # torch alone is more
    assert "| ours |" in table(point, results)
