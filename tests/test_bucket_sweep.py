"""benchmarks/bucket_sweep.py: the granularity it sets, and a child run end to end."""
import pytest

from benchmarks.bucket_sweep import sweep, table, use_buckets_per_octave
from benchmarks.onednn_cache import parse_point
from ds_tutel import row_buckets


def test_the_granularity_set_is_the_one_bucket_rounds_to(monkeypatch):
    monkeypatch.setattr(row_buckets, "BUCKETS_PER_OCTAVE", row_buckets.BUCKETS_PER_OCTAVE)
    assert row_buckets.bucket(100) == 100  # the default, 16 per octave: steps of 4 in [64, 128)
    use_buckets_per_octave(4)
    assert [row_buckets.bucket(n) for n in (65, 80, 81, 100, 128, 129)] == [80, 80, 96, 112, 128, 160]
    use_buckets_per_octave(1)
    assert [row_buckets.bucket(n) for n in (65, 100, 128, 129)] == [128, 128, 128, 256]
    for bad in (0, 3, 12, -4):
        with pytest.raises(ValueError, match="power of two"):
            use_buckets_per_octave(bad)


def test_children_measure_both_layers_at_each_granularity():
    point = parse_point("2,1.0,4,32,bf16", tokens=64)
    results = sweep(point, [16, 1], seeds=1, time=True, warmup=1, reps=2, budget_s=0.5, timeout=300)
    assert list(results) == [16, 1]
    for row in results.values():
        assert row["ours_MB"] > 0 and row["deepspeed_MB"] > 0
        assert row["memory_ratio"] == pytest.approx(row["ours_MB"] / row["deepspeed_MB"])
        assert row["ours_over_deepspeed"] > 0 and row["ours_over_floor"] > 0
    assert "| 16 |" in table(point, results) and "| 1 |" in table(point, results)
