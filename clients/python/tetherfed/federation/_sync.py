"""Synchronous rounds (`Policy.sync_every`), the worker's side: FedAvg's and IFCA's step-paced
rounds (McMahan et al. 2017; Ghosh et al. 2020), where every client trains R local steps, then
the round averages (or re-clusters) before anyone trains on.

With `policy.sync_every = R`, at each step k that is a multiple of R:

1. `Federation.step()` opens the round (`SyncRounds.start`) and publishes a snapshot whatever
   the schedule: forced, so the I/O budget never pauses it and no later snapshot replaces it;
2. it then waits (`SyncRounds.wait`) until the round is settled, applying decisions as they come
   in: settled once the coordinator committed the round of that snapshot, i.e. the worker
   received decisions naming the snapshot's version (`Decision.own_snapshot.version`, every one
   of them: a round is committed at once, see `PAGE_LIMIT`) and they are applied, or a hold
   for that version or a later one (`messages.Hold.version`: the round decided nothing here);
3. after `policy.sync_timeout_s` without that, it trains on; the I/O thread logs one line naming
   the missing peers (active workers whose latest snapshot is below step k, as the coordinator
   lists them) and the round's decisions, when they come, are applied at a later step, as in
   asynchronous rounds.

The coordinator defers scoring a publish at a round step until every active peer's latest
snapshot reached that step (or `sync_timeout_s` passed since the publish;
`tetherfed_coordinator.rounds`), so the round compares the peers' step-k snapshots. Only active
workers count: a peer that left, or whose heartbeat lapsed, is not waited for.

Threads: the I/O thread reports what it learns (`published`: the version a publish was given;
`polled`: a page of this worker's decisions and its hold, once the page's decisions are in the
inbox); the training thread waits in `wait`. One condition variable guards both sides.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from tether_protocol.messages import DecisionsPublic, Policy, WorkerPublic
from tetherfed.client._errors import NotFoundError, TetherError
from tetherfed.client._sdk import Client

log = logging.getLogger("tetherfed.federation")

# Decisions in one long-poll page (the coordinator's default `limit`, api/decisions.py): a full
# page may end inside a round, so its last round counts as settled only from the next page.
PAGE_LIMIT = 100
# At most this many peers whose heartbeat step reached k are asked for their latest snapshot's
# step when a round times out (one request each); others are assumed to have published.
MAX_CONFIRM = 16


class SyncRounds:
    """The round a worker waits for, and what the I/O thread learned about it.

    `wake` is called (without the lock) when the I/O thread has something to do for a round:
    name the missing peers of one that timed out. `stats` is the `FederationStats` whose
    `rounds`, `rounds_timed_out` and `round_wait_s` (seconds) it counts.
    """

    def __init__(self, stats: _RoundStats, wake: Callable[[], None] = lambda: None) -> None:
        self._stats, self._wake = stats, wake
        self._cond = threading.Condition()
        self._worker: str | None = None  # the registration the versions below belong to
        self._open: int | None = None  # the step of the round being waited for
        self._timeout_s = math.inf
        self._version: int | None = None  # the version its snapshot was published as
        self._settled = 0  # every round up to this own snapshot version is settled
        self._late: list[tuple[int, float]] = []  # (step, timeout) of timed-out rounds

    # -- training thread ------------------------------------------------------------------------
    def start(self, policy: Policy | None, step: int) -> bool:
        """Open a synchronous round at `step` if the policy has them and `step` is a multiple of
        `sync_every` (step 0 never is); whether one was opened. Open it before offering the
        round's snapshot: the I/O thread publishes the snapshot of an open round at once."""
        every = policy.sync_every if policy is not None else None
        if policy is None or every is None or step <= 0 or step % every:
            return False
        with self._cond:
            self._open, self._version, self._timeout_s = step, None, policy.sync_timeout_s
        return True

    def is_open(self, step: int) -> bool:
        """Whether the round at `step` is open (its snapshot is forced)."""
        with self._cond:
            return self._open == step

    def wait(self, step: int, apply: Callable[[], object]) -> bool:
        """Wait until the round opened at `step` is settled, calling `apply` (which applies the
        decisions the inbox holds) whenever decisions may have come and once more at the end;
        at most the policy's `sync_timeout_s`. True if settled; False on timeout, when the
        I/O thread is asked to log the missing peers."""
        started = time.monotonic()
        deadline = started + self._timeout_s
        settled = False
        while True:
            with self._cond:
                settled = self._settled_now(step)
            apply()  # without the lock: the I/O thread keeps reporting meanwhile
            if settled:
                break
            with self._cond:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._late.append((step, self._timeout_s))
                    break
                if not self._settled_now(step):
                    self._cond.wait(left)
        with self._cond:
            if self._open == step:
                self._open = None
            self._stats.rounds += 1
            self._stats.rounds_timed_out += not settled
            self._stats.round_wait_s += time.monotonic() - started
        if not settled:
            self._wake()
        return settled

    def _settled_now(self, step: int) -> bool:
        """Whether the round at `step` is settled (the caller holds the lock)."""
        return self._open == step and self._version is not None and self._settled >= self._version

    # -- I/O thread -----------------------------------------------------------------------------
    def published(self, worker_id: str, step: int, version: int) -> None:
        """A snapshot of `step` was published as `version` (by registration `worker_id`)."""
        with self._cond:
            self._same_worker(worker_id)
            if self._open == step:
                self._version = version
            self._cond.notify_all()

    def polled(self, worker_id: str, page: DecisionsPublic) -> None:
        """A long-poll page of `worker_id`'s decisions, its decisions already in the inbox."""
        versions = [d.own_snapshot.version for d in page.data]
        if versions and len(page.data) >= PAGE_LIMIT:  # its last round may go on next page
            last = max(versions)
            versions = [v for v in versions if v < last]
        if page.hold is not None:
            versions.append(page.hold.version)
        with self._cond:
            self._same_worker(worker_id)
            self._settled = max([self._settled, *versions])
            self._cond.notify_all()

    def _same_worker(self, worker_id: str) -> None:
        """Versions start over under a new registration (the caller holds the lock)."""
        if worker_id != self._worker:
            self._worker, self._settled, self._version = worker_id, 0, None

    def late(self) -> list[tuple[int, float]]:
        """(step, sync_timeout_s) of each round that timed out since the last call."""
        with self._cond:
            late, self._late = self._late, []
            return late


class _RoundStats(Protocol):
    """What `SyncRounds` counts (`FederationStats` has these fields)."""

    rounds: int
    rounds_timed_out: int
    round_wait_s: float


def report_late(
    client: Client, federation: str, worker_id: str, step: int, timeout_s: float
) -> None:
    """Log one line for a round at `step` not settled within `timeout_s`: the active peers
    whose latest snapshot is below `step` (or why they could not be listed). Network calls:
    the I/O thread's."""
    head = f"synchronous round at step {step} not decided within sync_timeout_s {timeout_s:g} s"
    try:
        workers = client.list_workers(federation).data
        missing = missing_peers(
            workers, worker_id, step, lambda w: _snapshot_step(client, federation, w)
        )
    except TetherError as error:
        log.warning("%s (peers could not be listed: %s); training on", head, error)
        return
    if missing:
        log.warning(
            "%s: waited for %d peer(s) whose latest snapshot is below step %d: %s; training on",
            head,
            len(missing),
            step,
            ", ".join(missing),
        )
    else:
        log.warning(
            "%s: every active peer published step %d, scoring was late; training on", head, step
        )


def _snapshot_step(client: Client, federation: str, worker_id: str) -> int | None:
    """The step of a worker's latest snapshot (None: it has none)."""
    try:
        return client.tethers(federation, worker_id).step
    except NotFoundError:
        return None


def missing_peers(
    workers: Sequence[WorkerPublic],
    own: str,
    step: int,
    snapshot_step: Callable[[str], int | None],
) -> list[str]:
    """The active workers but `own` whose latest snapshot is below `step`, as "name (id)".

    A worker's `step` is an upper bound of its latest snapshot's step (heartbeats and publishes
    set it): one with none, or below `step`, or no snapshot at all is missing without asking;
    for the others `snapshot_step` (their latest snapshot's step, None without one) is asked,
    for at most MAX_CONFIRM of them."""
    missing, unsure = [], []
    for w in workers:
        if w.status != "active" or w.worker_id == own:
            continue
        if w.snapshot_version == 0 or w.step is None or w.step < step:
            missing.append(w)
        else:
            unsure.append(w)
    for w in unsure[:MAX_CONFIRM]:
        latest = snapshot_step(w.worker_id)
        if latest is None or latest < step:
            missing.append(w)
    return [f"{w.name} ({w.worker_id})" for w in sorted(missing, key=lambda w: w.worker_id)]
