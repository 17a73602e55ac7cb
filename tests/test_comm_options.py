"""Local parts of the all-to-all machinery: argument checks, the auto threshold, and the overlap schedule's
rank-independent order of second hops (no processes spawned)."""
import pytest
import torch

from ds_tutel import options
from ds_tutel.parallel import alltoall as comm


def test_algorithm_and_threshold_checks(monkeypatch):
    for good in options.A2A_ALGORITHMS:
        assert options.check_algorithm(good) == good
    for bad in ("2DH", "ring", None, 1):
        with pytest.raises(ValueError, match="must be one of"):
            options.check_algorithm(bad)
    assert [options.parse_bytes(t) for t in ("65536", "64K", "4MB", "1g", "0")] == [65536, 65536, 4 << 20, 1 << 30, 0]
    for bad in ("lots", "-1", ""):
        with pytest.raises(ValueError):
            options.parse_bytes(bad)
    monkeypatch.delenv(options.AUTO_THRESHOLD_ENV, raising=False)
    assert options.auto_threshold() == options.DEFAULT_AUTO_THRESHOLD_BYTES
    monkeypatch.setenv(options.AUTO_THRESHOLD_ENV, "256K")
    assert options.auto_threshold() == 256 << 10
    assert options.auto_threshold(100) == 100  # the argument wins over the environment
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            options.auto_threshold(bad)


def test_auto_chooses_by_size_and_only_with_a_hierarchy():
    hier = object()  # algorithm_for only asks whether there is one
    auto = comm.Exchange(None, "auto", hier, threshold_bytes=4096)
    assert [auto.algorithm_for(n) for n in (1, 4096, 4097)] == ["2dh", "2dh", "flat"]
    assert comm.Exchange(None, "2dh", hier).algorithm_for(1 << 30) == "2dh"
    assert comm.Exchange(None, "2dh", None).algorithm_for(1) == "flat"  # one node: 2dh is flat
    assert comm.Exchange(None, "flat", hier, threshold_bytes=1 << 30).algorithm_for(1) == "flat"
    with pytest.raises(ValueError, match="intra_strategy"):
        comm.Exchange(None, "2dh", hier, intra_strategy="diagonal")


def test_intra_strategy_by_backend_nodes_and_size():
    big, small = 1 << 20, 1 << 10
    assert [comm.intra_strategy_for(n, "gloo", big) for n in (2, 8, 9)] == ["per_node", "per_node", "transposed"]
    assert comm.intra_strategy_for(2, "gloo", small) == "transposed"
    assert [comm.intra_strategy_for(n, "nccl", s) for n, s in ((2, small), (3, big), (64, big))] == [
        "per_node", "transposed", "transposed"]


class _Fake(comm.Pending):
    def __init__(self, name, log):
        self.name, self.log, self.output = name, log, torch.zeros(1)

    def advance(self):
        self.log.append(("advance", self.name))

    def wait(self):
        self.log.append(("wait", self.name))
        return self.output


def test_schedule_advances_the_next_issued_op_whatever_the_wait_order():
    log = []
    schedule = comm.Schedule()
    a, b, c = (schedule.issue(_Fake(n, log)) for n in "abc")
    schedule.wait(a)
    schedule.wait(c)  # the last one: nothing after it to advance
    d = schedule.issue(_Fake("d", log))
    schedule.wait(b)
    schedule.wait(d)
    assert log == [("wait", "a"), ("advance", "b"), ("wait", "c"), ("wait", "b"), ("advance", "d"), ("wait", "d")]
