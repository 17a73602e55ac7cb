"""benchmarks/rss_over_steps.py: which steps it reads, and a child run end to end."""
from benchmarks.onednn_cache import parse_point
from benchmarks.rss_over_steps import checkpoints, rss_over_steps, table


def test_checkpoints_are_1_2_5_per_decade_and_the_last():
    assert checkpoints(7) == [1, 2, 5, 7]
    assert checkpoints(200) == [1, 2, 5, 10, 20, 50, 100, 200]
    assert checkpoints(1) == [1]


def test_children_report_resident_memory_after_each_checkpoint():
    point = parse_point("2,1.0,4,32,fp32", tokens=64)
    results = rss_over_steps(point, ["ours", "deepspeed"], steps=3, timeout=300)
    assert set(results) == {"ours", "deepspeed"}
    for resident in results.values():
        assert sorted(resident) == [1, 2, 3] and all(mb > 50 for mb in resident.values())  # torch alone is more
    assert "| ours |" in table(point, results)
