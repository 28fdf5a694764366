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
import dataclasses
import functools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Mapping
from datetime import datetime
from typing import Any, TypeVar

import anyio.to_thread
import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis
from threadpoolctl import ThreadpoolController

try:  # uvicorn[standard] installs it; run_event_loop falls back to asyncio's loop without it
    import uvloop
except ImportError:  # pragma: no cover - e.g. Windows
    uvloop = None  # type: ignore[assignment]

from tether_protocol.compat import (
    CompatibilityMatrix,
    all_pairs,
    centre_gram,
    row_scores,
    tether_update,
)
from tether_protocol.frame import tensor_view
from tether_protocol.messages import (
    Decision,
    Hold,
    Measure,
    Policy,
    SketchPolicy,
    SnapshotRef,
    utcnow,
)
from tether_protocol.policy import (
    DecisionDraft,
    FederationState,
    PeerState,
    PeerTable,
    Round,
    ScoreRow,
    decide,
)
from tether_protocol.sketch import (
    LayerSketch,
    sketch_layer,
    sketch_row_scores,
    sketch_scores,
    sketched,
)

from . import replies
from .embedded import die_with_parent
from .liveness import ScorerHealth
from .metrics import ScoringMetrics
from .replies import Entries
from .rounds import (
    DEFERRED_WAKE_MS,
    Deferred,
    deferral,
    entry_seconds,
    missing_peers,
    round_step,
)
from .settings import Settings
from .store import FIELD_SEP, Snapshot, SnapshotCache, Store, redis_clients
from .topology import aclose
from .workerfacts import ORIGIN, WorkerFacts, attach_origins

GROUP = "scorers"
BATCH = 1024  # entries read at once: a batch loads snapshots once and scores each worker once
RACED = -3  # commit.lua: another scorer changed this worker's state since it was read
STALE_PARTNER = -4  # commit.lua: a partner the round names published since it was read
INLINE_BYTES = 1 << 20  # rounds over less than this run on the event loop, not in a thread
# Rounds over less than this run BLAS on one thread. A Gram of a few MB is over before helper
# threads pay off, and on a machine whose cores the API, Redis and the workers also use, those
# threads spin waiting and take CPU from them: in the load benchmark (64 workers × 4 layers of
# 64×64, 2 cores) one thread took p99 publish→decision from 650-700 ms to 220 ms, and publishes
# coalesced before scoring from 8,500-11,600 to 132. Larger rounds keep BLAS's own thread count.
SMALL_ROUND_BYTES = 64 << 20
log = logging.getLogger(__name__)


View = npt.NDArray[Any] | LayerSketch  # a layer as scored: the tether, or its count sketch


def layer_views(
    snap: Snapshot, sketch: SketchPolicy | None, measure: Measure = "pearson"
) -> dict[str, View]:
    """Each layer of a snapshot as the scorer sees it: the tether, or (layers of at least
    `sketch.min_values` values under a sketch policy) its count sketch, computed once per
    snapshot and sketch spec. A sketch publish carries its sketches already. Under `cka`: the
    probe Grams, double-centred here whatever was sent (none published: nothing comparable).
    Under `update_cosine`: each layer's update since the worker's origin (`update_views`)."""
    if measure == "cka":
        return {name: centre_gram(tensor_view(snap.buf, e)) for name, e in snap.grams.items()}
    if measure == "update_cosine":
        return update_views(snap, sketch)
    if snap.sketched is not None:
        spec = None if sketch is None else (sketch.k, sketch.seed)
        if snap.memo.get("sketch_spec") == spec:
            return snap.sketched
        # Sketched under a policy since changed: its sketches compare with nothing now.
        return {k: v for k, v in snap.sketched.items() if not isinstance(v, LayerSketch)}
    out: dict[str, View] = {}
    for name, entry in snap.entries.items():
        tensor = tensor_view(snap.buf, entry)
        if sketch is not None and sketched(sketch, tensor.size):
            memo = (name, sketch.k, sketch.seed)
            if memo not in snap.memo:
                snap.memo[memo] = sketch_layer(tensor, sketch, name)
            out[name] = snap.memo[memo]
        else:
            out[name] = tensor
    return out


def update_views(snap: Snapshot, sketch: SketchPolicy | None) -> dict[str, View]:
    """Each layer's update since the worker's origin (`snap.memo[ORIGIN]`, see `workerfacts`):
    T − T⁰ as float32 (`compat.tether_update`), or for a sketched layer S(T) − S(T⁰), which is
    S(T − T⁰) since a count sketch is linear (the origin's sketch is made once, with the
    federation's sketch spec, and kept in its memo). Tethers only: what `layer_views` scores
    under the other measures, whatever else a frame carries. A layer the origin lacks, or holds
    in another shape, has no update; without an origin, no layer has one (nothing comparable)."""
    origin = snap.memo.get(ORIGIN)
    if origin is None:
        return {}
    then = layer_views(origin, sketch)
    out: dict[str, View] = {}
    for name, view in layer_views(snap, sketch).items():
        base = then.get(name)
        if isinstance(view, LayerSketch) and isinstance(base, LayerSketch):
            if view.shape == base.shape and view.values.shape == base.values.shape:
                delta = np.subtract(view.values, base.values, dtype=np.float32)
                out[name] = LayerSketch(delta, view.total - base.total, view.shape)
        elif (
            isinstance(view, np.ndarray)
            and isinstance(base, np.ndarray)
            and view.shape == base.shape
        ):
            out[name] = tether_update(view, base)
    return out


def layer_table(
    snaps: Mapping[str, Snapshot], sketch: SketchPolicy | None, measure: Measure = "pearson"
) -> dict[str, dict[str, View]]:
    """Layer → worker → view, layers sorted, workers sorted (workers lacking a layer skip it)."""
    table: dict[str, dict[str, View]] = {}
    for wid in sorted(snaps):
        for name, view in layer_views(snaps[wid], sketch, measure).items():
            table.setdefault(name, {})[wid] = view
    return dict(sorted(table.items()))


def _split(views: Mapping[str, View]) -> tuple[dict[str, LayerSketch], dict[str, npt.NDArray[Any]]]:
    # A worker still on full frames and one on sketches compare through the sketch of the full
    # tether, which layer_views made; left here: only a mix of full and sketch views.
    sk = {w: v for w, v in views.items() if isinstance(v, LayerSketch)}
    full = {w: v for w, v in views.items() if not isinstance(v, LayerSketch)}
    return sk, full


def layer_matrix(
    layer: str, views: Mapping[str, View], measure: Measure, sketch: SketchPolicy | None
) -> CompatibilityMatrix:
    """All pairs of one layer, on tethers or on sketches (pairs mixing the two: NaN)."""
    order = sorted(views)
    sk, full = _split(views)
    if not sk:
        return all_pairs(full, measure, order=order)
    matrix = np.full((len(order), len(order)), np.nan)
    idx = [order.index(w) for w in sorted(sk)]
    assert sketch is not None, "sketch views without a sketch policy"
    matrix[np.ix_(idx, idx)] = sketch_scores(sk, sketch, layer, measure, order=sorted(sk))
    if full:
        fidx = [order.index(w) for w in sorted(full)]
        sub = all_pairs(full, measure, order=sorted(full))
        matrix[np.ix_(fidx, fidx)] = sub.matrix
    return CompatibilityMatrix(measure=measure, workers=order, matrix=matrix)


def matrices(
    snaps: Mapping[str, Snapshot], measure: Measure, sketch: SketchPolicy | None = None
) -> dict[str, CompatibilityMatrix]:
    """All-pairs compatibility per layer over the given snapshots (workers lacking a layer skip
    it); layers a sketch policy covers are scored on their sketches."""
    size_blas_threads(snaps)
    return {
        layer: layer_matrix(layer, views, measure, sketch)
        for layer, views in layer_table(snaps, sketch, measure).items()
    }


def layer_row(
    layer: str,
    views: Mapping[str, View],
    wid: str,
    measure: Measure,
    sketch: SketchPolicy | None,
) -> dict[str, float]:
    """Scores of `wid` against every other worker on one layer: one pass over the M tethers
    (or sketches), not the M² pairs of the full matrix. Mixed tether/sketch pairs: NaN."""
    own = views[wid]
    others = {w: v for w, v in views.items() if w != wid}
    same = {
        w: v
        for w, v in others.items()
        if isinstance(v, LayerSketch) == isinstance(own, LayerSketch)
    }
    out = dict.fromkeys(others, float("nan"))
    if isinstance(own, LayerSketch):
        assert sketch is not None, "sketch views without a sketch policy"
        out.update(sketch_row_scores(own, same, sketch, layer, measure))  # type: ignore[arg-type]
    elif same:
        out.update(row_scores(own, same, measure))  # type: ignore[arg-type]
    return out


BATCH_GRAM_MIN = 3  # publishers in a batch from which one full matrix beats their rows


@functools.cache
def _blas() -> tuple[ThreadpoolController, int]:
    """The process's BLAS libraries and the thread count they started with."""
    blas = ThreadpoolController().select(user_api="blas")
    return blas, max((lib["num_threads"] for lib in blas.info()), default=1)


def size_blas_threads(snaps: Mapping[str, Snapshot]) -> None:
    """Give BLAS one thread for a round over less than SMALL_ROUND_BYTES, else its own count.
    Set, not scoped: rounds overlapping in one process (thread-mode scoring beside the
    compatibility endpoint) may run with each other's count, which changes only their speed."""
    blas, threads = _blas()
    small = sum(len(s.buf) for s in snaps.values()) < SMALL_ROUND_BYTES
    blas.limit(limits=1 if small else threads)


def batch_scores(
    snaps: Mapping[str, Snapshot],
    publishers: list[str],
    measure: Measure,
    sketch: SketchPolicy | None = None,
) -> dict[str, dict[str, Mapping[str, float]]]:
    """Publisher → layer → partner → score. Few publishers: their rows; many: the full
    matrix of each layer once (one Gram), each publisher's row a `ScoreRow` view of it."""
    out: dict[str, dict[str, Mapping[str, float]]] = {wid: {} for wid in publishers}
    if len(snaps) < 2:
        return out
    size_blas_threads(snaps)
    for layer, views in layer_table(snaps, sketch, measure).items():
        here = [wid for wid in publishers if wid in views]
        if len(views) < 2 or not here:
            continue
        if len(here) < BATCH_GRAM_MIN:
            for wid in here:
                out[wid][layer] = layer_row(layer, views, wid, measure, sketch)
        else:
            m = layer_matrix(layer, views, measure, sketch)
            index = {w: i for i, w in enumerate(m.workers)}
            for wid in here:
                out[wid][layer] = ScoreRow(m.workers, m.matrix[index[wid]], wid, index)
    return out


def peer_state(snap: Snapshot, group: str | None = None) -> PeerState | None:
    """A partner as the policy sees it: the step it was scored at, the version of its full
    tether (what applying a decision fetches) and its registered group (`workerfacts.group_of`;
    None when unknown or without one); None when it has published no full tether yet."""
    full = snap.memo.get("full_version", 0) if snap.sketched is not None else snap.version
    return PeerState(snap.worker_id, snap.step, full, group) if full else None


class Scorer:
    """One consumer of the scoring group; `run()` loops until cancelled."""

    def __init__(self, store: Store, metrics: ScoringMetrics | None = None) -> None:
        self.store = store
        self.metrics = metrics if metrics is not None else ScoringMetrics()
        self.settings = store.settings
        self.consumer = store.settings.consumer_name
        self.cache = SnapshotCache(store)
        self.facts = WorkerFacts(store)  # origins (update_cosine) and groups (fedavg_within)
        self._last_reclaim = 0.0
        self.deferred = Deferred()  # synchronous rounds waiting for peers (`rounds`)
        self.stopping = asyncio.Event()
        self.health = ScorerHealth()  # how its steps go (`liveness`: /readyz)

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
                if await self.step():
                    self.health.succeeded()
            except asyncio.CancelledError:
                raise
            except aioredis.ResponseError as error:
                self.health.failed(error)
                # NOGROUP: Redis lost the scoring group (FLUSHALL, eviction, restart without
                # AOF). UNBLOCKED: Redis 7 ends a blocked XREADGROUP with it when the stream
                # is deleted meanwhile (or the server became a replica). Either way: recreate
                # the group; publishes re-create the stream, so no new work is lost.
                if not str(error).startswith(("NOGROUP", "UNBLOCKED")):
                    raise
                log.warning("scoring group lost (%s); recreating it", error)
                await self.ensure_group()
            except Exception as error:  # keep scoring after a transient Redis or data error
                self.health.failed(error)
                log.exception("scoring step failed")
                await asyncio.sleep(0.5)

    async def step(self, block_ms: int | None = None) -> int:
        """One pass: reclaimed entries first, else new ones, scored as a batch; returns entries."""
        key = self.store.keys.scoring()
        entries = await self._reclaim() if self._reclaim_due() else []
        if not entries:
            block = self.settings.scoring_block_ms if block_ms is None else block_ms
            if self.deferred:  # deferred rounds are examined again at least this often
                block = min(block, DEFERRED_WAKE_MS)
            entries = replies.read_entries(
                await self.store.blocking.xreadgroup(
                    GROUP, self.consumer, {key: ">"}, count=BATCH, block=block
                )
            )
        entries = self.deferred.join(entries)
        await self.handle(entries)
        return len(entries)

    def _reclaim_due(self) -> bool:
        # Looking for a dead consumer's entries costs a round trip; once per half idle period
        # is enough to reclaim them within `reclaim_idle_ms` and a half.
        now = time.monotonic()
        if now - self._last_reclaim < self.settings.reclaim_idle_ms / 2000:
            return False
        self._last_reclaim = now
        return True

    async def _reclaim(self) -> Entries:
        claimed = await self.store.r.xautoclaim(
            self.store.keys.scoring(),
            GROUP,
            self.consumer,
            min_idle_time=self.settings.reclaim_idle_ms,
            count=BATCH,
        )
        return [e for e in claimed[1] if e and e[1]]

    async def handle(self, entries: Entries) -> None:
        """Score a batch (each federation's snapshots loaded once, each worker scored once at
        its latest version), then XACK and XDEL every entry but those of synchronous rounds
        still waiting for peers: those stay pending, deferred (`rounds`)."""
        todo: dict[str, dict[str, float]] = {}  # federation → worker → newest publish (Unix s)
        for entry_id, fields in entries:
            if fields:
                wids = todo.setdefault(fields["fed"], {})
                at = entry_seconds(entry_id)
                wids[fields["worker"]] = max(wids.get(fields["worker"], at), at)
        waiting: set[tuple[str, str]] = set()
        for fed, published in todo.items():
            held = await self._waiting(fed, published)
            waiting.update((fed, wid) for wid in held)
            if len(held) < len(published):
                await self.score_many(fed, sorted(set(published) - held))
        deferred = [e for e in entries if e[1] and (e[1]["fed"], e[1]["worker"]) in waiting]
        await self._defer(deferred)
        entries = [e for e in entries if not (e[1] and (e[1]["fed"], e[1]["worker"]) in waiting)]
        if entries:
            ids = [entry_id for entry_id, _ in entries]
            async with self.store.r.pipeline(transaction=True) as pipe:
                pipe.xack(self.store.keys.scoring(), GROUP, *ids)
                pipe.xdel(self.store.keys.scoring(), *ids)
                await pipe.execute()
            self._observe_latency(entries)

    async def _waiting(self, fed: str, published: Mapping[str, float]) -> set[str]:
        """The publishers of `fed` (worker → when its newest entry was added, Unix s) whose
        synchronous round waits for peers (`rounds.deferral`); none outside synchronous rounds.
        A round scored without peers that timed out is logged."""
        raw_policy = await self.store.r.hget(self.store.keys.federation(fed), "policy")
        policy = None if raw_policy is None else Policy.model_validate_json(raw_policy)
        if policy is None or policy.sync_every is None:
            return set()
        include, sketches = list(published), policy.sketch is not None
        active = await self.store.active_versions(fed, include, sketches)
        snaps = await self.cache.active(fed, include=include, sketches=sketches)
        peers = {wid: snaps[wid].step if wid in snaps else None for wid in active}
        now, held = time.time(), set()
        for wid, at in published.items():
            own = snaps.get(wid)
            if own is None:
                continue  # left, or nothing to score: score_many settles it
            if deferral(policy, own.step, wid, peers, now - at):
                held.add(wid)
                continue
            late = missing_peers(own.step, wid, peers) if round_step(policy, own.step) else []
            if late:
                log.info(
                    "federation %r: round of %s at step %d scored without %s (sync_timeout_s "
                    "%g s passed)",
                    fed,
                    wid,
                    own.step,
                    ", ".join(late),
                    policy.sync_timeout_s,
                )
        return held

    async def _defer(self, entries: Entries) -> None:
        """Keep exactly `entries` deferred, claimed again by this consumer (XCLAIM resets their
        idle time: no live scorer reclaims them; a dead one's are reclaimed after
        `reclaim_idle_ms`)."""
        self.deferred.keep(entries)
        if entries:
            await self.store.r.xclaim(
                self.store.keys.scoring(),
                GROUP,
                self.consumer,
                min_idle_time=0,
                message_ids=[entry_id for entry_id, _ in entries],
                justid=True,
            )

    def _observe_latency(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        # An entry's id is the Redis clock (ms) when its publish committed; on another machine
        # than Redis this includes the clocks' offset.
        now_ms = time.time() * 1000
        for entry_id, fields in entries:
            if fields:
                seconds = (now_ms - int(entry_id.split("-", 1)[0])) / 1000
                self.metrics.publish_to_decision.observe(max(seconds, 0.0))

    async def score(self, fed: str, wid: str) -> list[int] | None:
        """Score the worker's latest snapshot; the new decision ids, or None if nothing to do."""
        return (await self.score_many(fed, [wid])).get(wid)

    async def score_many(
        self, fed: str, wids: list[str], attempts: int = 3
    ) -> dict[str, list[int] | None]:
        """Score several publishers of one federation against one load of its snapshots: one
        scoring computation for the batch, one pipeline of commits (each commit atomic).
        Workers whose state another scorer changed meanwhile, or whose round names a partner
        snapshot superseded since it was read (it could no longer be pinned), are rescored
        (`attempts`): a decision never names a snapshot the worker cannot fetch."""
        store, keys = self.store, self.store.keys
        raw_policy = await store.r.hget(keys.federation(fed), "policy")
        if raw_policy is None:  # deleted: forget its frames too
            self.cache.forget(fed)
            self.facts.forget(fed)
            return {}
        policy = Policy.model_validate_json(raw_policy)
        snaps = await self.cache.active(fed, include=wids, sketches=policy.sketch is not None)
        async with store.r.pipeline(transaction=False) as pipe:
            for wid in wids:
                pipe.hget(keys.worker(fed, wid), "scored_version")
            scored = {w: int(done or 0) for w, done in zip(wids, await pipe.execute(), strict=True)}
        out: dict[str, list[int] | None] = dict.fromkeys(wids)
        todo = [wid for wid in wids if wid in snaps and snaps[wid].version > scored[wid]]
        if not todo:
            return out
        with self.metrics.round_seconds.time():
            replies = await self._score_todo(fed, policy, snaps, todo, scored)
        out.update({w: [int(i) for i in r] for w, r in replies.items() if isinstance(r, list)})
        raced = [w for w, r in replies.items() if r in (RACED, STALE_PARTNER)]
        if raced and attempts > 1:
            out.update(await self.score_many(fed, raced, attempts - 1))
        elif raced:  # their next publish (or their partners') scores them again
            log.info("federation %r: rounds of %s raced every attempt; not committed", fed, raced)
        return out

    async def _score_todo(
        self,
        fed: str,
        policy: Policy,
        snaps: dict[str, Snapshot],
        todo: list[str],
        scored: dict[str, int],
    ) -> dict[str, Any]:
        """Score, decide and commit `todo`'s rounds; each worker's commit reply."""
        started = time.perf_counter()
        states = await self._states(fed, todo, snaps, policy)
        work = functools.partial(self._decide_batch, policy, states, snaps)
        if sum(len(snap.buf) for snap in snaps.values()) < INLINE_BYTES:
            rounds = work()  # cheaper than the hop to a worker thread
        else:
            rounds = await anyio.to_thread.run_sync(work)
        seconds = time.perf_counter() - started
        replies = await self._commit_batch(fed, policy, snaps, rounds, scored)
        await self._want_full(
            fed, snaps, [rounds[w] for w, r in replies.items() if isinstance(r, list)]
        )
        committed = {w: [int(i) for i in r] for w, r in replies.items() if isinstance(r, list)}
        self._count(
            seconds, len(committed), [d for wid in committed for d in rounds[wid].decisions]
        )
        return replies

    async def _want_full(
        self, fed: str, snaps: Mapping[str, Snapshot], rounds: list[Round]
    ) -> None:
        """Ask partners whose full tether is older than the sketch a merge or drift was decided
        on to publish it in full next (their next sketch publish is answered `full_requested`)."""
        partners = {
            d.partner_id
            for r in rounds
            for d in r.decisions
            if d.action != "hold"
            and d.partner_id is not None
            and d.partner_id in snaps
            and d.partner_snapshot is not None
            and d.partner_snapshot.version < snaps[d.partner_id].version
        }
        for partner in sorted(partners):
            await self.store.want_full(fed, partner)

    def _count(self, seconds: float, rounds: int, decisions: list[DecisionDraft]) -> None:
        self.metrics.seconds.inc(seconds)
        self.metrics.rounds.inc(rounds)
        for action in {d.action for d in decisions}:
            self.metrics.decisions.labels(action).inc(sum(d.action == action for d in decisions))

    async def _states(
        self,
        fed: str,
        wids: list[str],
        snaps: Mapping[str, Snapshot],
        policy: Policy | None = None,
    ) -> dict[str, FederationState]:
        """Each publisher's policy state, read in one pipeline with what `WorkerFacts` has not
        seen yet that `policy` needs: under `update_cosine` the workers' origins (recorded on
        `snaps`, where `layer_views` finds them), under `fedavg_within = "group"` their groups
        (on the peers). Without a policy: neither."""
        keys = self.store.keys
        grouped = (
            policy is not None
            and policy.fedavg_every is not None
            and policy.fedavg_within == "group"
        )
        origins = policy is not None and policy.measure == "update_cosine"
        async with self.store.r.pipeline(transaction=False) as pipe:
            for wid in wids:
                pipe.hgetall(keys.merges(fed, wid))
                pipe.hgetall(keys.cooldowns(fed, wid))
            asked = self.facts.ask(pipe, fed, snaps, origins=origins, groups=grouped)
            raw = await pipe.execute()
        await self.facts.settle(asked, raw[2 * len(wids) :])
        attach_origins(snaps, self.facts.origins(fed))
        groups = self.facts.groups(fed) if grouped else {}
        # One table for the batch (each publisher is left out of its own rows by the policy),
        # not a 999-entry dict per publisher of a 1,000-worker federation.
        peers = PeerTable(p for w, s in snaps.items() if (p := peer_state(s, groups.get(w))))
        return {
            wid: self._state(wid, snaps, peers, raw[2 * i], raw[2 * i + 1])
            for i, wid in enumerate(wids)
        }

    @staticmethod
    def _state(
        wid: str,
        snaps: Mapping[str, Snapshot],
        peers: PeerTable,
        merges_raw: dict[str, str],
        cool_raw: dict[str, str],
    ) -> FederationState:
        own = snaps[wid]
        same_epoch = merges_raw.pop("__epoch", None) == str(own.epoch)
        cooldowns = {}
        for field, step in cool_raw.items():
            layer, partner = field.split(FIELD_SEP, 1)
            cooldowns[(layer, partner)] = int(step)
        return FederationState(
            layer_order=list(own.entries),
            peers=peers,
            scores={},
            previous_loss=own.prev_loss,
            merges={k: int(v) for k, v in merges_raw.items()} if same_epoch else {},
            cooldowns=cooldowns,
        )

    @staticmethod
    def _decide_batch(
        policy: Policy, states: Mapping[str, FederationState], snaps: Mapping[str, Snapshot]
    ) -> dict[str, Round]:
        scores = batch_scores(snaps, list(states), policy.measure, policy.sketch)
        return {
            wid: decide(
                policy,
                dataclasses.replace(state, scores=scores[wid]),
                snaps[wid].meta.model_copy(update={"step": snaps[wid].step}),
            )
            for wid, state in states.items()
        }

    async def _commit_batch(
        self,
        fed: str,
        policy: Policy,
        snaps: Mapping[str, Snapshot],
        rounds: Mapping[str, Round],
        scored: Mapping[str, int],
    ) -> dict[str, Any]:
        """Each worker's commit reply: its decision ids, or -1 (scored already), -2 (gone),
        RACED (state changed since it was read), STALE_PARTNER (a partner published since)."""
        tags = await self._partner_tags(fed, rounds)
        async with self.store.r.pipeline(transaction=False) as pipe:
            for wid, result in rounds.items():
                self._commit(fed, policy, snaps[wid], result, scored[wid], tags, pipe)
            self.store.wait_for_replicas(pipe)
            replies = await pipe.execute()
        # Too few replicas: the step fails and its entries are redelivered; the rescore finds
        # the round committed (scored_version), or commits it anew after a failover lost it.
        self.store.check_replicated(replies[len(rounds) :], f"scoring round of {fed!r}")
        return dict(zip(rounds, replies[: len(rounds)], strict=True))

    async def _partner_tags(self, fed: str, rounds: Mapping[str, Round]) -> dict[str, str]:
        """The segment tag of each partner's stored snapshot a merge or drift names (its first
        segment is a key of the commit: the script reads the frame's header there). The commit
        checks it is still that snapshot, so a publish in between refuses the round."""
        partners = sorted({p for r in rounds.values() for p, _ in self._pins(r)})
        if not partners:
            return {}
        async with self.store.r.pipeline(transaction=False) as pipe:
            for partner in partners:
                pipe.hget(self.store.keys.snapshot_meta(fed, partner), "tag")
            tags = await pipe.execute()
        return {p: t or "" for p, t in zip(partners, tags, strict=True)}

    def _commit(
        self,
        fed: str,
        policy: Policy,
        own: Snapshot,
        result: Round,
        read_at: int,
        tags: Mapping[str, str],
        pipe: Any,
    ) -> None:
        """Queue the round's commit script (atomic on its own) on `pipe`."""
        keys, wid = self.store.keys, own.worker_id
        now = utcnow()
        pins = self._pins(result)
        index = {pin: k for k, pin in enumerate(pins, 1)}
        args: list[object] = [own.version, self.settings.stream_maxlen, own.epoch]
        args.append(len(result.decisions))
        for draft in result.decisions:
            args += [draft.action, self._body(fed, policy, own, draft, now)]
            args += [index.get(self._pin_of(draft) or ("", 0), 0), draft.layer]
        args.append(len(result.merges))
        for layer, n in result.merges.items():
            args += [layer, n]
        args.append(len(result.cooldowns))
        for (layer, partner), step in result.cooldowns.items():
            args += [f"{layer}{FIELD_SEP}{partner}", step]
        args.append(self._hold(own, result, now))
        args += [len(pins), max(1, int(self.settings.snapshot_pin_s * 1000))]
        for partner, version in pins:
            args += [version, tags.get(partner, "")]
        args.append(read_at)
        names = [
            keys.worker(fed, wid),
            keys.decision_seq(fed),
            keys.decisions(fed),
            keys.worker_decisions(fed, wid),
            keys.merges(fed, wid),
            keys.cooldowns(fed, wid),
            keys.federation(fed),
        ]
        for partner, version in pins:
            names += [
                keys.snapshot_meta(fed, partner),
                keys.pin(fed, partner, version),
                keys.segment(fed, partner, tags.get(partner, ""), 0),
            ]
        pipe.eval(self.store.commit_script, len(names), *names, *args)

    @staticmethod
    def _hold(own: Snapshot, result: Round, now: datetime) -> str:
        """The round's hold as stored on the worker record ('' when it decided a merge or
        drift: the record's hold is removed)."""
        if result.hold is None:
            return ""
        hold = Hold(
            code=result.hold.code,
            reason=result.hold.reason,
            layer=result.hold.layer,
            step=own.step,
            version=own.version,
            at=now,
        )
        return hold.model_dump_json()

    @staticmethod
    def _pin_of(draft: DecisionDraft) -> tuple[str, int] | None:
        """(partner, snapshot version) a decision applies, when applying it fetches a partner
        tether (a merge or a drift other than decouple); None otherwise."""
        ref = draft.partner_snapshot
        if draft.action == "hold" or draft.operator == "decouple" or ref is None:
            return None
        return ref.worker_id, ref.version

    @classmethod
    def _pins(cls, result: Round) -> list[tuple[str, int]]:
        """(partner, snapshot version) each merge or drift of the round applies: pinned by the
        commit (`Keys.pin`, the decided layers' segments only), so the worker applies what was
        scored even after the partner published again."""
        return sorted({pin for d in result.decisions if (pin := cls._pin_of(d)) is not None})

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


T = TypeVar("T")


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on uvloop when it is installed (uvicorn[standard] brings it, as
    the API process runs on it), else on asyncio's own loop. A scoring round makes about eight
    Redis round trips; on uvloop each costs a fraction of what asyncio's selector loop and
    socket transport cost in Python (the `latency` benchmark's scorer spent 13 % of its samples
    in them)."""
    if uvloop is None:
        return asyncio.run(main)
    return uvloop.run(main)


class ScoringThread:
    """The scoring loop on its own thread, event loop and Redis clients.

    Sharing the API's event loop, every Redis round trip of a scoring round waited behind the
    HTTP requests queued there; under load a round took ~100 ms and the backlog grew. Here the
    loop only competes for the GIL, which the interpreter hands over every few milliseconds.
    """

    def __init__(self, url: str, settings: Settings, metrics: ScoringMetrics) -> None:
        self.url, self.settings, self.metrics = url, settings, metrics
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scorer: Scorer | None = None
        self._thread = threading.Thread(target=self._main, name="tetherfed-scoring", daemon=True)

    def start(self, timeout_s: float = 10.0) -> ScoringThread:
        """Start the thread; returns once its scorer has joined the consumer group."""
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"the scoring thread did not start within {timeout_s} s")
        return self

    def _main(self) -> None:
        run_event_loop(self._run())

    async def _run(self) -> None:
        clients = redis_clients(self.url, self.settings.long_poll_max_s)
        try:
            self._scorer = Scorer(Store(*clients, self.settings), self.metrics)
            await self._scorer.ensure_group()
            self._loop = asyncio.get_running_loop()
            self._ready.set()
            await self._scorer.run()
        finally:
            self._ready.set()
            for client in clients:
                await aclose(client)

    def health(self) -> ScorerHealth | None:
        """Its scorer's health; None once the thread has ended."""
        return self._scorer.health if self._scorer and self._thread.is_alive() else None

    def stop(self, timeout_s: float) -> None:
        """Ask the loop to stop between steps (never mid-reply) and wait for the thread."""
        if self._loop is not None and self._scorer is not None:
            self._loop.call_soon_threadsafe(self._scorer.stopping.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("scoring thread did not stop within %s s", timeout_s)


class ScoringProcesses:
    """`n` scoring processes (`python -m tetherfed_coordinator.scorer`), each a consumer of the
    scoring group, so scoring runs in parallel with the API instead of sharing its GIL.

    They read the coordinator's settings from the environment it passes, die with it (Linux:
    PR_SET_PDEATHSIG) and are stopped by PID with SIGTERM, then SIGKILL. `supervise()` starts
    again one that died (killed, out of memory) under its consumer name, so it picks up its own
    pending entries; one that keeps dying young is restarted ever more slowly (up to 30 s apart).
    """

    RESTART_MIN_S, RESTART_MAX_S, SHORT_LIFE_S = 1.0, 30.0, 10.0

    def __init__(
        self, url: str, settings: Settings, n: int, env: dict[str, str] | None = None
    ) -> None:
        self.url, self.settings, self.n, self.env = url, settings, n, env or {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.restarts = 0
        self._started: list[float] = []
        self._delay = [self.RESTART_MIN_S] * n

    def start(self) -> ScoringProcesses:
        """Start the processes (they join the consumer group on their own)."""
        self.procs = [self._spawn(i) for i in range(self.n)]
        self._started = [time.monotonic()] * self.n
        return self

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        env = (
            os.environ
            | self.env
            | settings_env(self.settings)
            | {
                "TETHER_REDIS_URL": self.url,
                "TETHER_CONSUMER_NAME": self.consumers()[i],
            }
        )
        cmd = [sys.executable, "-m", "tetherfed_coordinator.scorer"]
        return subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)  # noqa: PLW1509

    def consumers(self) -> list[str]:
        """The processes' consumer names (each reports its health under its own)."""
        return [f"{self.settings.consumer_name}-s{i}" for i in range(self.n)]

    def restart_dead(self) -> int:
        """Start again each process that exited and whose restart delay has passed; returns how
        many were started. Call it from the thread that started them (PR_SET_PDEATHSIG follows
        the parent thread)."""
        started, now = 0, time.monotonic()
        for i, proc in enumerate(self.procs):
            if proc.poll() is None or now - self._started[i] < self._delay[i]:
                continue
            short = now - self._started[i] < self.SHORT_LIFE_S
            self._delay[i] = (
                min(2 * self._delay[i], self.RESTART_MAX_S) if short else self.RESTART_MIN_S
            )
            log.warning(
                "scoring process %d (pid %d) exited with code %s; starting it again",
                i,
                proc.pid,
                proc.returncode,
            )
            self.procs[i], self._started[i] = self._spawn(i), now
            self.restarts, started = self.restarts + 1, started + 1
        return started

    async def supervise(self, every_s: float = 0.5) -> None:
        """`restart_dead()` every `every_s` until cancelled (a task on the coordinator's loop)."""
        while True:
            await asyncio.sleep(every_s)
            self.restart_dead()

    def stop(self, timeout_s: float) -> None:
        """SIGTERM every process, wait, then SIGKILL what is left."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as TETHER_* environment variables (None values left out)."""
    out = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            out[f"TETHER_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return out
