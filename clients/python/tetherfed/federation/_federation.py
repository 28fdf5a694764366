"""`Federation`: connects a tethered model to a coordinator without ever blocking training
(unless the policy asks for synchronous rounds, `_sync`, which wait at their step).

The training thread only calls `fed.step(...)` once per optimizer step. That call

1. applies decisions the I/O thread has already received and prepared (partner tether fetched),
   on the model's device, in place, at this step boundary — each decision id at most once;
2. on schedule (every `publish_every` steps, or when the plateau trigger fires) copies the tethers
   into host buffers (pinned, with non-blocking copies, on CUDA) and hands them to the I/O thread;
   if the network is slower than training, the newest snapshot replaces the unsent one.

`Federation` is the training thread's side. The I/O thread (`_io.IOThread`) does all network
work, through the session (`_session.Session`: registration, identity); decisions and acks pass
between the two threads only through the inbox (`_inbox.Inbox`), behind its lock.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, MutableSet, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch
from torch import Tensor, nn

from tether_protocol.messages import AckCreate, Decision, Hold, Policy, WireDType
from tether_protocol.policy import layers_in_scope, plateau
from tetherfed.client._errors import RefusedError
from tetherfed.client._retry import RetryPolicy
from tetherfed.client._sdk import Client
from tetherfed.tethers._ops import apply_operator_
from tetherfed.tethers._probe import Probe
from tetherfed.tethers._tethering import (
    INIT_DIGEST_KEY,
    LayerPart,
    MergeScope,
    TetherParametrization,
    init_digest,
    layer_parts,
    tethered_layers,
)

from ._inbox import AppliedIds, Inbox, Ready
from ._io import FederationStats, IOSettings, IOThread, Snapshot
from ._session import Progress, Session, check_registration, layer_specs

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

    `io_budget` (a fraction, 0 < F ≤ 1; default 0.05) is the most of the wall clock publishing
    may take, since it competes with training for the CPU: after a publish that took t s the
    I/O thread waits t · (1/F − 1) s (at most 10 s) before the next. Publishes that fall due
    meanwhile are skipped, the latest snapshot going out instead. At 1 there is no pause, whatever
    publishing costs: every scheduled step publishes unless the previous snapshot is still
    being sent (an offered snapshot wakes the I/O thread: it never waits behind a decision
    long poll). `ValueError` outside (0, 1], or for `publish_every` < 1.

    Synchronous rounds (the policy's `sync_every` R, see `_sync`): at every multiple of R steps
    `step()` publishes whatever the schedule and the budget, then waits until that round's
    decisions are applied (or the round decided nothing here), at most `sync_timeout_s`.

    Decisions change the model's tethers (and so its effective weights): apply them only between
    optimizer steps. Call `step()` once per optimizer step, after `optimizer.step()`. With
    gradient accumulation (several forward/backward passes per optimizer step), pass `optimizer`:
    `step()` may then be called per micro-batch, and decisions wait for the first call after an
    `optimizer.step()`, so none lands inside an accumulation window (where the accumulated
    gradient would mix weights before and after it).

    What a merge or drift moves follows the policy's `merge_scope`: the tether alone
    (`tethers`), also the layer's raw weight and bias (`weights`), or also every untethered
    floating-point parameter and buffer, each carried by one layer (`model`;
    `tetherfed.tethers.layer_parts` says which). Under weights or model each snapshot publishes
    those parts with the tethers (float32), a merge refuses (acking why) a partner whose parts
    are missing or shaped otherwise, and the merge gate's rollback restores them exactly. The
    worker registers `init_digest` (`meta["init_digest"]`: a fingerprint of the tethered
    layers' initial weights, `tetherfed.tethers.init_digest`) and logs one warning when, under
    weights or model, a partner's differs (averaging independently initialised weights means
    nothing without alignment).

    `stats` (a `FederationStats`) counts what happened: `steps`, `scheduled` publishes,
    `published`, `skipped` (scheduled publishes a later one replaced), `merges_applied` and
    `merges_per_100_steps`, among others.
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
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self._layers = tethered_layers(model)
        if not self._layers:
            raise ValueError("the model has no tethered layers: call tetherfed.tether(model) first")
        specs = layer_specs(self._layers, wire_dtype)  # refused here, not in the I/O thread
        # The init fingerprint peers compare under merge_scope weights or model (a resumed
        # worker keeps the one it registered with, not its trained weights'; `meta` may set it).
        digest = (resume or {}).get(INIT_DIGEST_KEY) or init_digest(model)
        meta = {INIT_DIGEST_KEY: digest, **(meta or {})}
        self.init_digest: str = str(meta[INIT_DIGEST_KEY])
        self._model = model
        self._scoped: dict[str, dict[str, list[LayerPart]]] = {}  # scope → layer → its parts
        check_registration(name, specs, meta)
        _check_pacing(publish_every, io_budget)
        self.federation, self.name, self._probe = federation, name, probe
        self.publish_every, self.wire_dtype, self.io_budget = publish_every, wire_dtype, io_budget
        self.heartbeat_s, self.poll_wait_s = heartbeat_s, poll_wait_s
        self.claim_wait_s = claim_wait_s
        self._device = next(iter(self._layers.values())).storage().device
        # One client, used by the I/O thread (and by close() once that thread has stopped).
        self._client = Client(url, token=token, transport=transport, retry=RetryPolicy(tries=1))
        self._inbox = Inbox()
        self._session = Session(
            self._client,
            federation,
            name,
            specs,
            meta,
            inbox=self._inbox,
            admin_token=token,
            claim_wait_s=claim_wait_s,
        )
        self._training_state()
        if resume:
            self._load(resume)
        self._buffers = [self._host_buffers(), self._host_buffers()]
        self._part_buffers: list[dict[str, Tensor]] = [{}, {}]  # allocated as a scope needs them
        settings = IOSettings(wire_dtype, heartbeat_s, poll_wait_s, io_budget, self._device)
        self._io = IOThread(self._session, self._inbox, self.stats, settings)
        self._io.record(self._progress())
        self._at_boundary = optimizer is None  # without an optimizer every step() is a boundary
        self._boundary_hook = (
            optimizer.register_step_post_hook(self._optimizer_stepped) if optimizer else None
        )
        self._io.start()

    def _training_state(self) -> None:
        """What only the training thread changes: generations, progress, the publish schedule."""
        self.generations = {layer: 0 for layer in self._layers}
        self.stats = FederationStats()
        self._step, self._epoch = 0, 0
        self._loss: float | None = None
        self._grad_norm: float | None = None
        self._previous_loss: float | None = None
        self._due = False  # a snapshot is scheduled but not yet taken
        self._due_plateau = False  # ... and the plateau trigger fired meanwhile

    # -- what the I/O thread learned ------------------------------------------------------------
    @property
    def worker_id(self) -> str | None:
        """The worker id (None until registered, and while registering again)."""
        return self._session.worker_id

    @property
    def policy(self) -> Policy | None:
        """The federation's policy (None until registered)."""
        return self._session.policy

    @property
    def hold(self) -> Hold | None:
        """Why the latest scoring round gave this worker nothing to apply (None if it did)."""
        return self._session.hold

    @property
    def holds(self) -> dict[str, int]:
        """Scoring rounds that decided nothing for this worker so far, by hold code (`_holds`)."""
        return dict(self._session.holds.counts)

    @property
    def refusal(self) -> RefusedError | None:
        """Set when the coordinator refused this worker for good (`step()` raises it)."""
        return self._session.refusal

    @property
    def applied_ids(self) -> MutableSet[int]:
        """The ids of the decisions applied (or rejected) here, as a live set."""
        return AppliedIds(self._inbox)

    @property
    def _cursor(self) -> int:
        """The last decision id polled (tests read and move it)."""
        return self._inbox.cursor

    @_cursor.setter
    def _cursor(self, cursor: int) -> None:
        self._inbox.seek(cursor)

    def _pending_acks(self) -> list[tuple[int, AckCreate]]:
        """The acks the I/O thread has not sent yet, oldest first."""
        return self._inbox.unsent_acks()

    # -- training thread ------------------------------------------------------------------------
    def step(
        self, loss: float | None = None, epoch: int = 0, grad_norm: float | None = None
    ) -> StepReport:
        """Call once per optimizer step: applies ready decisions, publishes on schedule; at a
        synchronous round's step (`policy.sync_every`) publishes and waits for the round's
        decisions, at most `policy.sync_timeout_s` (`_sync`).

        A non-finite `loss` or `grad_norm` (NaN, ±Inf) is recorded as unknown (null on the wire).
        Raises `RefusedError` once the coordinator refused this worker for good (unknown
        federation, token refused, invalid layer table); an unreachable coordinator never raises.
        """
        if self.refusal is not None:
            raise self.refusal
        self._step += 1
        self.stats.steps += 1
        loss, grad_norm = _finite_or_none(loss), _finite_or_none(grad_norm)
        self._epoch, self._loss, self._grad_norm = epoch, loss, grad_norm
        self._io.record(self._progress())
        report = StepReport(step=self._step)
        boundary = self._at_boundary
        if boundary:
            self._apply_ready(report)
            self._at_boundary = self._boundary_hook is None
        forced = self._io.rounds.start(self.policy, self._step)  # a synchronous round (`_sync`)
        self._schedule(loss, grad_norm, forced)
        if self._due and (forced or self._io.can_snapshot()):
            report.published = self._snapshot(plateau_fired=self._due_plateau)
            self._due = self._due_plateau = False
            self.stats.snapshots += 1
        if forced:
            apply = functools.partial(self._apply_ready, report) if boundary else _nothing
            self._io.rounds.wait(self._step, apply)
        self._previous_loss = loss
        self.stats.merges_applied += sum(d.action == "merge" for d in report.applied)
        return report

    def _progress(self) -> Progress:
        return Progress(self._step, self._epoch, self._loss, self._grad_norm)

    def _schedule(self, loss: float | None, grad_norm: float | None, forced: bool = False) -> None:
        """A snapshot is due every `publish_every` steps, when the plateau trigger fires, or
        (`forced`) at a synchronous round; one still due from before is skipped (this one
        replaces it). Under synchronous rounds only the rounds publish: a publish between two
        would start an asynchronous round of its own, with decisions landing mid-period."""
        policy = self.policy
        if policy is not None and policy.sync_every is not None:
            scheduled, fired = forced, False  # a round's publish starts a round (`trigger`)
        else:
            fired = policy is not None and plateau(policy, loss, self._previous_loss, grad_norm)
            scheduled = self._step % self.publish_every == 0 or fired
        if scheduled:
            self.stats.scheduled += 1
            if self._due:
                self._io.skip()
            self._due = True
            self._due_plateau |= fired

    def wait_registered(self, timeout: float) -> bool:
        """Block until the worker is registered (for scripts and tests); True if it is, False
        after `timeout` s or once the coordinator refused it for good (see `refusal`)."""
        deadline = time.monotonic() + timeout
        registered = self._session.registered
        while not registered.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            if self.refusal is not None or time.monotonic() >= deadline:
                return False
        return True

    def telemetry(self, points: list[dict[str, Any]]) -> None:
        """Queue telemetry points (`tether_protocol.telemetry.TelemetryPoint` fields) for the
        I/O thread; returns at once. They are sent when no snapshot is waiting, so they never
        hold up a publish; while the coordinator is unreachable at most 8,192 wait (the oldest
        are dropped and counted in `stats.telemetry_dropped`)."""
        self._io.queue_telemetry(points)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume under the same id (store it in your checkpoint)."""
        identity, inbox = self._session.identity, self._inbox.state()
        return {
            "federation": self.federation,
            "worker_id": identity.worker_id,
            "token": identity.token,
            "incarnation": identity.incarnation,
            "generations": dict(self.generations),
            "applied_ids": inbox.applied_ids,
            # Decisions are resolved in id order: everything above the last resolved one is
            # polled again after a resume (duplicates are skipped by applied_ids).
            "cursor": max(inbox.applied_ids, default=0),
            "step": self._step,
            INIT_DIGEST_KEY: self.init_digest,  # registered again as is after a resume
            "pending_acks": {str(i): a.model_dump(mode="json") for i, a in inbox.pending_acks},
        }

    def _load(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state_dict()` (before the I/O thread starts)."""
        if state.get("federation") not in (None, self.federation):
            raise ValueError(
                f"checkpoint is for federation {state['federation']!r}, not {self.federation!r}"
            )
        self._session.restore(state)
        self.generations.update({k: int(v) for k, v in state.get("generations", {}).items()})
        applied = {int(i) for i in state.get("applied_ids", [])}
        cursor = int(state.get("cursor", max(applied, default=0)))
        acks = {
            int(i): AckCreate.model_validate(a) for i, a in state.get("pending_acks", {}).items()
        }
        self._inbox.load(applied, cursor, acks)
        self._step = int(state.get("step", 0))

    # -- applying decisions ---------------------------------------------------------------------
    def _apply_ready(self, report: StepReport) -> None:
        """Apply each decision the I/O thread prepared, settling each with its ack."""
        while (ready := self._inbox.take()) is not None:
            self._inbox.settle(ready, self._resolve(ready, report))

    def _resolve(self, ready: Ready, report: StepReport) -> AckCreate:
        """Apply one decision, or say why not; the ack either way."""
        decision = ready.decision
        problem = ready.problem or self._stale(decision)
        if problem is None:
            if ready.partner is None:
                problem = "no partner tether"
            else:
                outcome = self._apply_gated(decision, ready.partner, report, ready.parts)
                if isinstance(outcome, AckCreate):
                    return outcome
                problem = outcome
        report.rejected.append((decision, problem))
        return AckCreate(outcome="rejected", reason=problem)

    def _gated(self, decision: Decision) -> bool:
        policy = self.policy
        gate = policy.gate if policy is not None else None
        return gate is not None and self._probe is not None and decision.action == "merge"

    def _apply_gated(
        self,
        decision: Decision,
        partner: Tensor,
        report: StepReport,
        parts: Mapping[str, Tensor] | None = None,
    ) -> AckCreate | str:
        """Apply (under the merge gate: evaluate, then keep or roll back); the ack of what was
        applied or rolled back, or the reason it cannot be applied (the tether and the parts
        unchanged). `parts`: the partner's parts of the layer (entry name → tensor)."""
        if self._gated(decision):
            return self._judge(decision, partner, report, parts)
        problem = self._apply(decision, partner, parts)
        if problem is not None:
            return problem
        report.applied.append(decision)
        return AckCreate(outcome="applied", generation=self.generations[decision.layer])

    def _judge(
        self,
        decision: Decision,
        partner: Tensor,
        report: StepReport,
        parts: Mapping[str, Tensor] | None = None,
    ) -> AckCreate | str:
        """The merge gate: apply, compare the probe loss before and after, keep the merge if the
        rise is within the policy's bound, else restore the exact previous tether and parts
        (bitwise: weights, biases and untethered tensors under merge_scope weights or model)."""
        policy, probe = self.policy, self._probe
        assert probe is not None and policy is not None and policy.gate is not None
        scope = policy.merge_scope
        storage = self._layers[decision.layer].storage()
        previous = storage.detach().clone()
        kept = [(ref, ref.tensor().detach().clone()) for ref in self._parts_of(decision, scope)]
        before = probe.loss()
        problem = self._apply(decision, partner, parts, scope)
        if problem is not None:
            return problem  # nothing changed
        after = probe.loss()
        allowed = policy.gate.probe_loss_rise
        check = GateCheck(decision, before, after, kept=after <= before * (1.0 + allowed))
        report.gate.append(check)
        loss_before, loss_after = _finite_or_none(before), _finite_or_none(after)
        if check.kept:
            report.applied.append(decision)
            return AckCreate(
                outcome="applied",
                generation=self.generations[decision.layer],
                probe_loss_before=loss_before,
                probe_loss_after=loss_after,
            )
        with torch.no_grad():
            storage.copy_(previous)  # the exact previous tether (also learned logits)
            for ref, value in kept:
                ref.write_(value)  # ... and parts
        self.generations[decision.layer] -= 1
        reason = (
            f"merge gate: probe loss rose from {before:.6g} to {after:.6g} "
            f"({check.rise:+.2%} > {allowed:.2%} allowed); merge rolled back"
        )
        report.rejected.append((decision, reason))
        return AckCreate(
            outcome="rejected",
            reason=reason,
            probe_loss_before=loss_before,
            probe_loss_after=loss_after,
        )

    def _stale(self, decision: Decision) -> str | None:
        policy = self.policy
        bound = policy.max_staleness_steps if policy else None
        ref = decision.partner_snapshot
        if bound is not None and ref is not None and abs(self._step - ref.step) > bound:
            return f"partner snapshot at step {ref.step} is more than {bound} steps from step {self._step}"
        if decision.layer not in self._layers:
            return f"layer {decision.layer!r} is not tethered here"
        return None

    def _apply(
        self,
        decision: Decision,
        partner: Tensor,
        parts: Mapping[str, Tensor] | None = None,
        scope: MergeScope | None = None,
    ) -> str | None:
        """Apply a decision to its layer: the operator moves its tether and, under merge_scope
        weights or model (the policy's unless `scope` is given), each of its parts towards (or,
        repel, away from) the partner's in `parts` (repel unclipped there). The reason it
        cannot be applied, with nothing changed: a part the scope needs missing from the
        partner's frame or of another shape, a non-finite result, a bad operator."""
        tp: TetherParametrization = self._layers[decision.layer]
        if decision.operator is not None and decision.operator != "decouple":
            scope = scope or self._scope()
            refs = self._parts_of(decision, scope)
            problem = _part_mismatch(scope, refs, parts or {})
            if problem is not None:
                return problem
            value = tp.current().detach().clone()
            try:
                apply_operator_(decision.operator, decision.params, value, partner)
                moved = [(ref, _moved(ref, decision, (parts or {})[ref.name])) for ref in refs]
                tp.set_(value)  # validates (finite, in [0, 1]) before it writes
            except ValueError as error:  # a partner's tensor never stops training
                return f"cannot apply {decision.operator}: {error}"
            for ref, new in moved:  # cannot fail: shapes checked, values finite
                ref.write_(new)
        self.generations[decision.layer] += 1
        return None

    def _parts_of(self, decision: Decision, scope: MergeScope) -> list[LayerPart]:
        """The parts of the decision's layer that `scope` moves (none for decouple)."""
        if decision.operator in (None, "decouple"):
            return []
        return self._all_parts(scope).get(decision.layer, [])

    # -- snapshots ------------------------------------------------------------------------------
    def _host_buffers(self) -> dict[str, Tensor]:
        pin = self._device.type == "cuda"
        return {
            name: torch.empty(tuple(tp.storage().shape), dtype=torch.float32, pin_memory=pin)
            for name, tp in self._layers.items()
        }

    def _snapshot(self, plateau_fired: bool) -> bool:
        """Copy the tethers into the host buffer set not being published and offer them to the
        I/O thread (the unsent snapshot, if any, is withdrawn first: latest wins)."""
        index = self._io.claim_buffers()
        policy = self.policy
        # Only the layers the policy looks at travel (all of them until registered).
        names = list(self._layers)
        if policy is not None:
            names = layers_in_scope(policy, names)
        buffers = {name: self._buffers[index][name] for name in names}
        with torch.no_grad():
            for name in names:
                buffers[name].copy_(self._layers[name].current(), non_blocking=True)
        parts = self._copy_parts(index, self._scope(), names)  # merge_scope weights or model
        grams: dict[str, Any] = {}
        if self._probe is not None and policy is not None and policy.measure == "cka":
            grams = self._probe.grams(policy.probe_seed, policy.probe_size)
            grams = {name: gram for name, gram in grams.items() if name in buffers}
        event = None
        if self._device.type == "cuda":
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
        # The metadata model is built on the I/O thread: the training thread only records numbers.
        progress = (self._step, self._epoch, self._loss, self._grad_norm, plateau_fired)
        generations = dict(self.generations)
        self._io.offer(Snapshot(buffers, progress, generations, index, event, grams, parts=parts))
        return True

    def _copy_parts(
        self, index: int, scope: MergeScope, layers: Sequence[str]
    ) -> dict[str, dict[str, Tensor]]:
        """Copy the parts `scope` needs (`layer_parts`: weights, biases, untethered tensors) of
        `layers` into host buffer set `index` (float32, pinned on CUDA, allocated on first use:
        the scope is known only once registered, and may change); layer → entry name → buffer."""
        out: dict[str, dict[str, Tensor]] = {}
        if scope == "tethers":
            return out
        held, pin = self._part_buffers[index], self._device.type == "cuda"
        everything = self._all_parts(scope)
        with torch.no_grad():
            for layer, refs in ((name, everything.get(name, [])) for name in layers):
                for ref in refs:
                    tensor = ref.tensor().detach()
                    buf = held.get(ref.name)
                    if buf is None or buf.shape != tensor.shape:
                        shape = tuple(tensor.shape)
                        buf = held[ref.name] = torch.empty(
                            shape, dtype=torch.float32, pin_memory=pin and tensor.is_cuda
                        )
                    buf.copy_(tensor, non_blocking=True)
                    out.setdefault(layer, {})[ref.name] = buf
        return out

    def _scope(self) -> MergeScope:
        """The policy's merge_scope (tethers until registered)."""
        policy = self.policy
        return policy.merge_scope if policy is not None else "tethers"

    def _all_parts(self, scope: MergeScope) -> dict[str, list[LayerPart]]:
        """Every layer's parts under `scope` (computed once per scope)."""
        if scope not in self._scoped:
            self._scoped[scope] = layer_parts(self._model, scope)
        return self._scoped[scope]

    # -- lifecycle ------------------------------------------------------------------------------
    def _optimizer_stepped(self, *_: object) -> None:
        """The optimizer's step post-hook: the next `step()` is at a step boundary."""
        self._at_boundary = True

    def close(self, leave: bool = True, flush_timeout_s: float = 10.0) -> None:
        """Publish the last snapshot and send pending acks (waiting at most `flush_timeout_s`),
        stop the I/O thread and, by default, leave the federation."""
        if self._boundary_hook is not None:
            self._boundary_hook.remove()
        if self._due:  # due but never taken: it will not go out
            self._io.skip()
            self._due = self._due_plateau = False
        self._io.stop(flush_timeout_s)
        self._io.farewell(leave, FINISHED)

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_pacing(publish_every: int, io_budget: float) -> None:
    if publish_every < 1:
        raise ValueError(f"publish_every must be ≥ 1, got {publish_every}")
    if not 0.0 < io_budget <= 1.0:
        raise ValueError(f"io_budget must be in (0, 1], got {io_budget}")


def _part_mismatch(
    scope: MergeScope, refs: Sequence[LayerPart], partner: Mapping[str, Tensor]
) -> str | None:
    """Why the partner's parts cannot be merged into ours (one missing, or of another shape),
    e.g. "merge_scope weights: partner's fc1@weight has shape [8, 4], ours [8, 5]"; None when
    every part the scope needs is there."""
    for ref in refs:
        theirs = partner.get(ref.name)
        if theirs is None:
            return (
                f"merge_scope {scope}: partner's {ref.name} is missing (its snapshot was "
                "published under another merge_scope, or by another architecture)"
            )
        ours = ref.tensor()
        if tuple(theirs.shape) != tuple(ours.shape):
            return (
                f"merge_scope {scope}: partner's {ref.name} has shape {list(theirs.shape)}, "
                f"ours {list(ours.shape)}"
            )
    return None


def _moved(ref: LayerPart, decision: Decision, partner: Tensor) -> Tensor:
    """The part after the decision's operator (at least float32 precision, unclipped): a new
    tensor, the part itself unchanged. ValueError when the result is not finite."""
    own = ref.tensor().detach()
    work = own.to(torch.promote_types(own.dtype, torch.float32), copy=True)
    assert decision.operator is not None
    apply_operator_(decision.operator, decision.params, work, partner, unit=False)
    if not bool(torch.isfinite(work).all()):
        raise ValueError(f"{ref.name} would hold NaN or Inf")
    return work


def _nothing() -> None:
    """Apply nothing (a step inside an accumulation window)."""


def _finite_or_none(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None
