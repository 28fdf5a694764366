"""The inbox between a Federation's I/O thread and its training thread: both sides driven hard
from two threads at once, and the single-threaded rules for rewinding and forgetting."""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Callable, Iterator, MutableSet

import pytest
import torch

from tether_protocol.messages import AckCreate, Decision, SnapshotRef
from tetherfed.federation._inbox import AppliedIds, Inbox, Ready

N = 3000  # decisions delivered, each twice
DEADLINE_S = 30.0  # a hang fails the test instead of blocking the suite


@functools.cache
def decision(decision_id: int) -> Decision:
    return Decision(
        id=decision_id,
        federation="f",
        layer="0",
        worker_id="w",
        partner_id=None,
        action="drift",
        score=0.1,
        measure="pearson",
        merge_threshold=0.5,
        drift_threshold=0.2,
        operator="decouple",
        params={},
        partner_snapshot=None,
        own_snapshot=SnapshotRef(worker_id="w", version=1, step=0),
        epoch=0,
        reason="test",
    )


def ready(decision_id: int) -> Ready:
    return Ready(decision(decision_id), torch.zeros(0))


@pytest.fixture
def eager_switching() -> Iterator[None]:
    """Switch threads every few microseconds (not every 5 ms), so the two sides interleave
    inside each other's operations far more often."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def run_both(*targets: Callable[[], None]) -> None:
    """Run the callables on their own threads; re-raise the first error of any."""
    errors: list[BaseException] = []

    def guard(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as error:  # re-raised on the test's thread below
            errors.append(error)

    threads = [threading.Thread(target=guard, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE_S + 5.0)
    assert not any(t.is_alive() for t in threads), "a side hung"
    if errors:
        raise errors[0]


class TwoSides:
    """Both threads of a Federation around one inbox, each side as fast as it goes.

    The I/O side delivers every decision twice (the second time a few ids later, as a re-poll
    would), rewinds to its own cursor after each (decisions that end at the cursor: the rewind
    drops nothing, so every applied id must come through it whole) and sends the acks. The
    training side takes, settles and, when nothing is ready, checkpoints."""

    def __init__(self) -> None:
        self.inbox = Inbox()
        self.settled: list[int] = []
        self.sent: list[int] = []
        self.checkpoints: list[tuple[list[int], list[int]]] = []
        self._start = threading.Barrier(2)

    def io_side(self) -> None:
        self._start.wait()
        deadline = time.monotonic() + DEADLINE_S
        for i in range(1, N + 1):
            for again in (i, max(1, i - 7)):
                if not self.inbox.is_applied(again):
                    self.inbox.put(ready(again))
                self.inbox.advance(again)
            self.inbox.rewind(self.inbox.cursor)
            self.send_acks()
        for i in range(N - 6, N + 1):  # the last ids' second delivery
            self.inbox.put(ready(i))
        while len(self.sent) < N and time.monotonic() < deadline:
            self.inbox.rewind(self.inbox.cursor)
            self.send_acks()

    def send_acks(self) -> None:
        for decision_id, ack in self.inbox.unsent_acks():
            self.sent.append(decision_id)
            self.inbox.sent(decision_id, ack)

    def training_side(self) -> None:
        self._start.wait()
        deadline = time.monotonic() + DEADLINE_S
        while len(self.settled) < N and time.monotonic() < deadline:
            taken = self.inbox.take()
            if taken is None:
                state = self.inbox.state()
                self.checkpoints.append((state.applied_ids, [i for i, _ in state.pending_acks]))
                continue
            ack = AckCreate(outcome="applied", generation=taken.decision.id)
            assert self.inbox.settle(taken, ack), "a rewind to the cursor voided a decision"
            self.settled.append(taken.decision.id)


@pytest.mark.usefixtures("eager_switching")
def test_both_threads_at_once_lose_no_applied_id_apply_nothing_twice_and_ack_each_once() -> None:
    """Whatever the interleaving: each decision is applied once, every applied id survives the
    rewinds, every ack goes out exactly once, and each checkpoint is consistent."""
    sides = TwoSides()
    run_both(sides.io_side, sides.training_side)
    everything = list(range(1, N + 1))
    assert sorted(sides.settled) == everything, "a decision was applied twice or never"
    assert sorted(sides.inbox.applied()) == everything, "an applied id was lost"
    assert sorted(sides.sent) == everything, "an ack went out twice or never"
    assert sides.inbox.unsent_acks() == [] and sides.inbox.take() is None
    for applied, pending in sides.checkpoints:  # every pending ack is of an applied id
        assert set(pending) <= set(applied)


@pytest.mark.usefixtures("eager_switching")
def test_acks_made_while_being_sent_are_each_sent_once() -> None:
    """Acks queued by the training thread while the I/O thread sends earlier ones: none is
    dropped by `sent`, none is sent twice."""
    inbox = Inbox()
    sent: list[int] = []
    done = threading.Event()

    def training_side() -> None:
        for i in range(1, N + 1):
            inbox.put(ready(i))
            taken = inbox.take()
            assert taken is not None
            inbox.settle(taken, AckCreate(outcome="rejected", reason="test"))
        done.set()

    def io_side() -> None:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            finished = done.is_set()
            for decision_id, ack in inbox.unsent_acks():
                sent.append(decision_id)
                inbox.sent(decision_id, ack)
            if finished and not inbox.has_unsent_acks():
                return

    run_both(training_side, io_side)
    assert sorted(sent) == list(range(1, N + 1))


def test_a_rewind_drops_ids_above_it_and_voids_the_decision_being_applied() -> None:
    inbox = Inbox()
    for i in (1, 2, 3, 4):
        inbox.put(ready(i))
    inbox.advance(4)
    first = inbox.take()
    assert first is not None and inbox.settle(first, AckCreate(outcome="applied", generation=1))
    taken = inbox.take()  # decision 2, being applied when the rewind comes
    assert taken is not None and taken.decision.id == 2
    inbox.mark_applied(5)
    inbox.rewind(1)
    assert not inbox.settle(taken, AckCreate(outcome="applied", generation=2))
    assert inbox.cursor == 1 and inbox.applied() == {1}
    assert inbox.take() is None  # 3 and 4 named decisions the coordinator lost
    assert [i for i, _ in inbox.unsent_acks()] == [1]


def test_a_rewind_keeps_ready_decisions_at_or_below_it() -> None:
    inbox = Inbox()
    for i in (1, 2, 3):
        inbox.put(ready(i))
    inbox.advance(3)
    taken = inbox.take()
    inbox.rewind(2)
    assert taken is not None and inbox.settle(taken, AckCreate(outcome="rejected", reason="x"))
    again = inbox.take()
    assert again is not None and again.decision.id == 2 and inbox.take() is None


def test_forgetting_the_worker_resets_everything_and_voids_the_decision_being_applied() -> None:
    inbox = Inbox()
    inbox.load([1, 2], cursor=5, acks={2: AckCreate(outcome="rejected", reason="x")})
    inbox.put(ready(6))
    inbox.put(ready(7))
    taken = inbox.take()
    inbox.reset()
    assert taken is not None and not inbox.settle(taken, AckCreate(outcome="rejected", reason="y"))
    state = inbox.state()
    assert (state.applied_ids, state.cursor, state.pending_acks) == ([], 0, [])
    assert inbox.take() is None


def test_a_decision_delivered_twice_is_taken_once() -> None:
    inbox = Inbox()
    inbox.put(ready(3))
    inbox.put(ready(3))
    taken = inbox.take()
    assert taken is not None and inbox.settle(taken, AckCreate(outcome="rejected", reason="x"))
    assert inbox.take() is None
    assert inbox.drain() == []


def test_resolving_skips_what_was_applied_and_draining_returns_the_rest_in_order() -> None:
    inbox = Inbox()
    for i in (4, 5, 6):
        inbox.put(ready(i))
    inbox.mark_applied(5)
    assert [d.id for d in inbox.drain()] == [4, 6]
    assert inbox.resolve(4, AckCreate(outcome="rejected", reason="left"))
    assert not inbox.resolve(5, AckCreate(outcome="rejected", reason="left"))
    assert [i for i, _ in inbox.unsent_acks()] == [4]


def test_an_ack_replaced_while_being_sent_stays_unsent() -> None:
    inbox = Inbox()
    inbox.put(ready(1))
    taken = inbox.take()
    assert taken is not None
    old = AckCreate(outcome="rejected", reason="old")
    inbox.settle(taken, old)
    [(decision_id, ack)] = inbox.unsent_acks()
    assert not inbox.resolve(1, AckCreate(outcome="rejected", reason="new"))  # already applied
    inbox.sent(decision_id, AckCreate(outcome="rejected", reason="other"))  # not the one queued
    assert inbox.unsent_acks() == [(1, old)]
    inbox.sent(decision_id, ack)
    assert inbox.unsent_acks() == []


def test_the_applied_ids_view_reads_and_writes_through_the_lock() -> None:
    inbox = Inbox()
    ids: MutableSet[int] = AppliedIds(inbox)  # typed as Federation.applied_ids is
    ids.add(3)
    ids.add(1)
    assert ids == {1, 3} and ids != {1} and 3 in ids and 2 not in ids and len(ids) == 2
    assert sorted(ids) == [1, 3] and list(ids) == [1, 3]
    ids.discard(3)
    assert ids == {1} and inbox.applied() == {1}
    with pytest.raises(KeyError):
        ids.remove(7)
