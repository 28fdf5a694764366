"""Synchronous rounds, the worker's side (`tetherfed.federation._sync`): when a round opens, when
it is settled, what a timeout reports. No coordinator: the I/O thread's reports are made here."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest

from tether_protocol.messages import (
    Decision,
    DecisionsPublic,
    Hold,
    Policy,
    SnapshotRef,
    WorkerPublic,
)
from tetherfed.federation._io import FederationStats
from tetherfed.federation._sync import PAGE_LIMIT, SyncRounds, missing_peers

SYNC = Policy(sync_every=5, sync_timeout_s=30.0)


def decision(i: int, version: int, step: int = 5) -> Decision:
    return Decision(
        id=i,
        federation="f",
        layer="fc1",
        worker_id="a",
        partner_id="b",
        action="merge",
        score=0.9,
        measure="pearson",
        merge_threshold=0.5,
        drift_threshold=None,
        operator="average",
        partner_snapshot=SnapshotRef(worker_id="b", version=version, step=step),
        own_snapshot=SnapshotRef(worker_id="a", version=version, step=step),
        epoch=0,
        reason="test",
    )


def page(*decisions: Decision, hold: Hold | None = None) -> DecisionsPublic:
    last = max((d.id for d in decisions), default=0)
    return DecisionsPublic(data=list(decisions), count=len(decisions), last_id=last, hold=hold)


def hold(version: int) -> Hold:
    return Hold(code="no_partner", reason="alone", step=5, version=version, at=datetime.now(UTC))


def test_a_round_opens_at_multiples_of_sync_every_only() -> None:
    rounds = SyncRounds(FederationStats())
    assert not rounds.start(None, 5), "no policy yet (unregistered): no round"
    assert not rounds.start(Policy(), 5), "asynchronous rounds: none"
    assert not rounds.start(SYNC, 4) and not rounds.start(SYNC, 0)
    assert rounds.start(SYNC, 10) and rounds.is_open(10) and not rounds.is_open(5)


def test_the_round_is_settled_once_its_decisions_came_and_are_applied() -> None:
    stats = FederationStats()
    rounds = SyncRounds(stats)
    assert rounds.start(SYNC, 5)
    applied: list[int] = []

    def io_thread() -> None:
        rounds.published("a", 5, 3)
        rounds.polled("a", page(decision(1, 2)))  # an older round's: not this one
        rounds.polled("a", page(decision(2, 3)))

    thread = threading.Thread(target=io_thread)
    thread.start()
    assert rounds.wait(5, lambda: applied.append(1))
    thread.join()
    assert applied, "the decisions in the inbox were applied before the wait ended"
    assert (stats.rounds, stats.rounds_timed_out) == (1, 0)
    assert not rounds.is_open(5)


def test_a_hold_for_the_snapshot_settles_the_round() -> None:
    rounds = SyncRounds(FederationStats())
    assert rounds.start(SYNC, 5)
    rounds.published("a", 5, 4)
    rounds.polled("a", page(hold=hold(3)))
    assert not rounds._settled_now(5), "a hold for an older snapshot says nothing of this round"
    rounds.polled("a", page(hold=hold(4)))
    assert rounds.wait(5, lambda: None)


def test_a_full_page_may_end_inside_its_last_round() -> None:
    rounds = SyncRounds(FederationStats())
    assert rounds.start(SYNC, 5)
    rounds.published("a", 5, 7)
    full = [decision(i, 6 if i < 10 else 7) for i in range(1, PAGE_LIMIT + 1)]
    rounds.polled("a", page(*full))
    assert not rounds._settled_now(5), "the rest of version 7's decisions may come next page"
    rounds.polled("a", page(decision(PAGE_LIMIT + 1, 7)))
    assert rounds._settled_now(5)


def test_versions_of_an_earlier_registration_settle_nothing() -> None:
    rounds = SyncRounds(FederationStats())
    assert rounds.start(SYNC, 5)
    rounds.polled("old", page(decision(1, 9)))
    rounds.published("new", 5, 1)
    assert not rounds._settled_now(5)
    rounds.polled("new", page(hold=hold(1)))
    assert rounds._settled_now(5)


def test_a_round_not_settled_in_time_trains_on_and_asks_for_the_missing_peers() -> None:
    stats = FederationStats()
    woken = threading.Event()
    rounds = SyncRounds(stats, woken.set)
    assert rounds.start(Policy(sync_every=5, sync_timeout_s=0.2), 5)
    rounds.published("a", 5, 1)
    assert not rounds.wait(5, lambda: None)
    assert woken.is_set(), "the I/O thread is woken to name the missing peers"
    assert rounds.late() == [(5, 0.2)] and rounds.late() == []
    assert (stats.rounds, stats.rounds_timed_out) == (1, 1)
    assert stats.round_wait_s == pytest.approx(0.2, abs=0.15)


def worker(wid: str, step: int | None, version: int, status: str = "active") -> WorkerPublic:
    return WorkerPublic(
        worker_id=wid,
        name=f"n-{wid}",
        federation="f",
        status=status,  # type: ignore[arg-type]
        layers=[],
        meta={},
        step=step,
        snapshot_version=version,
        registered_at=datetime.now(UTC),
    )


def test_missing_peers_are_the_active_ones_whose_latest_snapshot_is_below_the_round() -> None:
    workers = [
        worker("a", 10, 2),  # itself
        worker("b", 10, 2),  # at the round
        worker("c", 7, 1),  # behind
        worker("d", 12, 0),  # never published
        worker("e", 12, 3),  # stepped past 10 but its latest snapshot is older
        worker("f", 3, 1, status="left"),
        worker("g", 3, 1, status="lost"),
    ]
    latest = {"b": 10, "e": 5}
    asked: list[str] = []

    def snapshot_step(wid: str) -> int | None:
        asked.append(wid)
        return latest.get(wid)

    assert missing_peers(workers, "a", 10, snapshot_step) == ["n-c (c)", "n-d (d)", "n-e (e)"]
    assert sorted(asked) == ["b", "e"], "only peers whose heartbeat step reached 10 are asked"
