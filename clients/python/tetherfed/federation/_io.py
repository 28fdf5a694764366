"""The I/O thread: all of a worker's network work, off the training thread.

It registers through the session, publishes the snapshots the training thread offers (at most
`io_budget` of the wall clock; the newest unsent snapshot replaces an older one), sends acks and
telemetry, heartbeats, long-polls decisions and fetches their partner tethers into the inbox.
When the coordinator is unreachable it logs one warning per outage, keeps the latest unsent
snapshot, and retries with exponential backoff and jitter.

What the training thread hands it (snapshots, telemetry, its progress) goes through the methods
under "training thread" below, which take this object's lock; decisions and acks go through the
inbox.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from tether_protocol.frame import (
    MISSING_KEY,
    Frame,
    FrameError,
    encode_parts,
    probe_gram_name,
    split_entries,
    with_parts,
)
from tether_protocol.messages import (
    MAX_ACKS,
    MAX_PARTNER_FETCH,
    AckCreate,
    AckItem,
    AckResult,
    Decision,
    DecisionsPublic,
    SnapshotMeta,
    WireDType,
)
from tether_protocol.sketch import encode_sketch_frame
from tether_protocol.telemetry import MAX_POINTS, TelemetryCreate, TelemetryPoint
from tetherfed.client._errors import (
    APIError,
    AuthError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    TetherError,
)
from tetherfed.tethers._tethering import INIT_DIGEST_KEY

from ._inbox import Inbox, Ready
from ._session import Progress, Session
from ._sync import SyncRounds, report_late

# Starlette's answer for a path no route serves: an older coordinator without a batch route.
ROUTE_NOT_FOUND = "Not Found"

log = logging.getLogger("tetherfed.federation")
TELEMETRY_BUFFER = 8192  # telemetry points held while the coordinator is unreachable
MAX_PUBLISH_PAUSE_S = 10.0  # the longest pause the I/O budget puts between two publishes


@dataclass
class FederationStats:
    """Counters of one Federation (since it was created: a resumed one starts at zero).

    `steps`: `step()` calls. `scheduled`: publishes due (every `publish_every` steps, or when the
    plateau trigger fired). `snapshots`: snapshots taken at step boundaries. `published`: frames
    the I/O thread sent. `skipped`: scheduled publishes never sent because a later snapshot took
    their place: one falls due while the I/O thread pauses to keep publishing within
    `io_budget`, or is still sending (or retrying) the previous one; the latest wins. A due
    publish not yet taken when the Federation closes counts as skipped too, so after a clean
    `close()` `scheduled == published + skipped`. `merges_applied`: merge decisions applied
    (kept by the merge gate). `failures`: failed network calls. `telemetry_sent` and
    `telemetry_dropped`: telemetry points. Synchronous rounds (`policy.sync_every`, `_sync`):
    `rounds` waited for, `rounds_timed_out` of them (trained on after `sync_timeout_s`), and
    `round_wait_s`, the seconds `step()` spent waiting in them."""

    snapshots: int = 0
    published: int = 0
    failures: int = 0
    telemetry_sent: int = 0
    telemetry_dropped: int = 0
    steps: int = 0
    scheduled: int = 0
    skipped: int = 0
    merges_applied: int = 0
    rounds: int = 0
    rounds_timed_out: int = 0
    round_wait_s: float = 0.0

    @property
    def merges_per_100_steps(self) -> float:
        """Merges applied per 100 steps (0.0 before the first step)."""
        return 100.0 * self.merges_applied / self.steps if self.steps else 0.0


@dataclass
class Snapshot:
    """Tethers copied into host buffers at a step boundary, with the step's progress."""

    buffers: dict[str, Tensor]
    progress: tuple[int, int, float | None, float | None, bool]  # step, epoch, loss, grad, plateau
    generations: dict[str, int]
    index: int  # which of the two host buffer sets holds it
    event: Any = None  # a torch.cuda.Event when the copies were non-blocking
    grams: dict[str, Any] = field(default_factory=dict)  # layer → probe Gram (cka)
    forced: bool = False  # a synchronous round's: published at once, never replaced
    # layer → part entry name → host buffer (merge_scope weights or model: `fc1@weight`)
    parts: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    def meta(self, worker_id: str, wire_dtype: WireDType) -> SnapshotMeta:
        """The snapshot's metadata as published (built here, on the I/O thread)."""
        step, epoch, loss, grad_norm, fired = self.progress
        return SnapshotMeta(
            worker_id=worker_id,
            step=step,
            epoch=epoch,
            loss=loss,
            grad_norm=grad_norm,
            plateau=fired,
            wire_dtype=wire_dtype,
            generations=self.generations,
        )


@dataclass(frozen=True)
class IOSettings:
    """How the I/O thread paces its work (see `Federation`'s arguments)."""

    wire_dtype: WireDType
    heartbeat_s: float
    poll_wait_s: float
    io_budget: float
    device: torch.device


class IOThread:
    """The background thread of one Federation, and the state only it changes."""

    def __init__(
        self, session: Session, inbox: Inbox, stats: FederationStats, settings: IOSettings
    ) -> None:
        self.session, self._inbox, self.stats, self._settings = session, inbox, stats, settings
        self._client = session.client
        self._stop = threading.Event()
        self._closing = threading.Event()
        # Guards what the training thread reads or hands over: the snapshot slot, the publish
        # schedule, telemetry waiting to go out, and the progress heartbeats report.
        self._lock = threading.Lock()
        self._pending: Snapshot | None = None
        self._sending: int | None = None  # the buffer set being published
        self._failing = False  # the last publish failed: a newer snapshot may replace it
        self._next_publish = 0.0
        self._progress = Progress()
        # Telemetry waits here (oldest dropped past the bound, counted).
        self._telemetry: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=TELEMETRY_BUFFER
        )
        self._full_next = False  # under a sketch policy: the coordinator asked for a full publish
        self._init_checked: set[str] = set()  # partners whose init_digest was compared
        self._init_warned = False
        # Set when the loop has something to do at once: a snapshot offered, a long poll
        # answered, a synchronous round timed out, stopping. The decision long poll runs on its
        # own thread (`_poll`) so that nothing waits behind it.
        self._wake = threading.Event()
        self.rounds = SyncRounds(stats, self._wake.set)
        self._polling: tuple[str, int, Future[tuple[DecisionsPublic, int | None]]] | None = None
        self._thread = threading.Thread(target=self._run, name="tetherfed-io", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    # -- training thread ------------------------------------------------------------------------
    def record(self, progress: Progress) -> None:
        """The training thread's latest step, for the next heartbeat."""
        with self._lock:
            self._progress = progress

    def can_snapshot(self) -> bool:
        """Whether a snapshot taken now could be sent: while the thread is busy or within its
        budget pause, a due snapshot waits for the next step boundary instead of being copied
        and then replaced (latest wins, without the copies)."""
        with self._lock:
            pending = self._pending
            fresh = pending is None or (
                self._failing and self._sending is None and not pending.forced
            )
            return fresh and time.monotonic() >= self._next_publish

    def claim_buffers(self) -> int:
        """Withdraw the unsent snapshot (counted in `stats.skipped`) and return the buffer set
        to copy the next one into (the one not being published)."""
        with self._lock:
            self._replace_pending()
            return 1 - self._sending if self._sending is not None else 0

    def offer(self, snap: Snapshot) -> None:
        """Hand over a snapshot to publish (before registration completes it waits here); an
        unsent one it replaces is counted in `stats.skipped`. The snapshot of an open synchronous
        round is forced: published at once, whatever the I/O budget."""
        snap.forced = self.rounds.is_open(snap.progress[0])
        with self._lock:
            self._replace_pending()
            self._pending = snap
        self._wake.set()

    def skip(self) -> None:
        """Count a scheduled publish that a later one replaced before it was taken."""
        with self._lock:
            self.stats.skipped += 1

    def _replace_pending(self) -> None:
        """Drop the unsent snapshot, counting it as skipped (the caller holds the lock)."""
        if self._pending is not None:
            self.stats.skipped += 1
            self._pending = None

    def queue_telemetry(self, points: list[dict[str, Any]]) -> None:
        """Queue telemetry points; past the bound the oldest are dropped and counted."""
        with self._lock:
            room = TELEMETRY_BUFFER - len(self._telemetry)
            self.stats.telemetry_dropped += max(0, len(points) - room)
            self._telemetry.extend(points)

    def stop(self, flush_timeout_s: float) -> None:
        """Let the thread publish the last snapshot and send pending acks and telemetry (at
        most `flush_timeout_s`), then stop it."""
        self._closing.set()
        if not self.session.registered.is_set():
            self._stop.set()  # nothing was or could be published: no flush to wait for
        self._wake.set()
        self._thread.join(timeout=flush_timeout_s + self._settings.poll_wait_s)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=self._settings.poll_wait_s + 10.0)

    def farewell(self, leave: bool, why: str) -> None:
        """After `stop`: send the remaining acks and, with `leave`, ack `rejected` (with `why`)
        what will not be applied and leave; otherwise end the session so a resumed process may
        take the id at once. Closes the client."""
        registered = self.session.worker_id is not None and self.session.registered.is_set()
        try:
            if leave and registered:
                self._reject_unapplied(why)
            self._send_acks()
            if leave and registered:
                self._client.leave(self.session.federation, str(self.session.worker_id))
            elif registered:
                self.session.heartbeat(self._current(), ending=True)
        except TetherError as error:
            log.warning("could not leave federation cleanly: %s", error)
        self._client.close()

    # -- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        outage = _Outage()
        last_beat = 0.0
        while not self._stop.is_set() and self.session.refusal is None:
            try:
                if not self._round():
                    return  # flushed: close() takes it from here
                if time.monotonic() - last_beat >= self._settings.heartbeat_s:
                    self.session.heartbeat(self._current())
                    last_beat = time.monotonic()
                self._poll()
                self.session.check_incarnation()
                self._report_late()
                outage.recovered()
            except TetherError as error:
                self.stats.failures += 1
                backoff = outage.failed(error)
                if self.session.refusal is None:  # refused for good: the loop ends at once
                    self._stop.wait(backoff)
            except Exception:  # a bug here must not kill training; say it loudly and retry
                log.exception("tetherfed I/O thread error; retrying")
                self._stop.wait(1.0)

    def _round(self) -> bool:
        """Register if needed, then send what waits; False once closing and all is flushed."""
        if self.session.worker_id is None or not self.session.registered.is_set():
            self.session.register(self._current())
        self._send_pending()
        self._send_acks()
        if self._slot_empty():
            self._send_telemetry()
        return not (self._closing.is_set() and self._flushed())

    def _current(self) -> Progress:
        with self._lock:
            return self._progress

    def _slot_empty(self) -> bool:
        with self._lock:
            return self._pending is None

    def _flushed(self) -> bool:
        """No snapshot and no telemetry waits to go out."""
        with self._lock:
            return self._pending is None and not self._telemetry

    # -- publishing -----------------------------------------------------------------------------
    def _take_pending(self) -> Snapshot | None:
        """The snapshot to publish now, marking its buffers busy; None if none, or the budget
        pause is not over (closing ends it)."""
        with self._lock:
            forced = self._pending is not None and self._pending.forced
            if time.monotonic() < self._next_publish and not (self._closing.is_set() or forced):
                return None
            snap, self._pending = self._pending, None
            if snap is not None:
                self._sending = snap.index
            return snap

    def _send_pending(self) -> None:
        snap = self._take_pending()
        if snap is None:
            return
        started = time.monotonic()
        try:
            # Acks queued before this snapshot go first, so the coordinator links the new
            # generation to the decision that made it.
            self._send_acks()
            self._publish(snap)
        except (BadRequestError, ConflictError, NotFoundError, AuthError) as error:
            self._refused(error)
            if self.session.worker_id is None:
                return  # forgotten: the next publish goes to a new registration, unpaused
        except TetherError:
            self._keep(snap)
            raise
        finally:
            with self._lock:
                self._sending = None
        self._pause(started)

    def _keep(self, snap: Snapshot) -> None:
        """A publish failed: keep its snapshot unless training already offered a newer one, and
        let training replace it meanwhile."""
        with self._lock:
            if self._pending is None:
                self._pending = snap
            else:
                self.stats.skipped += 1
            self._failing = True

    def _pause(self, started: float) -> None:
        """Publishing may take at most `io_budget` of the wall clock (it competes with training
        for the GIL and the CPU): a publish that took t s is followed by a pause of
        t · (1/io_budget − 1) s (none at 1); snapshots due meanwhile coalesce, the latest wins
        (`stats.skipped` counts the others). A publish slowed by an outage or a coordinator
        just restarted pauses at most MAX_PUBLISH_PAUSE_S (19× a 5 s publish would stop
        publishing for 95 s)."""
        now = time.monotonic()
        pause = (now - started) * (1.0 / self._settings.io_budget - 1.0)
        with self._lock:
            self._next_publish = now + min(pause, MAX_PUBLISH_PAUSE_S)

    def _publish(self, snap: Snapshot) -> None:
        if snap.event is not None:
            snap.event.synchronize()
        worker_id, wire_dtype = self.session.worker_id, self._settings.wire_dtype
        assert worker_id is not None
        tensors = {name: buf.numpy() for name, buf in snap.buffers.items()}
        # A sketch frame carries the tethers' sketches only (cka's probe Grams go in full ones).
        if not self._publish_sketch(snap, tensors):
            # Each layer's parts right after its tether (a pin of the layer keeps few segments).
            host = {k: {n: b.numpy() for n, b in v.items()} for k, v in snap.parts.items()}
            tensors = with_parts(tensors, host)
            tensors |= {probe_gram_name(name): gram for name, gram in snap.grams.items()}
            parts = encode_parts(tensors, snap.meta(worker_id, wire_dtype), wire_dtype)
            accepted = self._client.publish(self.session.federation, worker_id, parts)
            self.rounds.published(worker_id, snap.progress[0], accepted.version)
            self._full_next = False
        self.stats.published += 1
        with self._lock:
            self._failing = False

    def _publish_sketch(self, snap: Snapshot, tensors: Mapping[str, Any]) -> bool:
        """Under a sketch policy, publish the sketch frame unless a full publish is due (every
        `full_every`-th, or asked for); False when the full frame should go instead."""
        policy, worker_id = self.session.policy, self.session.worker_id
        sketch = policy.sketch if policy is not None else None
        if sketch is None or self._full_next or self.stats.published % sketch.full_every == 0:
            return False
        assert worker_id is not None
        frame = encode_sketch_frame(tensors, snap.meta(worker_id, "float32"), sketch)
        try:
            accepted = self._client.publish_sketch(self.session.federation, worker_id, frame)
        except ConflictError:  # the federation's policy dropped its sketch since we registered
            self.session.drop_sketch()
            return False
        self._full_next = accepted.full_requested
        self.rounds.published(worker_id, snap.progress[0], accepted.version)
        return True

    def _refused(self, error: APIError) -> None:
        """The coordinator refused the publish for good: drop it; the session registers again
        if the worker is gone from the federation."""
        log.warning("publish refused, snapshot dropped: %s", error)
        with self._lock:
            self._failing = False
        self.session.publish_refused(error)

    # -- acks and telemetry ---------------------------------------------------------------------
    def _send_acks(self) -> None:
        """Send the waiting acks, in order, in one request (`POST …/acks`, at most MAX_ACKS a
        request); a transport error, 5xx or auth error (raised) keeps them all for the next try
        (sending one again is safe: the same ack again is a 200), an ack the coordinator
        refuses (already acked otherwise, unknown decision) is dropped with a warning. A
        coordinator without the batch route (an older version: 404 "Not Found") gets them one
        request each."""
        while unsent := self._inbox.unsent_acks()[:MAX_ACKS]:
            items = [AckItem(decision_id=i, **ack.model_dump()) for i, ack in unsent]
            try:
                batch = self._client.ack_many(self.session.federation, items)
                results = {r.decision_id: r for r in batch.data}
            except NotFoundError as error:
                if error.detail != ROUTE_NOT_FOUND:
                    results = self._refused_all(unsent, error)
                else:
                    results = {i: self._ack_one(i, ack) for i, ack in unsent}
            except (BadRequestError, ConflictError) as error:
                results = self._refused_all(unsent, error)
            for decision_id, ack in unsent:
                result = results.get(decision_id)
                if result is not None and result.status >= 400:
                    log.warning("ack of decision %d refused: %s", decision_id, result.detail)
                self._inbox.sent(decision_id, ack)

    @staticmethod
    def _refused_all(unsent: list[tuple[int, AckCreate]], error: APIError) -> dict[int, AckResult]:
        """The whole batch refused for good (its federation is gone): a refusal for each ack."""
        return {
            i: AckResult(decision_id=i, status=error.status, detail=str(error.detail))
            for i, _ in unsent
        }

    def _ack_one(self, decision_id: int, ack: AckCreate) -> AckResult:
        try:
            self._client.ack(self.session.federation, decision_id, ack)
        except (BadRequestError, NotFoundError, ConflictError) as error:
            return AckResult(decision_id=decision_id, status=error.status, detail=str(error.detail))
        return AckResult(decision_id=decision_id, status=200)

    def _send_telemetry(self) -> None:
        worker_id = self.session.worker_id
        while worker_id is not None and (batch := self._telemetry_batch()):
            try:
                body = TelemetryCreate(data=[TelemetryPoint.model_validate(p) for p in batch])
                self._client.post_telemetry(self.session.federation, worker_id, body)
            except (ValueError, BadRequestError, NotFoundError, ConflictError) as error:
                log.warning("telemetry refused, %d points dropped: %s", len(batch), error)
                with self._lock:
                    self.stats.telemetry_dropped += len(batch)
                continue
            except TetherError:  # transport, 5xx, auth: they wait for the next try
                with self._lock:
                    self._telemetry.extendleft(reversed(batch))
                raise
            self.stats.telemetry_sent += len(batch)

    def _telemetry_batch(self) -> list[dict[str, Any]]:
        """Up to MAX_POINTS waiting points, oldest first."""
        with self._lock:
            count = min(MAX_POINTS, len(self._telemetry))
            return [self._telemetry.popleft() for _ in range(count)]

    # -- decisions ------------------------------------------------------------------------------
    def _poll(self) -> None:
        """Long-poll this worker's decisions on the poll thread and wait here until the page
        comes, a snapshot is offered (the loop publishes it, then comes back for the page:
        a snapshot never waits behind a long poll) or the wait is over; then queue the page's
        decisions, their partner tethers fetched."""
        worker_id, federation = self.session.worker_id, self.session.federation
        assert worker_id is not None
        self._wake.clear()  # before looking: an offer from now on ends the wait below
        wait = self._poll_wait()
        if wait is None or self._stop.is_set():
            return  # publish first; or stopping (the poll thread may be shut down)
        if self._polling is None:
            after = self._inbox.cursor
            call = self._long_poll(federation, worker_id, after, wait)
            self._polling = (worker_id, after, call)
        polled_by, after, call = self._polling
        if not call.done():
            self._wake.wait(wait)
            if not call.done():
                return
        self._polling = None
        page, last = call.result()  # a failed poll raises here, on the loop's thread
        if polled_by != self.session.worker_id or after != self._inbox.cursor:
            return  # registered anew, or rewound, meanwhile: poll again
        self.session.held(page.hold)
        if last is not None and last < after:
            self._rewind(last, after)
            return  # poll again from there
        fetched = self._fetch_partners(
            [d for d in page.data if d.action != "hold" and not self._inbox.is_applied(d.id)]
        )
        for decision in page.data:
            if decision.action != "hold" and not self._inbox.is_applied(decision.id):
                self._inbox.put(self._prepare(decision, fetched))
            # Only once it is queued: a failed partner fetch re-polls the decision.
            self._inbox.advance(decision.id)
        self.rounds.polled(polled_by, page)

    def _long_poll(
        self, federation: str, worker_id: str, after: int, wait: float
    ) -> Future[tuple[DecisionsPublic, int | None]]:
        """Start the long poll on a poll thread of its own (a daemon: closing never waits for
        a poll in flight, whose answer is dropped); the future of the page and the
        federation's last decision id (`X-Tether-Last-Decision`: only long polls carry it, and
        one runs at a time). Its end wakes the loop."""
        call: Future[tuple[DecisionsPublic, int | None]] = Future()

        def poll() -> None:
            call.set_running_or_notify_cancel()
            try:
                page = self._client.worker_decisions(federation, worker_id, after=after, wait=wait)
                call.set_result((page, self._client.last_decision))
            except BaseException as error:  # handed to the loop's thread
                call.set_exception(error)
            self._wake.set()

        threading.Thread(target=poll, name="tetherfed-poll", daemon=True).start()
        return call

    def _report_late(self) -> None:
        """Log the missing peers of each synchronous round that timed out (`_sync`)."""
        worker_id = self.session.worker_id
        for step, timeout_s in self.rounds.late():
            if worker_id is not None:
                report_late(self._client, self.session.federation, worker_id, step, timeout_s)

    def _poll_wait(self) -> float | None:
        """How long to long-poll (the poll thread sleeps in a socket read, holding no GIL):
        until the next publish is due, not at all while acks wait or when stopping; None when
        a snapshot is due to publish first (a synchronous round's at once)."""
        with self._lock:
            pending = self._pending
            waiting, until_publish = pending is not None, self._next_publish - time.monotonic()
        if waiting and (until_publish <= 0 or (pending is not None and pending.forced)):
            return None
        wait = (
            min(self._settings.poll_wait_s, until_publish)
            if waiting
            else self._settings.poll_wait_s
        )
        if self._inbox.has_unsent_acks() or self._stop.is_set():
            wait = 0.0
        return round(wait, 3)

    def _rewind(self, last: int, cursor: int) -> None:
        """The federation's decisions end below this worker's cursor: Redis lost decisions the
        worker saw (restored from an older copy, a failover to a lagging replica), and the ids
        after `last` will name new decisions. Poll from `last`, forget applied ids above it."""
        log.warning(
            "federation %r has decisions up to id %d only, below this worker's cursor %d: the "
            "coordinator lost decisions; polling again from %d",
            self.session.federation,
            last,
            cursor,
            last,
        )
        self._inbox.rewind(last)

    def _fetch_partners(self, decisions: list[Decision]) -> dict[int, Ready]:
        """The partner tethers of a page's decisions in one request (`GET …/decisions/tethers`:
        a FedAvg round of N workers and L layers is one request, not (N − 1) × L), each ready
        to queue, or refused with the coordinator's reason. Empty against a coordinator without
        that route (an older version: 404 "Not Found") or for bytes that do not decode:
        `_prepare` then fetches each decision's layer on its own."""
        wanted = [
            d
            for d in decisions
            if d.operator != "decouple" and d.partner_id is not None and d.partner_snapshot
        ]
        worker_id = self.session.worker_id
        if not wanted or worker_id is None:
            return {}
        out: dict[int, Ready] = {}
        for at in range(0, len(wanted), MAX_PARTNER_FETCH):
            chunk = wanted[at : at + MAX_PARTNER_FETCH]
            try:
                frame = self._client.decision_tethers(
                    self.session.federation, worker_id, [d.id for d in chunk]
                )
                missing = json.loads(frame.extra_metadata.get(MISSING_KEY, "{}"))
            except NotFoundError as error:
                if error.detail != ROUTE_NOT_FOUND:
                    raise
                return out
            except (FrameError, ValueError):
                continue
            out.update(self._ready_from(chunk, frame, missing))
        return out

    def _ready_from(
        self, decisions: list[Decision], frame: Frame, missing: Mapping[str, str]
    ) -> dict[int, Ready]:
        """Each decision with its tether from a `decision_tethers` frame, or why it has none."""
        parts = split_entries(frame.entries).parts
        out: dict[int, Ready] = {}
        for d in decisions:
            key = str(d.id)
            if key not in frame.tensors:
                why = missing.get(key, "the coordinator sent no tether for it")
                out[d.id] = Ready(d, None, f"partner tether unavailable: {why}")
                continue
            self._check_init(cast(str, d.partner_id))
            # "7@weight" → "fc1@weight": the names `_apply` checks against the merge scope.
            named = {d.layer + name[len(key) :]: name for name in parts.get(key, {})}
            own_parts = {
                layer_name: self._host_copy(frame.tensors[n]) for layer_name, n in named.items()
            }
            out[d.id] = Ready(d, self._host_copy(frame.tensors[key]), parts=own_parts)
        return out

    def _prepare(self, decision: Decision, fetched: Mapping[int, Ready]) -> Ready:
        """The decision with its partner tether (exactly the snapshot that was scored, never a
        newer one published since): taken from `fetched` (`_fetch_partners`), else fetched on
        its own; or why it cannot be applied."""
        if decision.operator == "decouple" or decision.partner_id is None:
            return Ready(decision, torch.zeros(0))
        if decision.id in fetched:
            return fetched[decision.id]
        ref = decision.partner_snapshot
        try:
            frame = self._client.tether_frame(
                self.session.federation,
                decision.partner_id,
                decision.layer,
                version=None if ref is None else ref.version,
            )
        except NotFoundError as error:
            return Ready(decision, None, f"partner tether unavailable: {error.detail}")
        except FrameError as error:  # the partner's bytes are not a usable tether
            return Ready(decision, None, f"partner tether refused: {error}")
        if decision.layer not in frame.tensors:
            return Ready(decision, None, f"partner tether refused: no layer {decision.layer!r}")
        self._check_init(decision.partner_id)
        # The parts published with the tether (merge_scope weights or model); `_apply` checks
        # them against what the scope needs.
        named = split_entries(frame.entries).parts.get(decision.layer, {})
        parts = {name: self._host_copy(frame.tensors[name]) for name in named}
        return Ready(decision, self._host_copy(frame.tensors[decision.layer]), parts=parts)

    def _host_copy(self, array: Any) -> Tensor:
        """A float32 tensor copied off the response buffer here, on the I/O thread; pinned on
        CUDA so the training thread's host-to-device copy can be non-blocking."""
        tensor = torch.from_numpy(np.array(array, dtype=np.float32))
        return tensor.pin_memory() if self._settings.device.type == "cuda" else tensor

    def _check_init(self, partner: str) -> None:
        """Under merge_scope weights or model, warn once (per Federation) when a partner's
        registered `init_digest` differs from ours: averaging the weights of independently
        initialised models means nothing without aligning their units first (Entezari et al.
        2022, "The Role of Permutation Invariance in Linear Mode Connectivity"). Each partner
        is looked up once; a failed lookup is not retried (it is only a diagnostic)."""
        policy = self.session.policy
        if policy is None or policy.merge_scope == "tethers" or self._init_warned:
            return
        if partner in self._init_checked:
            return
        self._init_checked.add(partner)
        ours = self.session.meta.get(INIT_DIGEST_KEY)
        try:
            theirs = self._client.get_worker(self.session.federation, partner).meta.get(
                INIT_DIGEST_KEY
            )
        except TetherError:
            return
        if ours is not None and theirs is not None and theirs != ours:
            self._init_warned = True
            log.warning(
                "merge_scope %s: worker %s started from another init (%s %s, ours %s): "
                "averaging independently initialised weights means nothing without alignment",
                policy.merge_scope,
                partner,
                INIT_DIGEST_KEY,
                theirs,
                ours,
            )

    def _reject_unapplied(self, why: str) -> None:
        """Ack `rejected` (with `why`) each merge or drift this leaving worker received, or has
        waiting at the coordinator, and will not apply, so every decision it got ends acked."""
        pending = self._inbox.drain()
        worker_id = self.session.worker_id
        assert worker_id is not None
        page = self._client.worker_decisions(
            self.session.federation, worker_id, after=self._inbox.cursor, wait=0
        )
        for decision in [*pending, *page.data]:
            if decision.action != "hold":
                self._inbox.resolve(decision.id, AckCreate(outcome="rejected", reason=why))


class _Outage:
    """Backoff with full jitter while the coordinator is unreachable; one warning per outage."""

    def __init__(self, base_s: float = 0.2, cap_s: float = 5.0) -> None:
        self.base_s, self.cap_s = base_s, cap_s
        self.failures = 0

    def failed(self, error: TetherError) -> float:
        """Count a failure (warning on the first of an outage); the seconds to wait."""
        if self.failures == 0:
            log.warning("coordinator call failed, training continues and retries: %s", error)
        self.failures += 1
        return random.uniform(0.0, min(self.cap_s, self.base_s * 2.0 ** min(self.failures, 10)))

    def recovered(self) -> None:
        """A round succeeded: end the outage (saying so if there was one)."""
        if self.failures:
            log.warning("coordinator calls succeed again after %d failures", self.failures)
        self.failures = 0
