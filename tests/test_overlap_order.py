"""The overlap schedule's order (parallel/exchange.py, a2a_ffn_overlap_degree > 1), with an instrumented exchange:
chunk i's experts wait for chunk i's exchange alone, and chunk i + 1's second (inter-node) hop is advanced only
after them, so that it runs while chunk i computes.

Shape legend: E experts, C capacity, M model dim, W ranks, L local experts.
"""
from __future__ import annotations

from typing import List, Tuple

import pytest
import torch

from ds_tutel.parallel import alltoall as comm
from ds_tutel.parallel import exchange as exchange_module

Event = Tuple[str, str]


class _TwoHops(comm.Pending):
    """An all-to-all of two hops that records when its second hop is issued (advance) and when it is waited for.
    Its data movement is the identity (the order, not the data, is under test)."""

    def __init__(self, name: str, x: torch.Tensor, log: List[Event]) -> None:
        self.name, self.log, self.output = name, log, x.clone()
        self.advanced = False
        log.append(("start", name))

    def advance(self) -> None:
        if not self.advanced:
            self.advanced = True
            self.log.append(("advance", self.name))

    def wait(self) -> torch.Tensor:
        self.advance()
        self.log.append(("wait", self.name))
        return self.output


class _Exchange:
    def __init__(self, log: List[Event]) -> None:
        self.log, self.started = log, 0

    def start(self, x: torch.Tensor) -> comm.Pending:
        self.started += 1
        return _TwoHops(f"a2a{self.started}", x, self.log)


@pytest.mark.parametrize("degree", [2, 3])
def test_chunk_experts_wait_only_for_their_own_exchange(degree, monkeypatch):
    log: List[Event] = []
    exchange = _Exchange(log)
    W, L, C, M = 2, 2, 6, 3
    monkeypatch.setattr(comm, "group_size", lambda group: W)
    monkeypatch.setattr(comm, "plan_exchange", lambda *args, **kwargs: exchange)

    def experts(chunk_WLCM: torch.Tensor) -> torch.Tensor:
        log.append(("experts", f"chunk{len([e for e in log if e[0] == 'experts'])}"))
        return chunk_WLCM * 2

    buf_ECM = torch.randn(W * L, C, M, requires_grad=True)
    out_ECM = exchange_module.exchange_and_compute(buf_ECM, experts, object(), L, algorithm="2dh",
                                                   overlap_degree=degree)
    torch.testing.assert_close(out_ECM, buf_ECM.detach() * 2)
    dispatch = [f"a2a{i + 1}" for i in range(degree)]  # issued first, chunk after chunk
    for i in range(degree):
        experts_at = log.index(("experts", f"chunk{i}"))
        assert log.index(("wait", dispatch[i])) < experts_at
        if i + 1 < degree:  # the next chunk's second hop: after these experts, before the next chunk's
            advanced_at = log.index(("advance", dispatch[i + 1]))
            assert experts_at < advanced_at < log.index(("experts", f"chunk{i + 1}")), log

    # The backward runs the same schedule with the gradient exchanges: every one started is waited for once.
    out_ECM.backward(torch.ones_like(out_ECM))
    torch.testing.assert_close(buf_ECM.grad, torch.full_like(buf_ECM, 2.0))
    started = [name for kind, name in log if kind == "start"]
    assert sorted(name for kind, name in log if kind == "wait") == sorted(started)
    assert len(started) == 4 * degree


def test_schedule_advances_the_marked_op_at_its_next_call_not_at_the_wait():
    log: List[Event] = []
    schedule = comm.Schedule()
    a, b = (schedule.issue(_TwoHops(n, torch.zeros(1), log)) for n in "ab")
    schedule.wait(a)
    assert ("advance", "b") not in log  # not yet: the caller computes on a first
    log.append(("compute", "a"))
    schedule.issue(_TwoHops("c", torch.zeros(1), log))
    assert log.index(("compute", "a")) < log.index(("advance", "b"))
