"""The rank runner every multi-rank test, benchmark and resharding job uses: results in rank order, and a failing,
dying or hanging rank ends the call quickly with its reason instead of blocking."""
import os
import time

import pytest
import torch

from ds_tutel import ranks
from ds_tutel.ranks import RankFailure, run_local_ranks

pytestmark = pytest.mark.multirank  # spawns ranks or launched jobs


def _describe(rank, world_size, scale):
    import torch.distributed as dist
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    return {"rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]), "local_size": int(os.environ["LOCAL_SIZE"]),
            "sum": total * scale, "extra": os.environ.get("RANKS_TEST_EXTRA"), "threads": torch.get_num_threads(),
            "caller": os.environ.get("RANKS_TEST_CALLER")}


def _fail_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("rank one refuses")
    return rank


def _hang_on_rank_0(rank, world_size):
    if rank == 0:
        time.sleep(600)
    return rank


def _exit_on_rank_1(rank, world_size):
    if rank == 1:
        os._exit(3)
    return rank


def test_results_come_back_in_rank_order_with_tensors_and_node_layout(monkeypatch):
    # The caller's environment as it is at the call reaches the ranks, but never its own rank variables (a caller
    # that is itself a launched rank).
    monkeypatch.setenv("RANKS_TEST_CALLER", "at the call")
    monkeypatch.setenv("RANK", "7")
    monkeypatch.setenv("LOCAL_RANK", "3")
    results = run_local_ranks(_describe, 4, 2.0, local_size=2, env={"RANKS_TEST_EXTRA": "yes"}, threads_per_rank=1,
                              timeout=120)
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    assert [r["local_rank"] for r in results] == [0, 1, 0, 1] and {r["local_size"] for r in results} == {2}
    assert all(torch.equal(r["sum"], torch.tensor([12.0])) for r in results)  # (0+1+2+3) * 2, a real all-reduce
    assert {r["extra"] for r in results} == {"yes"} and {r["threads"] for r in results} == {1}
    assert {r["caller"] for r in results} == {"at the call"}


def test_a_failing_rank_fails_the_call_with_its_message():
    with pytest.raises(RankFailure, match="rank 1 failed: ValueError: rank one refuses"):
        run_local_ranks(_fail_on_rank_1, 2, timeout=120)


def test_a_hanging_rank_fails_the_call_at_the_timeout(monkeypatch):
    seen = []
    monkeypatch.setattr(ranks, "stale_build_locks", lambda before: seen.append(before) or ["ext/deepspeed_op/lock"])
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"ranks \[0\] did not finish in 8s") as failure:
        run_local_ranks(_hang_on_rank_0, 2, timeout=8)
    assert time.monotonic() - start < 40
    # A build lock older than the run is named with the failure: an interrupted compile makes every later
    # DeepSpeed start wait on it, which looks like a hang.
    assert "build locks older than this run: ['ext/deepspeed_op/lock']" in str(failure.value)
    assert len(seen) == 1 and seen[0] < time.time() - 7


def test_stale_build_locks_are_the_lock_files_older_than_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old, new = tmp_path / "py311_cpu" / "some_op" / "lock", tmp_path / "other_op" / "lock"
    for path in (old, new):
        path.parent.mkdir(parents=True)
        path.write_text("")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert ranks.stale_build_locks(time.time() - 60) == [str(old)]
    assert ranks.stale_build_locks(time.time() + 60) == sorted([str(old), str(new)])


def test_a_dying_rank_fails_the_call():
    with pytest.raises(RankFailure, match=r"rank\(s\) \[1\] died \(exit codes \[3\]\)"):
        run_local_ranks(_exit_on_rank_1, 2, timeout=120)


def test_bad_layouts_are_refused_before_anything_starts():
    with pytest.raises(ValueError, match="local_size 3 must divide world_size 4"):
        run_local_ranks(_describe, 4, 1.0, local_size=3)
