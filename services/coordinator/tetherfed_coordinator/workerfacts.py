"""What a scorer knows of a worker for good: its origin (`update_cosine`) and its group.

Origin. `update_cosine` scores the update Tᵢ − Tᵢ⁰ of each worker's tether since its origin Tᵢ⁰,
the first tether it published (clustered FL, Sattler, Müller & Samek 2019; see
`tether_protocol.compat`). The publish that makes a worker's first snapshot under that measure
also copies it, meta hash and frame segments, to the worker's origin keys (`Keys.origin`,
`origin.lua`, queued in the publish's own transaction, so the copy is exactly the committed
frame and nothing is copied when the commit fails). The script writes only when the worker has
no origin yet, so every replica agrees on one, and a worker whose first publishes came under
another measure gets its origin at its first publish under `update_cosine`. Origins are never
changed: they go with the worker's keys (`Store.unlink_worker`) or its federation's
(`Store.delete_federation`); a worker that leaves and rejoins keeps its origin, and a worker
registered again is another worker id with an origin of its own.

Group. `Policy.fedavg_within = "group"` averages each worker with the peers of its group: the
`group` of the meta it registered with (as text; None without one). Registration meta never
changes.

Both are read once per worker and kept in memory, per federation incarnation (a federation
deleted and created again under its name starts empty): a round reads only the federation's
incarnation, in the pipeline the round sends anyway, plus whatever it has not seen yet.
Memory: one frame per worker with an origin, as `SnapshotCache` holds one per active worker.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .keys import Keys
from .replies import record
from .store import Snapshot, Store, all_present, incarnation, lua, snapshot_from

ORIGIN_SCRIPT = lua("origin.lua")
ORIGIN = "origin"  # Snapshot.memo key of the worker's origin snapshot (`attach_origins`)


def queue_origin(pipe: Any, keys: Keys, fed: str, wid: str, tag: str, count: int) -> None:
    """Queue `origin.lua` on `pipe`: keep the worker's snapshot uploaded under `tag` (`count`
    segments) as its origin, unless it has one already or that snapshot is not the stored one."""
    names = [
        keys.snapshot_meta(fed, wid),
        keys.origin(fed, wid),
        *(keys.segment(fed, wid, tag, i) for i in range(count)),
        *(keys.origin_segment(fed, wid, i) for i in range(count)),
    ]
    pipe.eval(ORIGIN_SCRIPT, len(names), *names, tag, count)


def group_of(meta_json: str | None) -> str | None:
    """The `group` of a worker's registration meta (JSON object), as text; None when it names
    none (or the worker is gone)."""
    if not meta_json:
        return None
    value = json.loads(meta_json).get("group")
    return None if value is None else str(value)


def attach_origins(snaps: Mapping[str, Snapshot], origins: Mapping[str, Snapshot]) -> None:
    """Record each snapshot's origin in its memo (`ORIGIN`), where `scoring.layer_views` finds
    it; snapshots of workers without an origin are left as they are."""
    for wid, snap in snaps.items():
        origin = origins.get(wid)
        if origin is not None:
            snap.memo[ORIGIN] = origin


@dataclass
class _Known:
    """One federation incarnation's facts: worker → origin, worker → group."""

    incarnation: str | None
    origins: dict[str, Snapshot] = field(default_factory=dict)
    groups: dict[str, str | None] = field(default_factory=dict)


@dataclass
class Asked:
    """The reads `WorkerFacts.ask` queued: replies come in this order after the caller's own."""

    fed: str
    wids: list[str]  # every worker asked about (known ones included)
    want_origins: bool
    want_groups: bool
    origins: list[str]  # those whose origin meta hash was queued
    groups: list[str]  # those whose registration meta was queued

    @property
    def size(self) -> int:
        """How many replies the queued commands give."""
        return 1 + len(self.origins) + len(self.groups)


class WorkerFacts:
    """Per federation, the origins and groups of its workers, read once and kept (see the module
    docstring). Use `ask` to queue the reads on a pipeline the caller sends anyway, then `settle`
    with their replies; or `load`, which sends them itself. Origins of workers a round no longer
    asks about (lost, left) are dropped, as `SnapshotCache` drops their frames."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._known: dict[str, _Known] = {}

    def ask(
        self, pipe: Any, fed: str, wids: Collection[str], *, origins: bool, groups: bool
    ) -> Asked | None:
        """Queue on `pipe` (a str-reply pipeline) the federation's incarnation and what is not
        known yet of `wids`: origin meta hashes (with `origins`), registration metas (with
        `groups`). None, and nothing queued, when neither is wanted."""
        if not origins and not groups:
            return None
        known = self._known.get(fed) or _Known(None)
        keys = self.store.keys
        asked = Asked(
            fed,
            sorted(wids),
            origins,
            groups,
            [w for w in sorted(wids) if w not in known.origins] if origins else [],
            [w for w in sorted(wids) if w not in known.groups] if groups else [],
        )
        pipe.hmget(keys.federation(fed), "incarnation", "created_at")
        for wid in asked.origins:
            pipe.hgetall(keys.origin(fed, wid))
        for wid in asked.groups:
            pipe.hget(keys.worker(fed, wid), "meta")
        return asked

    async def settle(self, asked: Asked | None, replies: Sequence[Any]) -> None:
        """Take in the replies to `ask`'s commands (in order). New origins are read here, once
        per worker (one more round trip when some appeared). When the federation was made anew
        since what is known was read, that goes and the reads are made again."""
        if asked is None:
            return
        fed = asked.fed
        made, created = replies[0]
        current = (
            None
            if created is None
            else incarnation({"incarnation": made or "", "created_at": created})
        )
        known = self._known.get(fed)
        if known is not None and known.incarnation != current:
            self._known[fed] = _Known(current)  # what was asked assumed the old facts
            await self.load(fed, asked.wids, origins=asked.want_origins, groups=asked.want_groups)
            return
        if known is None:
            known = self._known[fed] = _Known(current)
        at, metas = 1, {}
        for wid in asked.origins:
            if meta := record(replies[at]):
                metas[wid] = meta
            at += 1
        for wid in asked.groups:
            known.groups[wid] = group_of(replies[at])
            at += 1
        if asked.want_origins:
            asking = set(asked.wids)
            known.origins = {w: o for w, o in known.origins.items() if w in asking}
        if metas:
            known.origins.update(await self._origins(fed, metas))

    async def _origins(self, fed: str, metas: Mapping[str, dict[str, str]]) -> dict[str, Snapshot]:
        """The origin snapshots their meta hashes describe (one pipelined read of the segments);
        an origin missing a segment (its worker deleted meanwhile) is left out."""
        keys = self.store.keys
        names = {
            wid: [keys.origin_segment(fed, wid, i) for i in range(int(meta.get("segments", 0)))]
            for wid, meta in metas.items()
        }
        async with self.store.rb.pipeline(transaction=False) as pipe:
            for wid in metas:
                for name in names[wid]:
                    pipe.get(name)
            segments: list[bytes | None] = await pipe.execute()
        out, at = {}, 0
        for wid, meta in metas.items():
            parts = all_present(segments[at : at + len(names[wid])])
            at += len(names[wid])
            if parts is not None and (snap := snapshot_from(wid, meta, parts)) is not None:
                out[wid] = snap
        return out

    async def load(self, fed: str, wids: Collection[str], *, origins: bool, groups: bool) -> None:
        """`ask` and `settle` on a pipeline of their own."""
        async with self.store.r.pipeline(transaction=False) as pipe:
            asked = self.ask(pipe, fed, wids, origins=origins, groups=groups)
            replies = await pipe.execute() if asked is not None else []
        await self.settle(asked, replies)

    def origins(self, fed: str) -> dict[str, Snapshot]:
        """Worker → origin snapshot, of the workers read so far that have one."""
        known = self._known.get(fed)
        return dict(known.origins) if known else {}

    def groups(self, fed: str) -> dict[str, str | None]:
        """Worker → group (None: registered without one), of the workers read so far."""
        known = self._known.get(fed)
        return dict(known.groups) if known else {}

    def forget(self, fed: str) -> None:
        """Drop a (deleted) federation's facts."""
        self._known.pop(fed, None)
