"""`Federation`: connects a tethered model to a coordinator without ever blocking training.

The training thread only calls `fed.step(...)` once per optimizer step. That call

1. applies decisions the I/O thread has already received and prepared (partner tether fetched),
   on the model's device, in place, at this step boundary — each decision id at most once;
2. on schedule (every `publish_every` steps, or when the plateau trigger fires) copies the tethers
   into host buffers (pinned, with non-blocking copies, on CUDA) and hands them to the I/O thread;
   if the network is slower than training, the newest snapshot replaces the unsent one.

The I/O thread does all network work: registration, publishes, heartbeats, polling for
decisions, fetching partner tethers, acks. When the coordinator is unreachable it logs one warning
per outage, keeps the latest unsent snapshot, and retries with exponential backoff and jitter.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import random
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import numpy as np
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from tether_protocol.frame import FrameError, encode_parts, probe_gram_name
from tether_protocol.messages import (
    AckCreate,
    Decision,
    Heartbeat,
    Hold,
    LayerSpec,
    Policy,
    SnapshotMeta,
    WireDType,
    WorkerCreate,
)
from tether_protocol.policy import plateau
from tether_protocol.sketch import encode_sketch_frame
from tether_protocol.telemetry import MAX_POINTS, TelemetryCreate, TelemetryPoint
from tetherfed.client._errors import (
    APIError,
    AuthError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    RefusedError,
    TetherError,
)
from tetherfed.client._retry import RetryPolicy
from tetherfed.client._sdk import Client
from tetherfed.tethers._ops import apply_operator_
from tetherfed.tethers._probe import Probe
from tetherfed.tethers._tethering import TetherParametrization, tethered_layers

log = logging.getLogger("tetherfed.federation")
TELEMETRY_BUFFER = 8192  # telemetry points held while the coordinator is unreachable
MAX_PUBLISH_PAUSE_S = 10.0  # the longest pause the I/O budget puts between two publishes
# The reason a leaving worker acks each decision it will not apply.
FINISHED = "the worker left (finished or stopped) before applying this decision"


@dataclass
class StepReport:
    """What one `Federation.step` did."""

    step: int
    published: bool = False
    applied: list[Decision] = field(default_factory=list)
    rejected: list[tuple[Decision, str]] = field(default_factory=list)
    gate: list[GateCheck] = field(default_factory=list)


@dataclass(frozen=True)
class GateCheck:
    """One merge the merge gate judged: probe loss before and after applying it, and whether
    the merge was kept (rise ≤ the policy's `gate.probe_loss_rise`) or rolled back."""

    decision: Decision
    loss_before: float
    loss_after: float
    kept: bool

    @property
    def rise(self) -> float:
        """Relative rise of the probe loss, (after − before) / before (inf from a zero loss)."""
        if self.loss_before > 0:
            return (self.loss_after - self.loss_before) / self.loss_before
        return 0.0 if self.loss_after <= self.loss_before else math.inf


@dataclass
class FederationStats:
    """Counters of one Federation: snapshots taken at step boundaries, frames the I/O thread
    sent (a snapshot replaced before it was sent is not), and failed network calls."""

    snapshots: int = 0
    published: int = 0
    failures: int = 0
    telemetry_sent: int = 0
    telemetry_dropped: int = 0


@dataclass
class _Ready:
    """A decision the I/O thread prepared: the partner tether, or why it cannot be applied."""

    decision: Decision
    partner: Tensor | None
    problem: str | None = None
    era: int = 0  # registrations so far when prepared: one of an earlier one is dropped


@dataclass
class _Snapshot:
    buffers: dict[str, Tensor]
    progress: tuple[int, int, float | None, float | None, bool]  # step, epoch, loss, grad, plateau
    generations: dict[str, int]
    index: int  # which of the two host buffer sets holds it
    event: Any = None  # a torch.cuda.Event when the copies were non-blocking
    grams: dict[str, Any] = field(default_factory=dict)  # layer → probe Gram (cka)

    def meta(self, worker_id: str, wire_dtype: WireDType) -> SnapshotMeta:
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


class Federation:
    """Federate a tethered model's tethers through a coordinator while it trains.

    >>> with Federation("http://127.0.0.1:8000", "demo", model) as fed:
    ...     for step, (x, y) in enumerate(loader):
    ...         loss = train_step(x, y)
    ...         fed.step(loss=loss.item(), epoch=epoch)

    `url` is one coordinator, or several replicas of one (a list, or URLs separated by commas),
    used with failover as `Client` does.

    `resume` takes a previous `state_dict()` (from a checkpoint) to continue under the same worker
    id with the same generations and applied decision ids. While another live process holds that
    id, resuming retries for `claim_wait_s` (a crashed one's heartbeat lapses), then `step()`
    raises `RefusedError`.

    `hold` is why the worker's latest scoring round gave it nothing to apply (a
    `tether_protocol.messages.Hold`: code, reason, layer, step, version; None before the first
    round or after one that decided a merge or drift); each new reason is logged once.

    `probe` (a `Probe` of the model and its task) enables what needs the probe batches: the
    probe Grams published with each snapshot when the policy's measure is `cka`, and the merge
    gate when the policy sets `gate` (without a probe, merges are applied ungated).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        federation: str,
        model: nn.Module,
        *,
        name: str = "worker",
        publish_every: int = 1,
        wire_dtype: WireDType = "float32",
        token: str | None = None,
        meta: Mapping[str, Any] | None = None,
        heartbeat_s: float = 2.0,
        poll_wait_s: float = 0.2,
        io_budget: float = 0.05,
        resume: Mapping[str, Any] | None = None,
        transport: httpx.BaseTransport | None = None,
        probe: Probe | None = None,
        claim_wait_s: float = 30.0,
    ) -> None:
        self._layers = tethered_layers(model)
        self._probe = probe
        if not self._layers:
            raise ValueError("the model has no tethered layers: call tetherfed.tether(model) first")
        self._specs = layer_specs(self._layers, wire_dtype)  # refused here, not in the I/O thread
        _check_registration(name, self._specs, meta or {})
        if publish_every < 1:
            raise ValueError(f"publish_every must be ≥ 1, got {publish_every}")
        self.federation, self.name = federation, name
        self.publish_every, self.wire_dtype = publish_every, wire_dtype
        self.heartbeat_s, self.poll_wait_s, self.claim_wait_s = (
            heartbeat_s,
            poll_wait_s,
            claim_wait_s,
        )
        if not 0.0 < io_budget <= 1.0:
            raise ValueError(f"io_budget must be in (0, 1], got {io_budget}")
        self.io_budget = io_budget
        # `_due`: a snapshot is scheduled but not yet taken
        self._next_publish, self._due = 0.0, False
        self._failing = False  # the last publish failed: a newer snapshot may replace it
        self._full_next = False  # under a sketch policy: the coordinator asked for a full publish
        self._due_plateau = False  # ... and the plateau trigger fired meanwhile
        self._meta = dict(meta or {})
        self._client = Client(url, token=token, transport=transport, retry=RetryPolicy(tries=1))
        # The session id names this process: a second one under the same worker id gets a 409.
        self._admin_token, self._ever_registered = token, False
        self._session, self._contested = secrets.token_hex(8), 0.0
        self.refusal: RefusedError | None = None  # set when the coordinator refused for good
        self._device = next(iter(self._layers.values())).storage().device
        self.policy: Policy | None = None
        self.worker_id: str | None = None
        # `_incarnation`: the federation incarnation this worker joined (one created anew has
        # another)
        self._token = self._incarnation = cast(str | None, None)
        # `_era`: registrations forgotten so far; `hold`: why the latest scoring round gave
        # this worker nothing to apply
        self._era, self.hold, self._hold_said = 0, cast(Hold | None, None), ""
        self.generations = {layer: 0 for layer in self._layers}
        self.applied_ids: set[int] = set()
        self.stats = FederationStats()
        self._cursor, self._step, self._epoch = 0, 0, 0
        self._loss: float | None = None
        self._grad_norm: float | None = None
        self._previous_loss: float | None = None
        # Acks not yet taken by the coordinator, in the order they were made; kept in
        # state_dict, so a worker killed between applying a decision and its ack acks on resume.
        self._ack_lock = threading.Lock()
        self._unsent: dict[int, AckCreate] = {}
        if resume:
            self._load(resume)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closing = threading.Event()
        self._pending: _Snapshot | None = None
        self._sending: int | None = None
        self._buffers = [self._host_buffers(), self._host_buffers()]
        self._ready: queue.SimpleQueue[_Ready] = queue.SimpleQueue()
        # Telemetry waits here for the I/O thread (oldest dropped past the bound, counted).
        self._telemetry: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=TELEMETRY_BUFFER
        )
        self._registered = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tetherfed-io", daemon=True)
        self._thread.start()

    # -- training thread ------------------------------------------------------------------------
    def step(
        self, loss: float | None = None, epoch: int = 0, grad_norm: float | None = None
    ) -> StepReport:
        """Call once per optimizer step: applies ready decisions, publishes on schedule.

        A non-finite `loss` or `grad_norm` (NaN, ±Inf) is recorded as unknown (null on the wire).
        Raises `RefusedError` once the coordinator refused this worker for good (unknown
        federation, token refused, invalid layer table); an unreachable coordinator never raises.
        """
        if self.refusal is not None:
            raise self.refusal
        self._step += 1
        loss, grad_norm = _finite_or_none(loss), _finite_or_none(grad_norm)
        self._epoch, self._loss, self._grad_norm = epoch, loss, grad_norm
        report = StepReport(step=self._step)
        self._apply_ready(report)
        fired = self.policy is not None and plateau(
            self.policy, loss, self._previous_loss, grad_norm
        )
        if self._step % self.publish_every == 0 or fired:
            self._due = True
            self._due_plateau |= fired
        if self._due and self._io_ready():
            report.published = self._snapshot(plateau_fired=self._due_plateau)
            self._due = self._due_plateau = False
            self.stats.snapshots += 1
        self._previous_loss = loss
        return report

    def _io_ready(self) -> bool:
        # A snapshot is copied only when the I/O thread could send it: while it is busy or
        # within its budget pause, a due snapshot waits for the next step boundary instead of
        # being copied and then replaced (latest wins, without the copies).
        fresh = self._pending is None or (self._failing and self._sending is None)
        return fresh and time.monotonic() >= self._next_publish

    def wait_registered(self, timeout: float) -> bool:
        """Block until the worker is registered (for scripts and tests); True if it is, False
        after `timeout` s or once the coordinator refused it for good (see `refusal`)."""
        deadline = time.monotonic() + timeout
        while not self._registered.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            if self.refusal is not None or time.monotonic() >= deadline:
                return False
        return True

    def telemetry(self, points: list[dict[str, Any]]) -> None:
        """Queue telemetry points (`tether_protocol.telemetry.TelemetryPoint` fields) for the
        I/O thread; returns at once. They are sent when no snapshot is waiting, so they never
        hold up a publish; while the coordinator is unreachable at most 8,192 wait (the oldest
        are dropped and counted in `stats.telemetry_dropped`)."""
        room = TELEMETRY_BUFFER - len(self._telemetry)
        self.stats.telemetry_dropped += max(0, len(points) - room)
        self._telemetry.extend(points)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume under the same id (store it in your checkpoint)."""
        return {
            "federation": self.federation,
            "worker_id": self.worker_id,
            "token": self._token,
            "incarnation": self._incarnation,
            "generations": dict(self.generations),
            "applied_ids": sorted(self.applied_ids),
            # Decisions are resolved in id order: everything above the last resolved one is
            # polled again after a resume (duplicates are skipped by applied_ids).
            "cursor": max(self.applied_ids, default=0),
            "step": self._step,
            "pending_acks": {str(i): a.model_dump(mode="json") for i, a in self._pending_acks()},
        }

    def _pending_acks(self) -> list[tuple[int, AckCreate]]:
        with self._ack_lock:
            return list(self._unsent.items())

    def _queue_ack(self, decision_id: int, ack: AckCreate) -> None:
        with self._ack_lock:
            self._unsent[decision_id] = ack

    def _load(self, state: Mapping[str, Any]) -> None:
        if state.get("federation") not in (None, self.federation):
            raise ValueError(
                f"checkpoint is for federation {state['federation']!r}, not {self.federation!r}"
            )
        self.worker_id, self._token = state.get("worker_id"), state.get("token")
        self._incarnation = state.get("incarnation")
        self.generations.update({k: int(v) for k, v in state.get("generations", {}).items()})
        self.applied_ids = {int(i) for i in state.get("applied_ids", [])}
        self._cursor = int(state.get("cursor", max(self.applied_ids, default=0)))
        self._step = int(state.get("step", 0))
        for i, ack in state.get("pending_acks", {}).items():
            self._queue_ack(int(i), AckCreate.model_validate(ack))

    def _apply_ready(self, report: StepReport) -> None:
        while True:
            try:
                ready = self._ready.get_nowait()
            except queue.Empty:
                return
            decision = ready.decision
            if decision.id in self.applied_ids or ready.era != self._era:
                continue  # delivered twice: applied once; or for a registration since forgotten
            problem = ready.problem or self._stale(decision)
            if problem is None and ready.partner is None:
                problem = "no partner tether"
            if problem is None and ready.partner is not None:
                problem = self._apply_gated(decision, ready.partner, report)
            if problem is not None:
                report.rejected.append((decision, problem))
                self._queue_ack(decision.id, AckCreate(outcome="rejected", reason=problem))
            self.applied_ids.add(decision.id)

    def _gated(self, decision: Decision) -> bool:
        gate = self.policy.gate if self.policy is not None else None
        return gate is not None and self._probe is not None and decision.action == "merge"

    def _apply_gated(self, decision: Decision, partner: Tensor, report: StepReport) -> str | None:
        """Apply (under the merge gate: evaluate, then keep or roll back) and queue the ack of
        what was applied or rolled back; the reason when the decision cannot be applied."""
        if not self._gated(decision):
            problem = self._apply(decision, partner)
            if problem is None:
                report.applied.append(decision)
                ack = AckCreate(outcome="applied", generation=self.generations[decision.layer])
                self._queue_ack(decision.id, ack)
            return problem
        assert self._probe is not None and self.policy is not None and self.policy.gate
        storage = self._layers[decision.layer].storage()
        previous = storage.detach().clone()
        before = self._probe.loss()
        problem = self._apply(decision, partner)
        if problem is not None:
            return problem  # nothing changed
        after = self._probe.loss()
        allowed = self.policy.gate.probe_loss_rise
        check = GateCheck(decision, before, after, kept=after <= before * (1.0 + allowed))
        report.gate.append(check)
        if check.kept:
            report.applied.append(decision)
            ack = AckCreate(
                outcome="applied",
                generation=self.generations[decision.layer],
                probe_loss_before=_finite_or_none(before),
                probe_loss_after=_finite_or_none(after),
            )
        else:
            with torch.no_grad():
                storage.copy_(previous)  # the exact previous tether (also learned logits)
            self.generations[decision.layer] -= 1
            reason = (
                f"merge gate: probe loss rose from {before:.6g} to {after:.6g} "
                f"({check.rise:+.2%} > {allowed:.2%} allowed); merge rolled back"
            )
            report.rejected.append((decision, reason))
            ack = AckCreate(
                outcome="rejected",
                reason=reason,
                probe_loss_before=_finite_or_none(before),
                probe_loss_after=_finite_or_none(after),
            )
        self._queue_ack(decision.id, ack)
        return None

    def _stale(self, decision: Decision) -> str | None:
        bound = self.policy.max_staleness_steps if self.policy else None
        ref = decision.partner_snapshot
        if bound is not None and ref is not None and abs(self._step - ref.step) > bound:
            return f"partner snapshot at step {ref.step} is more than {bound} steps from step {self._step}"
        if decision.layer not in self._layers:
            return f"layer {decision.layer!r} is not tethered here"
        return None

    def _apply(self, decision: Decision, partner: Tensor) -> str | None:
        """Apply a decision to its layer; the reason it cannot be applied (tether unchanged)."""
        tp: TetherParametrization = self._layers[decision.layer]
        if decision.operator is not None and decision.operator != "decouple":
            value = tp.current().detach().clone()
            try:
                apply_operator_(decision.operator, decision.params, value, partner)
                tp.set_(value)  # validates (finite, in [0, 1]) before it writes
            except ValueError as error:  # a partner's tensor never stops training
                return f"cannot apply {decision.operator}: {error}"
        self.generations[decision.layer] += 1
        return None

    def _host_buffers(self) -> dict[str, Tensor]:
        pin = self._device.type == "cuda"
        return {
            name: torch.empty(tuple(tp.storage().shape), dtype=torch.float32, pin_memory=pin)
            for name, tp in self._layers.items()
        }

    def _snapshot(self, plateau_fired: bool) -> bool:
        # Before registration completes the snapshot waits here like any unsent one.
        with self._lock:
            index = 1 - self._sending if self._sending is not None else 0
            self._pending = None  # claim: the I/O thread will not take these buffers now
        buffers = self._buffers[index]
        with torch.no_grad():
            for name, tp in self._layers.items():
                buffers[name].copy_(tp.current(), non_blocking=True)
        grams = {}
        if self._probe is not None and self.policy is not None and self.policy.measure == "cka":
            grams = self._probe.grams(self.policy.probe_seed, self.policy.probe_size)
        event = None
        if self._device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        # The metadata model is built on the I/O thread: the training thread only records numbers.
        progress = (self._step, self._epoch, self._loss, self._grad_norm, plateau_fired)
        with self._lock:
            self._pending = _Snapshot(
                buffers, progress, dict(self.generations), index, event, grams
            )
        return True

    # -- I/O thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        outage = _Outage()
        last_beat = 0.0
        while not self._stop.is_set():
            try:
                if self.worker_id is None or not self._registered.is_set():
                    self._register()
                self._send_pending()
                self._send_acks()
                if self._pending is None:
                    self._send_telemetry()
                if self._closing.is_set() and self._pending is None and not self._telemetry:
                    return  # flushed: close() takes it from here
                if time.monotonic() - last_beat >= self.heartbeat_s:
                    self._heartbeat()
                    last_beat = time.monotonic()
                self._poll()
                self._check_incarnation()
                outage.recovered()
            except TetherError as error:
                self.stats.failures += 1
                self._stop.wait(outage.failed(error))
            except Exception:  # a bug here must not kill training; say it loudly and retry
                log.exception("tetherfed I/O thread error; retrying")
                self._stop.wait(1.0)

    def _register(self) -> None:
        """Register (or resume); a refusal of a first registration is permanent (`_refuse`)."""
        first = not self._ever_registered and self.worker_id is None
        try:
            if self.worker_id is not None and self._token is not None:
                self._resume()
            else:
                self._register_new()
        except (NotFoundError, AuthError, BadRequestError) as error:
            if first:
                self._refuse(error)
            raise
        self._ever_registered = True
        self._registered.set()

    def _resume(self) -> None:
        assert self.worker_id is not None
        self._client.authorize(self._token)
        try:
            federation = self._client.get_federation(self.federation)
            if self._incarnation not in (None, federation.incarnation):
                # Created anew since the checkpoint: its worker ids are not ours, even one
                # that happens to resolve.
                self._forget(self._anew(federation.incarnation))
                self._register_new()
                return
            worker = self._client.get_worker(self.federation, self.worker_id)
        except (NotFoundError, AuthError) as error:  # the coordinator lost this worker
            self._forget(f"worker {self.worker_id} is unknown to the coordinator ({error.detail})")
            raise
        self.policy, self._incarnation = federation.policy, federation.incarnation
        if worker.status == "left":
            worker = self._client.rejoin(self.federation, worker.worker_id)
        try:  # claim the identity before publishing anything under it
            self._heartbeat()
        except ConflictError as error:  # another process runs as this worker: never both
            # A crashed predecessor's session lapses within the heartbeat TTL: wait that long
            # (retrying), then give up for good.
            self._contested = self._contested or time.monotonic()
            if time.monotonic() - self._contested > self.claim_wait_s:
                self._refuse(error)
            raise
        log.info("resumed as worker %s (status %s)", worker.worker_id, worker.status)

    def _register_new(self) -> None:
        self._client.authorize(self._admin_token)  # registering is the admin token's call
        reg = self._client.register_worker(self.federation, self.name, self._specs, self._meta)
        self.worker_id, self._token, self.policy = reg.worker_id, reg.token, reg.policy
        self._incarnation, self._client.incarnation = reg.incarnation, None
        self._client.authorize(reg.token)
        log.info("registered as worker %s in federation %s", reg.worker_id, self.federation)

    def _refuse(self, error: APIError) -> None:
        """A permanent refusal (unknown federation, token refused, invalid layer table): stop
        the I/O thread; the next `step()` raises `RefusedError`."""
        self.refusal = RefusedError(
            f"the coordinator refused worker {self.name!r} in federation {self.federation!r}: "
            f"{error.detail} (HTTP {error.status})"
        )
        log.error("%s", self.refusal)
        self._stop.set()

    def _forget(self, why: str) -> None:
        """The coordinator lost this worker (restarted without its state, federation re-created):
        register again under a new id, with decision cursor and applied ids reset (decision ids
        of the new incarnation start over)."""
        log.warning("%s: registering again under a new id", why)
        self.worker_id = self._token = self._incarnation = self._client.incarnation = None
        self._cursor, self._era, self.hold = 0, self._era + 1, None
        self.applied_ids = set()
        with self._ack_lock:  # acks of decisions the coordinator no longer has
            self._unsent.clear()
        self._registered.clear()

    def _anew(self, seen: str) -> str:
        return (
            f"federation {self.federation!r} was created anew (incarnation "
            f"{self._incarnation}, now {seen}): worker {self.worker_id} belongs to the old one"
        )

    def _check_incarnation(self) -> None:
        """Forget this worker's registration when a worker-facing answer names another
        incarnation of the federation than the one it joined (deleted and created again, or
        lost by Redis and created again), even if its worker id happens to resolve there."""
        seen = self._client.incarnation
        if seen is None or seen == self._incarnation:
            return
        if self._incarnation is None:  # joined before incarnations were reported
            self._incarnation = seen
            return
        self._forget(self._anew(seen))

    def _send_pending(self) -> None:
        if time.monotonic() < self._next_publish and not self._closing.is_set():
            return
        with self._lock:
            snap, self._pending = self._pending, None
            if snap is not None:
                self._sending = snap.index
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
            if self.worker_id is None:
                return  # forgotten: the next publish goes to a new registration, unpaused
        except TetherError:
            with self._lock:  # keep it unless training already produced a newer one
                if self._pending is None:
                    self._pending = snap
            self._failing = True  # meanwhile training may replace it with a newer one
            raise
        finally:
            with self._lock:
                self._sending = None
        # Publishing may take at most `io_budget` of the wall clock (it competes with training for
        # the GIL and the CPU); snapshots taken meanwhile coalesce, the latest wins.
        # A publish slowed by an outage or a coordinator just restarted pauses at most
        # MAX_PUBLISH_PAUSE_S (19× a 5 s publish stopped publishing for 95 s).
        now = time.monotonic()
        pause = (now - started) * (1.0 / self.io_budget - 1.0)
        self._next_publish = now + min(pause, MAX_PUBLISH_PAUSE_S)

    def _publish(self, snap: _Snapshot) -> None:
        if snap.event is not None:
            snap.event.synchronize()
        assert self.worker_id is not None
        tensors = {name: buf.numpy() for name, buf in snap.buffers.items()}
        # A sketch frame carries the tethers' sketches only (cka's probe Grams go in full ones).
        if not self._publish_sketch(snap, tensors):
            tensors |= {probe_gram_name(name): gram for name, gram in snap.grams.items()}
            parts = encode_parts(
                tensors, snap.meta(self.worker_id, self.wire_dtype), self.wire_dtype
            )
            self._client.publish(self.federation, self.worker_id, parts)
            self._full_next = False
        self.stats.published += 1
        self._failing = False

    def _publish_sketch(self, snap: _Snapshot, tensors: Mapping[str, Any]) -> bool:
        """Under a sketch policy, publish the sketch frame unless a full publish is due (every
        `full_every`-th, or asked for); False when the full frame should go instead."""
        sketch = self.policy.sketch if self.policy is not None else None
        if sketch is None or self._full_next or self.stats.published % sketch.full_every == 0:
            return False
        assert self.worker_id is not None and self.policy is not None
        frame = encode_sketch_frame(tensors, snap.meta(self.worker_id, "float32"), sketch)
        try:
            accepted = self._client.publish_sketch(self.federation, self.worker_id, frame)
        except ConflictError:  # the federation's policy dropped its sketch since we registered
            self.policy = self.policy.model_copy(update={"sketch": None})
            return False
        self._full_next = accepted.full_requested
        return True

    def _refused(self, error: APIError) -> None:
        """The coordinator refused the publish for good: drop it; if the worker is gone from
        the federation (left, unknown, token refused), register again under a new id."""
        log.warning("publish refused, snapshot dropped: %s", error)
        self._failing = False
        if isinstance(error, ConflictError):  # left: come back under the same id
            self._registered.clear()
        elif isinstance(error, NotFoundError | AuthError):  # unknown here: a new id
            self._forget(f"worker {self.worker_id} is unknown to the coordinator ({error.detail})")

    def _send_acks(self) -> None:
        """Send the acks in order; a transport error, 5xx or auth error (raised) keeps the rest
        for the next try, a refusal (already acked, unknown decision) drops that one."""
        for decision_id, ack in self._pending_acks():
            try:
                self._client.ack(self.federation, decision_id, ack)
            except (BadRequestError, NotFoundError, ConflictError) as error:
                log.warning("ack of decision %d refused: %s", decision_id, error)
            with self._ack_lock:
                if self._unsent.get(decision_id) is ack:  # not replaced meanwhile
                    del self._unsent[decision_id]

    def _send_telemetry(self) -> None:
        while self._telemetry and self.worker_id is not None:
            batch = [
                self._telemetry.popleft() for _ in range(min(MAX_POINTS, len(self._telemetry)))
            ]
            try:
                body = TelemetryCreate(data=[TelemetryPoint.model_validate(p) for p in batch])
                self._client.post_telemetry(self.federation, self.worker_id, body)
            except (ValueError, BadRequestError, NotFoundError, ConflictError) as error:
                log.warning("telemetry refused, %d points dropped: %s", len(batch), error)
                self.stats.telemetry_dropped += len(batch)
                continue
            except TetherError:  # transport, 5xx, auth: they wait for the next try
                self._telemetry.extendleft(reversed(batch))
                raise
            self.stats.telemetry_sent += len(batch)

    def _heartbeat(self, ending: bool = False) -> None:
        assert self.worker_id is not None
        beat = Heartbeat(
            step=self._step,
            epoch=self._epoch,
            loss=self._loss,
            grad_norm=self._grad_norm,
            session=self._session,
            ending=ending,
        )
        self._client.heartbeat(self.federation, self.worker_id, beat)

    def _poll(self) -> None:
        assert self.worker_id is not None
        until_publish = self._next_publish - time.monotonic()
        if self._pending is not None and until_publish <= 0:
            return  # publish first
        # Long-poll (the thread sleeps in a socket read, holding no GIL) until the next publish is
        # due; acks waiting to go out cut the wait short.
        wait = self.poll_wait_s if self._pending is None else min(self.poll_wait_s, until_publish)
        if self._unsent or self._stop.is_set():
            wait = 0.0
        after = self._cursor
        page = self._client.worker_decisions(
            self.federation, self.worker_id, after=after, wait=round(wait, 3)
        )
        self._held(page.hold)
        last = self._client.last_decision
        if last is not None and last < after:
            self._rewind(last, after)
            return  # poll again from there
        for decision in page.data:
            if decision.id not in self.applied_ids and decision.action != "hold":
                ready = self._prepare(decision)
                ready.era = self._era
                self._ready.put(ready)
            # Only once it is queued: a failed partner fetch re-polls the decision.
            self._cursor = max(self._cursor, decision.id)

    def _rewind(self, last: int, cursor: int) -> None:
        """The federation's decisions end below this worker's cursor: Redis lost decisions the
        worker saw (restored from an older copy, a failover to a lagging replica), and the ids
        after `last` will name new decisions. Poll from `last`, forget applied ids above it."""
        log.warning(
            "federation %r has decisions up to id %d only, below this worker's cursor %d: the "
            "coordinator lost decisions; polling again from %d",
            self.federation,
            last,
            cursor,
            last,
        )
        self._cursor, self._era = last, self._era + 1
        self.applied_ids = {i for i in self.applied_ids if i <= last}

    def _held(self, hold: Hold | None) -> None:
        """Keep the latest hold (why the last round decided nothing to apply); log a new
        reason once, not every round."""
        if hold is not None and hold.code != self._hold_said:
            log.info("worker %s holds: %s (%s)", self.worker_id, hold.reason, hold.code)
            self._hold_said = hold.code  # a reason coming back after merges is not news
        self.hold = hold

    def _prepare(self, decision: Decision) -> _Ready:
        if decision.operator == "decouple" or decision.partner_id is None:
            return _Ready(decision, torch.zeros(0))
        # Exactly the partner snapshot that was scored, never a newer one published since.
        ref = decision.partner_snapshot
        try:
            partner = self._client.tether(
                self.federation,
                decision.partner_id,
                decision.layer,
                version=None if ref is None else ref.version,
            )
        except NotFoundError as error:
            return _Ready(decision, None, f"partner tether unavailable: {error.detail}")
        except FrameError as error:  # the partner's bytes are not a usable tether
            return _Ready(decision, None, f"partner tether refused: {error}")
        # Copy off the response buffer here, on the I/O thread; pinned so the training thread's
        # host-to-device copy can be non-blocking.
        tensor = torch.from_numpy(np.array(partner, dtype=np.float32))
        return _Ready(decision, tensor.pin_memory() if self._device.type == "cuda" else tensor)

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self, leave: bool = True, flush_timeout_s: float = 10.0) -> None:
        """Publish the last snapshot and send pending acks (waiting at most `flush_timeout_s`),
        stop the I/O thread and, by default, leave the federation."""
        self._closing.set()
        if not self._registered.is_set():
            self._stop.set()  # nothing was or could be published: no flush to wait for
        self._thread.join(timeout=flush_timeout_s + self.poll_wait_s)
        self._stop.set()
        self._thread.join(timeout=self.poll_wait_s + 10.0)
        try:
            if leave and self.worker_id is not None and self._registered.is_set():
                self._reject_unapplied(FINISHED)
            self._send_acks()
            if leave and self.worker_id is not None and self._registered.is_set():
                self._client.leave(self.federation, self.worker_id)
            elif self.worker_id is not None and self._registered.is_set():
                self._heartbeat(ending=True)  # a resumed process may take the id at once
        except TetherError as error:
            log.warning("could not leave federation cleanly: %s", error)
        self._client.close()

    def _reject_unapplied(self, why: str) -> None:
        """Ack `rejected` (with `why`) each merge or drift this leaving worker received, or has
        waiting at the coordinator, and will not apply, so every decision it got ends acked."""
        pending: list[Decision] = []
        while True:
            try:
                pending.append(self._ready.get_nowait().decision)
            except queue.Empty:
                break
        assert self.worker_id is not None
        page = self._client.worker_decisions(
            self.federation, self.worker_id, after=self._cursor, wait=0
        )
        for decision in [*pending, *page.data]:
            if decision.action != "hold" and decision.id not in self.applied_ids:
                self.applied_ids.add(decision.id)
                self._queue_ack(decision.id, AckCreate(outcome="rejected", reason=why))

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def layer_specs(
    layers: Mapping[str, TetherParametrization], wire_dtype: WireDType
) -> list[LayerSpec]:
    """The layer table a worker registers; ValueError naming a layer the protocol cannot carry
    (a zero-size weight, a name over 256 characters)."""
    specs = []
    for name, tp in layers.items():
        shape = list(tp.storage().shape)
        try:
            specs.append(LayerSpec(name=name, shape=shape, dtype=wire_dtype))
        except ValidationError as error:
            problem = "it has a zero-size weight" if 0 in shape else _first_problem(error)
            raise ValueError(
                f"layer {name!r} (shape {shape}) cannot be federated: {problem}"
            ) from None
    return specs


def _check_registration(name: str, specs: list[LayerSpec], meta: Mapping[str, Any]) -> None:
    try:
        WorkerCreate(name=name, layers=specs, meta=dict(meta))
    except ValidationError as error:
        raise ValueError(f"cannot register worker {name!r}: {_first_problem(error)}") from None


def _first_problem(error: ValidationError) -> str:
    first = error.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"


def _finite_or_none(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


class _Outage:
    """Backoff with full jitter while the coordinator is unreachable; one warning per outage."""

    def __init__(self, base_s: float = 0.2, cap_s: float = 5.0) -> None:
        self.base_s, self.cap_s = base_s, cap_s
        self.failures = 0

    def failed(self, error: TetherError) -> float:
        if self.failures == 0:
            log.warning("coordinator call failed, training continues and retries: %s", error)
        self.failures += 1
        return random.uniform(0.0, min(self.cap_s, self.base_s * 2.0 ** min(self.failures, 10)))

    def recovered(self) -> None:
        if self.failures:
            log.warning("coordinator calls succeed again after %d failures", self.failures)
        self.failures = 0
