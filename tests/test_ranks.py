"""The rank runner every multi-rank test, benchmark and resharding job uses: results in rank order, and a failing,
dying or hanging rank ends the call quickly with its reason instead of blocking."""
import os
import time

import pytest
import torch

from ds_tutel.ranks import RankFailure, run_local_ranks


def _describe(rank, world_size, scale):
    import torch.distributed as dist
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    return {"rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]), "local_size": int(os.environ["LOCAL_SIZE"]),
            "sum": total * scale, "extra": os.environ.get("RANKS_TEST_EXTRA"), "threads": torch.get_num_threads()}


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


def test_results_come_back_in_rank_order_with_tensors_and_node_layout():
    results = run_local_ranks(_describe, 4, 2.0, local_size=2, env={"RANKS_TEST_EXTRA": "yes"}, threads_per_rank=1,
                              timeout=120)
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    assert [r["local_rank"] for r in results] == [0, 1, 0, 1] and {r["local_size"] for r in results} == {2}
    assert all(torch.equal(r["sum"], torch.tensor([12.0])) for r in results)  # (0+1+2+3) * 2, a real all-reduce
    assert {r["extra"] for r in results} == {"yes"} and {r["threads"] for r in results} == {1}


def test_a_failing_rank_fails_the_call_with_its_message():
    with pytest.raises(RankFailure, match="rank 1 failed: ValueError: rank one refuses"):
        run_local_ranks(_fail_on_rank_1, 2, timeout=120)


def test_a_hanging_rank_fails_the_call_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"ranks \[0\] did not finish in 20s"):
        run_local_ranks(_hang_on_rank_0, 2, timeout=20)
    assert time.monotonic() - start < 60


def test_a_dying_rank_fails_the_call():
    with pytest.raises(RankFailure, match=r"rank\(s\) \[1\] died \(exit codes \[3\]\)"):
        run_local_ranks(_exit_on_rank_1, 2, timeout=120)


def test_bad_layouts_are_refused_before_anything_starts():
    with pytest.raises(ValueError, match="local_size 3 must divide world_size 4"):
        run_local_ranks(_describe, 4, 1.0, local_size=3)
