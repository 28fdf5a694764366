"""The scoring loop: a consumer group on the scoring stream, shared by every coordinator replica.

Each entry names (federation, worker, snapshot version). A scorer loads the latest snapshots of the
federation's active workers, scores all pairs per layer (`tether_protocol.compat`), runs the policy
and commits decisions with the policy state they change in one Lua script, guarded by the worker's
`scored_version` so a redelivered or reclaimed entry never emits a decision twice. Entries are
XACKed and XDELed after commit, so the stream's length is the backlog. Pending entries of a dead
consumer are reclaimed with XAUTOCLAIM after `reclaim_idle_ms`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from datetime import datetime

import anyio.to_thread
import redis.asyncio as aioredis

from tether_protocol.compat import CompatibilityMatrix, all_pairs
from tether_protocol.frame import tensor_view
from tether_protocol.messages import Decision, Measure, Policy, SnapshotRef, utcnow
from tether_protocol.policy import DecisionDraft, FederationState, PeerState, Round, decide

from .metrics import Metrics
from .store import FIELD_SEP, Snapshot, Store

GROUP = "scorers"
log = logging.getLogger(__name__)


def matrices(snaps: Mapping[str, Snapshot], measure: Measure) -> dict[str, CompatibilityMatrix]:
    """All-pairs compatibility per layer over the given snapshots (workers lacking a layer skip it)."""
    layers: dict[str, dict[str, object]] = {}
    for wid, snap in snaps.items():
        for name, entry in snap.entries.items():
            layers.setdefault(name, {})[wid] = tensor_view(snap.buf, entry)
    return {
        layer: all_pairs(tensors, measure, order=sorted(tensors))  # type: ignore[arg-type]
        for layer, tensors in sorted(layers.items())
    }


def publisher_scores(
    snaps: Mapping[str, Snapshot], wid: str, measure: Measure
) -> dict[str, dict[str, float]]:
    """Layer → partner → score of worker `wid` against every other loaded worker."""
    own = snaps[wid]
    out: dict[str, dict[str, float]] = {}
    for layer, matrix in matrices(snaps, measure).items():
        if layer in own.entries and len(matrix.workers) > 1:
            out[layer] = matrix.row(wid)
    return out


class Scorer:
    """One consumer of the scoring group; `run()` loops until cancelled."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self.settings = store.settings
        self.consumer = store.settings.consumer_name
        self.stopping = asyncio.Event()

    async def ensure_group(self) -> None:
        """Create the consumer group (and stream) if missing."""
        with contextlib.suppress(aioredis.ResponseError):  # BUSYGROUP: exists already
            await self.store.r.xgroup_create(
                self.store.keys.scoring(), GROUP, id="0", mkstream=True
            )

    async def run(self) -> None:
        """Reclaim stale work, then read new work, until `stopping` is set."""
        await self.ensure_group()
        while not self.stopping.is_set():
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep scoring after a transient Redis or data error
                log.exception("scoring step failed")
                await asyncio.sleep(0.5)

    async def step(self, block_ms: int | None = None) -> int:
        """One pass: reclaimed entries first, then new ones; returns entries handled."""
        key = self.store.keys.scoring()
        claimed = await self.store.r.xautoclaim(
            key, GROUP, self.consumer, min_idle_time=self.settings.reclaim_idle_ms, count=16
        )
        entries = [e for e in claimed[1] if e and e[1]]
        if not entries:
            block = self.settings.scoring_block_ms if block_ms is None else block_ms
            got = await self.store.blocking.xreadgroup(
                GROUP, self.consumer, {key: ">"}, count=16, block=block
            )
            entries = got[0][1] if got else []
        for entry_id, fields in entries:
            await self.handle(entry_id, fields)
        return len(entries)

    async def handle(self, entry_id: str, fields: dict[str, str]) -> None:
        """Score one entry, then XACK and XDEL it."""
        if fields:
            await self.score(fields["fed"], fields["worker"])
        async with self.store.r.pipeline(transaction=True) as pipe:
            pipe.xack(self.store.keys.scoring(), GROUP, entry_id)
            pipe.xdel(self.store.keys.scoring(), entry_id)
            await pipe.execute()

    async def score(self, fed: str, wid: str) -> list[int] | None:
        """Score the worker's latest snapshot; the new decision ids, or None if nothing to do."""
        store, keys = self.store, self.store.keys
        raw_policy = await store.r.hget(keys.federation(fed), "policy")
        scored = await store.r.hget(keys.worker(fed, wid), "scored_version")
        snaps = await store.active_snapshots(fed, include=wid)
        own = snaps.get(wid)
        if raw_policy is None or own is None or own.version <= int(scored or 0):
            return None
        policy = Policy.model_validate_json(raw_policy)
        started = time.perf_counter()
        state = await self._state(fed, wid, own, snaps)
        result = await anyio.to_thread.run_sync(lambda: self._decide(policy, state, snaps, own))
        self.metrics.scoring_seconds += time.perf_counter() - started
        self.metrics.scoring_rounds += 1
        ids = await self._commit(fed, policy, own, result)
        if ids:
            for draft in result.decisions:
                self.metrics.decisions[draft.action] += 1
        return ids

    async def _state(
        self, fed: str, wid: str, own: Snapshot, snaps: Mapping[str, Snapshot]
    ) -> FederationState:
        keys = self.store.keys
        merges_raw = await self.store.r.hgetall(keys.merges(fed, wid))
        cool_raw = await self.store.r.hgetall(keys.cooldowns(fed, wid))
        same_epoch = merges_raw.pop("__epoch", None) == str(own.epoch)
        cooldowns = {}
        for field, step in cool_raw.items():
            layer, partner = field.split(FIELD_SEP, 1)
            cooldowns[(layer, partner)] = int(step)
        return FederationState(
            layer_order=list(own.entries),
            peers={w: PeerState(w, s.step, s.version) for w, s in snaps.items() if w != wid},
            scores={},
            previous_loss=own.prev_loss,
            merges={k: int(v) for k, v in merges_raw.items()} if same_epoch else {},
            cooldowns=cooldowns,
        )

    @staticmethod
    def _decide(
        policy: Policy, state: FederationState, snaps: Mapping[str, Snapshot], own: Snapshot
    ) -> Round:
        scores = publisher_scores(snaps, own.worker_id, policy.measure) if len(snaps) > 1 else {}
        full = FederationState(
            state.layer_order, state.peers, scores, state.previous_loss, state.merges,
            state.cooldowns,
        )  # fmt: skip
        return decide(policy, full, own.meta.model_copy(update={"step": own.step}))

    async def _commit(self, fed: str, policy: Policy, own: Snapshot, result: Round) -> list[int]:
        keys, wid = self.store.keys, own.worker_id
        now = utcnow()
        args: list[object] = [own.version, self.settings.stream_maxlen, own.epoch]
        args.append(len(result.decisions))
        for draft in result.decisions:
            args += [draft.action, self._body(fed, policy, own, draft, now)]
        args.append(len(result.merges))
        for layer, n in result.merges.items():
            args += [layer, n]
        args.append(len(result.cooldowns))
        for (layer, partner), step in result.cooldowns.items():
            args += [f"{layer}{FIELD_SEP}{partner}", step]
        ids = await self.store.commit_script(
            keys=[
                keys.worker(fed, wid), keys.decision_seq(fed), keys.decisions(fed),
                keys.worker_decisions(fed, wid), keys.merges(fed, wid), keys.cooldowns(fed, wid),
            ],
            args=args,
        )  # fmt: skip
        return [int(i) for i in ids] if isinstance(ids, list) else []

    @staticmethod
    def _body(fed: str, policy: Policy, own: Snapshot, draft: DecisionDraft, now: datetime) -> str:
        decision = Decision(
            id=1,
            federation=fed,
            layer=draft.layer,
            worker_id=draft.worker_id,
            partner_id=draft.partner_id,
            action=draft.action,
            score=draft.score,
            measure=policy.measure,
            merge_threshold=policy.merge_threshold,
            drift_threshold=policy.drift_threshold,
            operator=draft.operator,
            params=draft.params,
            partner_snapshot=draft.partner_snapshot,
            own_snapshot=SnapshotRef(worker_id=own.worker_id, version=own.version, step=own.step),
            epoch=own.epoch,
            reason=draft.reason,
            created_at=now,
        )
        body = decision.model_dump(mode="json", exclude={"id"})
        return json.dumps(body, separators=(",", ":"), allow_nan=False)
