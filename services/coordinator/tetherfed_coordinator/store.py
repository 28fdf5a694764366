"""All coordinator state, in Redis: federations, workers, snapshots, decisions, acks, lineage."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import secrets
import struct
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from importlib import resources
from typing import Any, cast

import redis.asyncio as aioredis

from tether_protocol.frame import (
    TensorEntry,
    parse_entries,
    read_header,
    split_entries,
)
from tether_protocol.messages import (
    AckCreate,
    AckPublic,
    Decision,
    FederationPublic,
    Hold,
    LayerSpec,
    Policy,
    SnapshotMeta,
    WorkerCreate,
    WorkerPublic,
    WorkerRegistered,
    utcnow,
)
from tether_protocol.sketch import SKETCH_KEY, decode_sketch_frame

from . import replies
from .errors import (
    Conflict,
    CoordinatorError,
    DecisionNotFound,
    FederationExists,
    FederationNotFound,
    Invalid,
    NoSnapshot,
    Unavailable,
    WorkerBusy,
    WorkerLeft,
    WorkerNotFound,
)
from .keys import Keys, glob_escape
from .replies import Fields
from .settings import Settings
from .topology import async_client, is_cluster

log = logging.getLogger(__name__)
FIELD_SEP = "\x00"
# A snapshot read retries workers whose segments a concurrent publish replaced this many times.
SNAPSHOT_READ_TRIES = 5
# Flag a worker (if it still exists) to publish its full tether next: see Scorer._want_full.
WANT_FULL = (
    "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'full_wanted', 1) end"
)


def lua(name: str) -> str:
    """Source of a Lua script shipped with the package."""
    return resources.files(__package__).joinpath(name).read_text()


def hash_token(token: str) -> str:
    """sha256 hex of a bearer token (tokens are stored hashed)."""
    return hashlib.sha256(token.encode()).hexdigest()


def _opt_float(text: str | None) -> float | None:
    return float(text) if text not in (None, "") else None


def _opt_int(text: str | None) -> int | None:
    return int(text) if text not in (None, "") else None


@dataclass
class Snapshot:
    """A worker's latest frame as stored: bytes, tether entries (absolute offsets) by layer,
    metadata, the probe Gram entries by layer (`cka`; empty when the worker sends none), and the
    parts by layer, then by entry name (`Policy.merge_scope` weights or model: `fc1@weight`;
    empty under scope tethers). `entries` holds tethers only: scoring never sees parts."""

    worker_id: str
    version: int
    step: int
    epoch: int
    prev_loss: float | None
    meta: SnapshotMeta
    buf: bytes
    entries: dict[str, TensorEntry]
    grams: dict[str, TensorEntry] = field(default_factory=dict)
    parts: dict[str, dict[str, TensorEntry]] = field(default_factory=dict)
    # Layer → sketch or tether, for a sketch publish (its frame holds sketches); None for a
    # full frame. `memo`: what the scorer derived from this snapshot (sketches of its layers).
    sketched: dict[str, Any] | None = None
    memo: dict[Any, Any] = field(default_factory=dict, repr=False)


def incarnation(record: Mapping[str, str]) -> str:
    """A federation hash's incarnation (one stored before incarnations: derived from its
    creation time, which is as unique)."""
    made = record.get("incarnation")
    return made or hashlib.sha256(record["created_at"].encode()).hexdigest()[:16]


def hold_of(record: Mapping[str, str]) -> Hold | None:
    """The hold a worker record holds (its latest round decided nothing to apply), if any."""
    raw = record.get("hold")
    return Hold.model_validate_json(raw) if raw else None


def snapshot_from(wid: str, meta: dict[str, str], segments: list[bytes]) -> Snapshot | None:
    """A Snapshot from its metadata hash and frame segments (None when it has none)."""
    if not meta or not segments:
        return None
    buf = segments[0] if len(segments) == 1 else b"".join(segments)
    header, start = read_header(buf)
    split = split_entries(parse_entries(header, start, len(buf)))
    return Snapshot(
        worker_id=wid,
        version=int(meta["version"]),
        step=int(meta["step"]),
        epoch=int(meta["epoch"]),
        prev_loss=_opt_float(meta.get("prev_loss")),
        meta=SnapshotMeta.model_validate_json(meta["meta"]),
        buf=buf,
        entries=split.tethers,
        grams=split.grams,
        parts=split.parts,
    )


def sketch_snapshot(wid: str, record: Mapping[bytes, bytes], full_version: int) -> Snapshot:
    """A Snapshot of a stored sketch publish (its frame was validated on the way in)."""
    text = {k.decode(): v.decode() for k, v in record.items() if k != b"frame"}
    frame, views = decode_sketch_frame(record[b"frame"], None, None)
    assert frame.meta is not None
    layout = json.loads(frame.extra_metadata[SKETCH_KEY])
    return Snapshot(
        worker_id=wid,
        version=int(text["version"]),
        step=int(text["step"]),
        epoch=int(text["epoch"]),
        prev_loss=_opt_float(text.get("prev_loss")),
        meta=frame.meta,
        buf=record[b"frame"],
        entries=frame.entries,
        sketched=views,
        memo={"sketch_spec": (int(layout["k"]), int(layout["seed"])), "full_version": full_version},
    )


def frame_keys(keys: Keys, fed: str, wid: str, meta: Mapping[str, str]) -> list[str]:
    """The keys holding the frame a snapshot meta hash describes, in order (none without one)."""
    if "tag" in meta:
        return [keys.segment(fed, wid, meta["tag"], i) for i in range(int(meta["segments"]))]
    return [keys.legacy_snapshot(fed, wid)] if meta else []


def all_present(parts: Sequence[bytes | None]) -> list[bytes] | None:
    """The segments of a frame as read, or None when one is missing (it expired, or a publish
    replaced the frame between the reads)."""
    present = [part for part in parts if part is not None]
    return present if len(present) == len(parts) else None


def _span(entries: Sequence[TensorEntry]) -> tuple[int, int]:
    """(first byte, end) of the bytes holding `entries` (absolute offsets)."""
    return min(e.start for e in entries), max(e.end for e in entries)


def _rebase(entry: TensorEntry, base: int) -> TensorEntry:
    return replace(entry, start=entry.start - base, end=entry.end - base)


def _pinned_entry(name: str, where: Mapping[str, Any], base: int) -> TensorEntry:
    """A tensor entry as commit.lua recorded it in a pin's `L:<layer>` (`start`, `stop`: byte
    offsets in the frame; `dtype`, `shape`), with offsets into the segments read from `base`."""
    spec = {
        "dtype": where["dtype"],
        "shape": list(where["shape"]),  # cjson writes [] as {}
        "data_offsets": [0, where["stop"] - where["start"]],
    }
    return parse_entries({name: spec}, where["start"] - base, where["stop"] - base)[name]


def stored_frame(client: Any, keys: Keys, fed: str, wid: str) -> tuple[bytes, list[bytes]] | None:
    """(frame, its keys) of the worker's latest snapshot as stored, read with a synchronous
    redis-py client (tools and tests); None when it has none."""
    meta = {k.decode(): v.decode() for k, v in client.hgetall(keys.snapshot_meta(fed, wid)).items()}
    names = frame_keys(keys, fed, wid, meta)
    if not names:
        return None
    parts = client.mget(names)
    if any(part is None for part in parts):
        return None
    return b"".join(parts), [name.encode() for name in names]


def redis_clients(
    url: str, block_s: float = 60.0
) -> tuple[aioredis.Redis, aioredis.Redis, aioredis.Redis]:
    """The three clients a Store uses: str replies, bytes replies, and blocking reads of up to
    `block_s` (a pool large enough for every worker's long-poll to hold a connection). `url`
    names one server, a Sentinel service or a Cluster (`topology`). The other two pools are
    as large: redis-py's default of 100 connections failed requests with "Too many
    connections" once 128 publishes were in flight at once (load-1000, two generators)."""
    r = async_client(url, decode_responses=True, max_connections=1000)
    rb = async_client(url, decode_responses=False, max_connections=1000)
    blocking = async_client(url, decode_responses=True, max_connections=1000, block_s=block_s)
    return r, rb, blocking


class Store:
    """Typed access to the coordinator's Redis keys.

    `r` decodes responses to str; `rb` returns bytes (frames, and the streamed uploads);
    `blocking` serves XREAD BLOCK so long polls never starve the main pool.
    """

    def __init__(
        self,
        r: aioredis.Redis,
        rb: aioredis.Redis,
        blocking: aioredis.Redis,
        settings: Settings,
    ) -> None:
        self.r, self.rb, self.blocking = r, rb, blocking
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        # Sent whole with EVAL, not EVALSHA: a server that never saw a script (a promoted
        # replica, another Cluster node) runs it all the same, inside pipelines too.
        self.publish_script = lua("publish.lua")
        self.abort_script = lua("abort.lua")
        self.commit_script = lua("commit.lua")
        self.sketch_script = lua("sketch.lua")
        self.active_script = lua("active.lua")
        self.release_script = lua("release.lua")

    # ---------------------------------------------------------------- federations
    async def create_federation(self, name: str, policy: Policy) -> FederationPublic:
        """Create a federation; FederationExists if the name is taken."""
        if not await self.r.sadd(self.keys.federations(), name):
            raise FederationExists(name)
        now = utcnow().isoformat()
        fields: Fields = {
            "policy": policy.model_dump_json(),
            "created_at": now,
            "incarnation": secrets.token_hex(8),
        }
        await self.r.hset(self.keys.federation(name), mapping=fields)
        return await self.federation(name)

    async def policy(self, fed: str) -> Policy:
        """The federation's policy; FederationNotFound if the federation is unknown."""
        raw = await self.r.hget(self.keys.federation(fed), "policy")
        if raw is None:
            raise FederationNotFound(fed)
        return Policy.model_validate_json(raw)

    async def federation(self, fed: str) -> FederationPublic:
        """The federation as REST shows it."""
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.federation(fed))
            pipe.scard(self.keys.workers(fed))
            pipe.get(self.keys.decision_seq(fed))
            record, workers, seq = await pipe.execute()
        if not record:
            raise FederationNotFound(fed)
        return FederationPublic(
            name=fed,
            policy=Policy.model_validate_json(record["policy"]),
            created_at=datetime.fromisoformat(record["created_at"]),
            workers=workers,
            decisions=int(seq or 0),
            incarnation=incarnation(record),
        )

    async def incarnation(self, fed: str) -> tuple[Policy, str]:
        """The federation's policy and incarnation; FederationNotFound if it is unknown."""
        raw = replies.record(await self.r.hgetall(self.keys.federation(fed)))
        if not raw:
            raise FederationNotFound(fed)
        return Policy.model_validate_json(raw["policy"]), incarnation(raw)

    async def federations(self) -> list[FederationPublic]:
        """Every federation, sorted by name."""
        names = sorted(replies.texts(await self.r.smembers(self.keys.federations())))
        out = []
        for name in names:
            try:
                out.append(await self.federation(name))
            except FederationNotFound:
                continue  # deleted meanwhile
        return out

    async def set_policy(self, fed: str, policy: Policy) -> None:
        """Replace the federation's policy. Conflict (409, naming the layer) when it asks for
        `merge_scope` weights or model while the active workers' layer tables differ (merging
        weights needs one architecture; see `layer_table_conflict`)."""
        if policy.merge_scope != "tethers":
            problem = await self.layer_table_conflict(fed, policy)
            if problem is not None:
                raise Conflict(problem)
        await self.r.hset(self.keys.federation(fed), "policy", policy.model_dump_json())

    async def delete_federation(self, fed: str) -> None:
        """Remove the federation and every key below it."""
        await self.policy(fed)
        await self.r.srem(self.keys.federations(), fed)
        await self.r.unlink(self.keys.federation(fed))
        await self.unlink_matching(self.keys.federation_match(fed))

    async def unlink_worker(self, fed: str, wid: str) -> None:
        """Remove a worker's hash and every key below it."""
        await self.r.unlink(self.keys.worker(fed, wid))
        await self.unlink_matching(glob_escape(self.keys.worker(fed, wid) + ":") + "*")

    async def unlink_matching(self, pattern: str) -> None:
        """Remove every key matching a SCAN pattern (UNLINK in batches)."""
        batch: list[str] = []
        async for key in self.r.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                await self.r.unlink(*batch)
                batch.clear()
        if batch:
            await self.r.unlink(*batch)

    # ---------------------------------------------------------------- workers
    async def register(self, fed: str, body: WorkerCreate) -> WorkerRegistered:
        """Register a worker: a fresh id and token; the worker starts active. Under
        `merge_scope` weights or model, Invalid (422, naming the layer) when its layer table
        differs from an active worker's (`layer_table_conflict`); nothing is written. (422, not
        409: the table is what is wrong, and a `Federation` treats a refused first registration
        as final rather than retrying it; a policy change that conflicts answers 409.)"""
        policy, made = await self.incarnation(fed)
        if policy.merge_scope != "tethers":
            problem = await self.layer_table_conflict(fed, policy, body.layers)
            if problem is not None:
                raise Invalid(problem)
        wid = f"{body.name}-{secrets.token_hex(3)}"
        while await self.r.sismember(self.keys.workers(fed), wid):
            wid = f"{body.name}-{secrets.token_hex(3)}"
        token = secrets.token_urlsafe(32)
        fields: Fields = {
            "name": body.name,
            "layers": json.dumps([layer.model_dump() for layer in body.layers]),
            "meta": json.dumps(body.meta),
            "token_hash": hash_token(token),
            "registered_at": utcnow().isoformat(),
            "status": "active",
            "version": 0,
            "incarnation": made,
        }
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.worker(fed, wid), mapping=fields)
            pipe.sadd(self.keys.workers(fed), wid)
            pipe.hset(self.keys.tokens(fed), hash_token(token), wid)
            pipe.set(self.keys.alive(fed, wid), "1", px=self._ttl_ms())
            await pipe.execute()
        return WorkerRegistered(
            worker_id=wid, token=token, federation=fed, policy=policy, incarnation=made
        )

    async def layer_table_conflict(
        self, fed: str, policy: Policy, table: Sequence[LayerSpec] | None = None
    ) -> str | None:
        """Why `merge_scope` weights or model cannot hold: the first layer (in table order) that
        is missing from, or has another shape in, one of the active workers' tables, compared
        with `table` (a registering worker's) or, without one, with the first active worker's
        (a policy change); None when they agree. Names and shapes are compared (a wire dtype
        may differ; layer order too, though `model` assigns untethered tensors by module order,
        so one architecture gives one order). Checked when the request is served, not atomically
        with a concurrent registration."""
        wids = await self.active_ids(fed)
        async with self.r.pipeline(transaction=False) as pipe:
            for wid in wids:
                pipe.hget(self.keys.worker(fed, wid), "layers")
            raw = await pipe.execute()
        tables = [
            (wid, {x["name"]: list(x["shape"]) for x in json.loads(text)})
            for wid, text in zip(wids, raw, strict=True)
            if text  # left meanwhile
        ]
        if table is None:
            if not tables:
                return None
            base_id, base = tables[0]
            tables, here = tables[1:], f"worker {base_id!r}"
        else:
            base, here = {spec.name: list(spec.shape) for spec in table}, "this worker"
        scope = f"merge_scope {policy.merge_scope} needs one layer table"
        for wid, other in tables:
            for name in [*base, *(n for n in other if n not in base)]:
                ours, theirs = base.get(name), other.get(name)
                if ours == theirs:
                    continue
                if ours is None:
                    return f"{scope}: layer {name!r} of worker {wid!r} is missing at {here}"
                if theirs is None:
                    return f"{scope}: layer {name!r} of {here} is missing at worker {wid!r}"
                return (
                    f"{scope}: layer {name!r} has shape {ours} at {here}, {theirs} at worker "
                    f"{wid!r}"
                )
        return None

    def _ttl_ms(self) -> int:
        return max(1, int(self.settings.heartbeat_ttl_s * 1000))

    async def worker_record(self, fed: str, wid: str) -> dict[str, str]:
        """The raw worker hash; FederationNotFound / WorkerNotFound for an unknown one."""
        found = replies.record(await self.r.hgetall(self.keys.worker(fed, wid)))
        if not found:
            await self.policy(fed)
            raise WorkerNotFound(fed, wid)
        return found

    async def poll_context(self, fed: str, wid: str) -> tuple[dict[str, str], int]:
        """A long poll's worker record and the federation's last decision id, in one round
        trip; FederationNotFound / WorkerNotFound for an unknown federation or worker."""
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.worker(fed, wid))
            pipe.get(self.keys.decision_seq(fed))
            record, seq = await pipe.execute()
        if not record:
            await self.policy(fed)
            raise WorkerNotFound(fed, wid)
        return record, int(seq or 0)

    async def publish_context(
        self, fed: str, wid: str
    ) -> tuple[Policy, dict[str, str], dict[str, str]]:
        """What a publish needs before its body, in one round trip: the federation's policy, the
        worker's record and its current snapshot metadata (empty before its first publish);
        FederationNotFound / WorkerNotFound for an unknown federation or worker."""
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.hget(self.keys.federation(fed), "policy")
            pipe.hgetall(self.keys.worker(fed, wid))
            pipe.hgetall(self.keys.snapshot_meta(fed, wid))
            policy, record, prev = await pipe.execute()
        if policy is None:
            raise FederationNotFound(fed)
        if not record:
            raise WorkerNotFound(fed, wid)
        return Policy.model_validate_json(policy), record, prev

    @staticmethod
    def layers_of(record: dict[str, str]) -> list[LayerSpec]:
        """The registered layer table of a worker record."""
        return [LayerSpec.model_validate(x) for x in json.loads(record["layers"])]

    async def worker_incarnation(self, fed: str, wid: str) -> str:
        """The incarnation a worker was registered in ('' for records older than them)."""
        return replies.opt_text(await self.r.hget(self.keys.worker(fed, wid), "incarnation")) or ""

    async def worker_public(self, fed: str, wid: str) -> WorkerPublic:
        """One worker as REST shows it."""
        record = await self.worker_record(fed, wid)
        alive = await self.r.exists(self.keys.alive(fed, wid))
        generations = replies.opt_text(await self.r.hget(self.keys.snapshot_meta(fed, wid), "meta"))
        return self._public(fed, wid, record, bool(alive), generations)

    def _public(
        self, fed: str, wid: str, record: dict[str, str], alive: bool, meta: str | None
    ) -> WorkerPublic:
        status = record["status"] if record["status"] == "left" else "active" if alive else "lost"
        generation = sum(SnapshotMeta.model_validate_json(meta).generations.values()) if meta else 0
        last_seen = record.get("last_seen") or record["registered_at"]
        return WorkerPublic(
            worker_id=wid,
            name=record["name"],
            federation=fed,
            status=status,  # type: ignore[arg-type]
            layers=self.layers_of(record),
            meta=json.loads(record["meta"]),
            step=_opt_int(record.get("step")),
            epoch=_opt_int(record.get("epoch")),
            loss=_opt_float(record.get("loss")),
            generation=generation,
            snapshot_version=int(record.get("version", 0)),
            registered_at=datetime.fromisoformat(record["registered_at"]),
            last_seen=datetime.fromisoformat(last_seen),
            hold=hold_of(record),
        )

    async def workers(self, fed: str) -> list[WorkerPublic]:
        """Every worker of a federation, sorted by id."""
        await self.policy(fed)
        wids = sorted(replies.texts(await self.r.smembers(self.keys.workers(fed))))
        async with self.r.pipeline(transaction=False) as pipe:
            for wid in wids:
                pipe.hgetall(self.keys.worker(fed, wid))
                pipe.exists(self.keys.alive(fed, wid))
                pipe.hget(self.keys.snapshot_meta(fed, wid), "meta")
            raw = await pipe.execute()
        out = []
        for i, wid in enumerate(wids):
            record, alive, meta = raw[3 * i : 3 * i + 3]
            if record:
                out.append(self._public(fed, wid, record, bool(alive), meta))
        return out

    async def heartbeat(
        self,
        fed: str,
        wid: str,
        step: int,
        epoch: int,
        loss: float | None,
        grad_norm: float | None,
        session: str | None = None,
        ending: bool = False,
    ) -> dict[str, str]:
        """Record progress and renew the liveness TTL (a lost worker becomes active again);
        WorkerLeft for a worker that left, WorkerBusy when another process (`session`)
        heartbeat under this worker id within the TTL. Returns the worker record as it was
        before."""
        record = await self.worker_record(fed, wid)
        if record["status"] == "left":
            raise WorkerLeft(fed, wid)
        self._fence(wid, record, session)
        ttl = self.settings.heartbeat_ttl_s  # an ending session is recorded as already lapsed
        fields: Fields = {
            "step": step,
            "epoch": epoch,
            "loss": "" if loss is None else loss,
            "grad_norm": "" if grad_norm is None else grad_norm,
            "last_seen": utcnow().isoformat(),
        }
        if session:
            fields |= {"session": session, "session_at": time.time() - (ttl if ending else 0.0)}
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.worker(fed, wid), mapping=fields)
            pipe.set(self.keys.alive(fed, wid), "1", px=self._ttl_ms())
            await pipe.execute()
        return record

    def _fence(self, wid: str, record: dict[str, str], session: str | None) -> None:
        held, at = record.get("session"), float(record.get("session_at") or 0)
        ttl = self.settings.heartbeat_ttl_s
        if session and held and held != session and time.time() - at < ttl:
            raise WorkerBusy(wid, held, ttl)

    async def leave(self, fed: str, wid: str) -> None:
        """Mark a worker as left: out of scoring for good; its history stays readable."""
        await self.worker_record(fed, wid)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hdel(self.keys.worker(fed, wid), "session", "session_at")  # not running
            pipe.hset(
                self.keys.worker(fed, wid),
                mapping={"status": "left", "last_seen": utcnow().isoformat()},
            )
            pipe.delete(self.keys.alive(fed, wid))
            await pipe.execute()

    async def rejoin(self, fed: str, wid: str) -> WorkerPublic:
        """A worker that left comes back under its id (a resumed run): active and alive again."""
        await self.worker_record(fed, wid)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(
                self.keys.worker(fed, wid),
                mapping={"status": "active", "last_seen": utcnow().isoformat()},
            )
            pipe.set(self.keys.alive(fed, wid), "1", px=self._ttl_ms())
            await pipe.execute()
        return await self.worker_public(fed, wid)

    async def token_owner(self, fed: str, token: str) -> str | None:
        """The worker id a bearer token belongs to in this federation, if any."""
        return replies.opt_text(await self.r.hget(self.keys.tokens(fed), hash_token(token)))

    # ---------------------------------------------------------------- snapshots
    async def snapshot(self, fed: str, wid: str) -> Snapshot:
        """The worker's latest snapshot; NoSnapshot when it has none."""
        await self.worker_record(fed, wid)
        found = await self._snapshots(fed, [wid])
        if wid not in found:
            raise NoSnapshot(fed, wid)
        return found[wid]

    async def snapshot_layer(self, fed: str, wid: str, layer: str) -> Snapshot:
        """The worker's latest snapshot with only the segments holding `layer` read: its `buf`
        covers that tensor's bytes and its parts' (`parts[layer]`, `Policy.merge_scope`), and
        `entries` has that layer alone (offsets into `buf`), or no layer when the frame lacks it. Fetching a partner's layer to apply a merge then reads
        that layer, not the whole frame (a 4 MB layer of a 16 MB frame: a quarter). NoSnapshot when
        the worker has no snapshot; the caller checks that the worker exists."""
        for _ in range(SNAPSHOT_READ_TRIES):
            meta = replies.record(await self.r.hgetall(self.keys.snapshot_meta(fed, wid)))
            names = frame_keys(self.keys, fed, wid, meta)
            if len(names) < 2:  # one segment, or a frame stored whole: read it all
                break
            async with self.rb.pipeline(transaction=False) as pipe:
                pipe.get(names[0])
                pipe.strlen(names[-1])
                first: bytes | None
                first, last_len = await pipe.execute()
            if first is None or not last_len:
                continue  # a publish replaced the segments between the reads
            size = len(first)  # every segment but the last has the upload's segment size
            (length,) = struct.unpack_from("<Q", first, 0)
            if 8 + length > size:
                break  # a header spanning segments: read it all
            header, start = read_header(first)
            total = size * (len(names) - 1) + last_len
            split = split_entries(parse_entries(header, start, total))
            entry = split.tethers.get(layer)
            parts = split.parts.get(layer, {}) if entry is not None else {}
            lo = hi = 0
            if entry is not None:
                first_byte, end = _span([entry, *parts.values()])
                lo, hi = first_byte // size, max(end - 1, first_byte) // size
            async with self.rb.pipeline(transaction=False) as pipe:
                for name in names[max(lo, 1) : hi + 1]:
                    pipe.get(name)
                rest: list[bytes | None] = await pipe.execute()
            read = all_present(([first] if lo == 0 else []) + rest)
            if read is None:
                continue
            base = lo * size
            return Snapshot(
                worker_id=wid,
                version=int(meta["version"]),
                step=int(meta["step"]),
                epoch=int(meta["epoch"]),
                prev_loss=_opt_float(meta.get("prev_loss")),
                meta=SnapshotMeta.model_validate_json(meta["meta"]),
                buf=read[0] if len(read) == 1 else b"".join(read),
                entries={} if entry is None else {layer: _rebase(entry, base)},
                parts={layer: {n: _rebase(e, base) for n, e in parts.items()}} if parts else {},
            )
        found = await self._snapshots(fed, [wid])
        if wid not in found:
            raise NoSnapshot(fed, wid)
        return found[wid]

    async def pinned_layer(self, fed: str, wid: str, version: int, layer: str) -> Snapshot | str:
        """One layer of snapshot `version` of a worker, superseded but kept by a decision's pin
        (`Keys.pin`), as `snapshot_layer` reads the latest; else why it is gone (a sentence).

        A pin keeps only the segments holding a layer (and its parts) some unacked decision names,
        so the layer is read from them: its `L:<layer>` field says which segments (`lo`..`hi`,
        covering the tether and its parts) and where in them (`start`, `stop`, `dtype`, `shape`
        of the tether; `parts`: the same for each part, with its `name`; see commit.lua)."""
        meta = replies.record(await self.r.hgetall(self.keys.pin(fed, wid, version)))
        pin_s = f"{self.settings.snapshot_pin_s:g}"
        if "tag" not in meta:
            return (
                f"no decision issued in the last {pin_s} s names it (a decision's partner "
                f"snapshot is kept until the decision is acked, or {pin_s} s after it was issued)"
            )
        where = json.loads(meta[f"L:{layer}"]) if f"L:{layer}" in meta else None
        names = frame_keys(self.keys, fed, wid, meta)
        if where is not None:
            parts = all_present(
                cast(list[bytes | None], await self.rb.mget(names[where["lo"] : where["hi"] + 1]))
            )
            if parts is not None and "start" not in where:  # every segment kept: a whole frame
                snap = snapshot_from(wid, meta, parts)
                if snap is not None and layer in snap.entries:
                    snap.entries, snap.grams = {layer: snap.entries[layer]}, {}
                    snap.parts = {k: v for k, v in snap.parts.items() if k == layer}
                    return snap
            elif parts is not None:
                base = where["lo"] * int(meta["size"])
                entry = _pinned_entry(layer, where, base)
                part_list = where.get("parts") or []  # cjson writes [] as {}
                pinned_parts = [_pinned_entry(p["name"], p, base) for p in part_list]
                return Snapshot(
                    worker_id=wid,
                    version=version,
                    step=int(meta["step"]),
                    epoch=int(meta["epoch"]),
                    prev_loss=_opt_float(meta.get("prev_loss")),
                    meta=SnapshotMeta.model_validate_json(meta["meta"]),
                    buf=parts[0] if len(parts) == 1 else b"".join(parts),
                    entries={layer: entry},
                    parts={layer: {p.name: p for p in pinned_parts}} if pinned_parts else {},
                )
        claimed = sorted({v for k, v in meta.items() if k.startswith("d:")})
        if where is None:
            return (
                f"no decision names its layer {layer!r} (its superseded frame is kept only for "
                f"the layers of unacked decisions: {claimed or 'none left'})"
            )
        if layer in claimed:  # claimed, yet a segment is missing: not something a publish does
            return f"the segments of its layer {layer!r} are missing from Redis (evicted?)"
        return (
            f"every decision naming its layer {layer!r} has been acked, which released it "
            "(a superseded snapshot is kept only for the layers of unacked decisions)"
        )

    async def release_pins(self, fed: str, decisions: Sequence[Decision]) -> None:
        """Acked decisions no longer need their partners' snapshots: drop each one's claim on
        its pin, and, once that snapshot is superseded, the segments no other unacked decision
        needs (`release.lua`). Idempotent: a repeated ack releases nothing. Two round trips for
        all of them."""
        refs = [
            (d, d.partner_snapshot)
            for d in decisions
            if d.action != "hold" and d.operator != "decouple" and d.partner_snapshot is not None
        ]
        if not refs:
            return
        pins = [self.keys.pin(fed, ref.worker_id, ref.version) for _, ref in refs if ref]
        async with self.r.pipeline(transaction=False) as pipe:
            for pin in pins:
                pipe.hmget(pin, ["tag", "segments"])
            found = await pipe.execute()
        async with self.r.pipeline(transaction=False) as pipe:
            for (decision, ref), pin, fields in zip(refs, pins, found, strict=True):
                tag, count = (replies.opt_text(x) for x in fields)
                if not tag or not count or ref is None:
                    continue  # expired, never made, or a frame stored whole
                names = [
                    pin,
                    self.keys.snapshot_meta(fed, ref.worker_id),
                    *frame_keys(self.keys, fed, ref.worker_id, {"tag": tag, "segments": count}),
                ]
                pipe.eval(self.release_script, len(names), *names, decision.id)
            await pipe.execute()

    async def _snapshots(self, fed: str, wids: list[str]) -> dict[str, Snapshot]:
        """Read metadata, then the segments it names; a worker whose segments were replaced
        between the two reads (a publish committed) is read again."""
        out: dict[str, Snapshot] = {}
        todo = list(wids)
        for _ in range(SNAPSHOT_READ_TRIES):
            async with self.r.pipeline(transaction=False) as pipe:
                for wid in todo:
                    pipe.hgetall(self.keys.snapshot_meta(fed, wid))
                metas: list[dict[str, str]] = await pipe.execute()
            names = [
                frame_keys(self.keys, fed, w, meta) for w, meta in zip(todo, metas, strict=True)
            ]
            async with self.rb.pipeline(transaction=False) as pipe:
                for name in itertools.chain.from_iterable(names):
                    pipe.get(name)
                segments: list[bytes | None] = await pipe.execute()
            raced, at = [], 0
            for wid, meta, keys in zip(todo, metas, names, strict=True):
                parts = all_present(segments[at : at + len(keys)])
                at += len(keys)
                if parts is None:
                    raced.append(wid)
                elif (snap := snapshot_from(wid, meta, parts)) is not None:
                    out[wid] = snap
            if not raced:
                return out
            todo = raced
        log.warning("federation %r: segments of %s missing or replaced on every read", fed, todo)
        return out  # those workers read as having no snapshot (scoring skips them)

    async def publish_sketch(
        self, fed: str, wid: str, meta: SnapshotMeta, frame: bytes
    ) -> tuple[int, bool]:
        """Store a validated sketch publish as the worker's latest and queue it for scoring;
        returns (its version, whether a full publish was asked for since the last sketch).
        FederationNotFound when the federation or worker was deleted meanwhile."""
        k = self.keys
        reply = await self.rb.eval(
            self.sketch_script,
            4,
            k.worker(fed, wid),
            k.sketch(fed, wid),
            k.alive(fed, wid),
            k.federation(fed),
            meta.step,
            meta.epoch,
            "" if meta.loss is None else meta.loss,
            "" if meta.grad_norm is None else meta.grad_norm,
            meta.model_dump_json(),
            utcnow().isoformat(),
            self._ttl_ms(),
            frame,
        )
        if reply == -2:
            raise FederationNotFound(fed)
        version = int(reply[0])
        await self.queue_scoring(fed, wid, version)
        return version, bool(int(reply[1]))

    async def want_full(self, fed: str, wid: str) -> None:
        """Flag a worker (if it still exists) to publish its full tether next."""
        await self.r.eval(WANT_FULL, 1, self.keys.worker(fed, wid))

    async def sketch_snapshots(
        self, fed: str, wids: list[str], full: Mapping[str, int]
    ) -> dict[str, Snapshot]:
        """Latest sketch publishes of the workers (those that have one), each as a Snapshot
        whose `sketched` holds its views and whose memo records its sketch spec and the
        version of the worker's latest full snapshot (`full`: worker → version)."""
        async with self.rb.pipeline(transaction=False) as pipe:
            for wid in wids:
                pipe.hgetall(self.keys.sketch(fed, wid))
            raw: list[dict[bytes, bytes]] = await pipe.execute()
        out = {}
        for wid, record in zip(wids, raw, strict=True):
            if record:
                out[wid] = sketch_snapshot(wid, record, full.get(wid, 0))
        return out

    async def active_snapshots(self, fed: str, include: str | None = None) -> dict[str, Snapshot]:
        """Latest snapshots of active workers (plus `include` unless it has left)."""
        return await self._snapshots(fed, await self.active_ids(fed, [include] if include else []))

    async def active_ids(
        self, fed: str, include: Collection[str] = (), ended: bool = False
    ) -> list[str]:
        """Active workers of a federation (alive, not left), plus `include` unless they left;
        with `ended`, every worker it ever had (lost and left ones too)."""
        wids = sorted(replies.texts(await self.r.smembers(self.keys.workers(fed))))
        if ended:
            return wids
        async with self.r.pipeline(transaction=False) as pipe:
            for wid in wids:
                pipe.hget(self.keys.worker(fed, wid), "status")
                pipe.exists(self.keys.alive(fed, wid))
            raw = await pipe.execute()
        return [
            wid
            for i, wid in enumerate(wids)
            if raw[2 * i] == "active" and (raw[2 * i + 1] or wid in include)
        ]

    async def active_versions(
        self, fed: str, include: Collection[str] = (), sketches: bool = False, ended: bool = False
    ) -> dict[str, tuple[int, int]]:
        """`active_ids` with each worker's (latest full snapshot version, latest sketch version
        or 0 without `sketches`), in one script call; ids sorted."""
        k, probe = self.keys, "w"
        base = k.worker(fed, probe)
        reply = await self.r.eval(
            self.active_script,
            1,
            k.workers(fed),
            base[: -len(probe)],
            k.alive(fed, probe)[len(base) :],
            k.snapshot_meta(fed, probe)[len(base) :],
            k.sketch(fed, probe)[len(base) :] if sketches else "",
            int(ended),
            *include,
        )
        rows = {reply[i]: (int(reply[i + 1]), int(reply[i + 2])) for i in range(0, len(reply), 3)}
        return dict(sorted(rows.items()))

    # ---------------------------------------------------------------- decisions and acks
    async def decisions(
        self, fed: str, after: int, limit: int, **match: str | None
    ) -> list[Decision]:
        """Decisions with id > `after` matching every given field (worker_id, layer, action)."""
        wanted = {k: v for k, v in match.items() if v is not None}
        out: list[Decision] = []
        cursor = after + 1
        while len(out) < limit:
            rows = replies.entries(
                await self.r.xrange(
                    self.keys.decisions(fed), min=f"{cursor}-0", count=max(limit, 256)
                )
            )
            for sid, fields in rows:
                decision = Decision.model_validate_json(fields["d"])
                if all(getattr(decision, k) == v for k, v in wanted.items()):
                    out.append(decision)
                cursor = int(sid.split("-")[0]) + 1
            if len(rows) < max(limit, 256):
                break
        return out[:limit]

    async def decision(self, fed: str, decision_id: int) -> Decision:
        """One decision by id; DecisionNotFound when unknown or trimmed."""
        rows = replies.entries(
            await self.r.xrange(
                self.keys.decisions(fed), min=f"{decision_id}-0", max=f"{decision_id}-0"
            )
        )
        if not rows:
            await self.policy(fed)
            raise DecisionNotFound(fed, decision_id)
        return Decision.model_validate_json(rows[0][1]["d"])

    async def worker_decisions(
        self, fed: str, wid: str, after: int, limit: int, wait_s: float
    ) -> list[Decision]:
        """Merge/drift decisions for one worker with id > `after`, waiting up to `wait_s`."""
        key = self.keys.worker_decisions(fed, wid)
        rows = replies.entries(await self.r.xrange(key, min=f"{after + 1}-0", count=limit))
        if not rows and wait_s > 0:
            try:
                rows = replies.read_entries(
                    await self.blocking.xread(
                        {key: f"{after}-0"}, count=limit, block=max(1, int(wait_s * 1000))
                    )
                )
            except aioredis.ResponseError as exc:
                if not str(exc).startswith("UNBLOCKED"):
                    raise
                rows = []  # the server became a replica (failover): the caller polls again
        if rows:
            await self.replicated_so_far(fed, "these decisions")
        return [Decision.model_validate_json(fields["d"]) for _, fields in rows]

    async def replicated_so_far(self, fed: str, what: str) -> None:
        """With `wait_replicas`: return once every write the primary has taken so far is on
        that many replicas, else Unavailable. A worker is handed decisions only then, so a failover
        cannot take back one it has seen (and may ack). WAIT covers the writes of its own
        connection, so one write (the federation's fence counter) goes first on it."""
        if not self.settings.wait_replicas or is_cluster(self.r):
            return
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.incr(self.keys.fence(fed))
            self.wait_for_replicas(pipe)
            _, *waited = await pipe.execute()
        self.check_replicated(waited, what)

    async def ack(self, fed: str, decision: Decision, body: AckCreate) -> tuple[AckPublic, bool]:
        """Record an ack; returns (ack, created); Conflict when a different outcome was recorded."""
        (result,) = await self.record_acks(fed, [(decision, body)])
        if isinstance(result, CoordinatorError):
            raise result
        return result

    async def decisions_by_id(self, fed: str, ids: Sequence[int]) -> list[Decision | None]:
        """The decisions with these ids (None for one never issued, or trimmed), read in one
        round trip; FederationNotFound when the federation does not exist."""
        key = self.keys.decisions(fed)
        async with self.r.pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.xrange(key, min=f"{i}-0", max=f"{i}-0")
            found = [replies.entries(rows) for rows in await pipe.execute()]
        if not all(found):
            await self.policy(fed)  # FederationNotFound before any DecisionNotFound
        return [Decision.model_validate_json(rows[0][1]["d"]) if rows else None for rows in found]

    async def record_acks(
        self, fed: str, acks: Sequence[tuple[Decision, AckCreate]]
    ) -> list[tuple[AckPublic, bool] | CoordinatorError]:
        """Record acks, in order, each as (ack, created), or Conflict when a different outcome
        was recorded for its decision (an earlier ack, or an earlier item of `acks`). Each step
        takes one round trip for all of them (a FedAvg round acks (N − 1) × L decisions at once);
        Unavailable when too few replicas took the writes (retrying is safe: the same ack again
        is not created anew)."""
        now = utcnow()
        records = [
            AckPublic(
                decision_id=d.id,
                worker_id=d.worker_id,
                outcome=body.outcome,
                generation=body.generation,
                reason=body.reason,
                probe_loss_before=body.probe_loss_before,
                probe_loss_after=body.probe_loss_after,
                acked_at=now,
            )
            for d, body in acks
        ]
        async with self.r.pipeline(transaction=False) as pipe:
            for ack in records:
                pipe.hsetnx(self.keys.acks(fed), str(ack.decision_id), ack.model_dump_json())
            self.wait_for_replicas(pipe)
            answers = await pipe.execute()
        created, waited = answers[: len(records)], answers[len(records) :]
        self.check_replicated(waited, f"the acks of {len(records)} decision(s)")
        # Also on a repeat: its release may have failed.
        await self.release_pins(fed, [d for d, _ in acks])
        out: list[tuple[AckPublic, bool] | CoordinatorError] = []
        applied: list[tuple[str, str, str]] = []  # (worker, field, decision)
        for (decision, body), ack, new in zip(acks, records, created, strict=True):
            if not new:
                previous = await self.acked(fed, decision.id)
                assert previous is not None
                if (previous.outcome, previous.generation) != (body.outcome, body.generation):
                    out.append(
                        Conflict(f"decision {decision.id} was already acked as {previous.outcome}")
                    )
                else:
                    out.append((previous, False))
                continue
            if body.outcome == "applied":
                field = f"{decision.layer}{FIELD_SEP}{body.generation}"
                applied.append((decision.worker_id, field, decision.model_dump_json()))
            out.append((ack, True))
        if applied:
            async with self.r.pipeline(transaction=False) as pipe:
                for wid, field, value in applied:
                    pipe.hset(self.keys.applied(fed, wid), field, value)
                await pipe.execute()
        return out

    def wait_for_replicas(self, pipe: Any) -> None:
        """Queue `WAIT` on `pipe` (after the writes it must cover, on their connection) when
        `settings.wait_replicas` asks for it: Redis replicates asynchronously, and a write a
        failover loses before a replica has it is gone (redis.io: "Redis replication")."""
        if self.settings.wait_replicas and not is_cluster(self.r):
            pipe.execute_command("WAIT", self.settings.wait_replicas, self.settings.wait_timeout_ms)

    def check_replicated(self, waited: list[Any], what: str) -> None:
        """Unavailable when the WAIT queued by `wait_for_replicas` saw too few replicas take the
        write (the caller retries; the writes it retries are idempotent)."""
        if waited and int(waited[-1]) < self.settings.wait_replicas:
            raise Unavailable(
                f"{what} reached {waited[-1]} of {self.settings.wait_replicas} replicas; retry"
            )

    async def queue_scoring(self, fed: str, wid: str, version: int) -> None:
        """Add a committed publish to the scoring stream (global: never in a federation's
        script or transaction; a retried XADD only makes a redundant entry, which the scorer's
        `scored_version` guard turns into nothing)."""
        await self.r.xadd(
            self.keys.scoring(),
            {"fed": fed, "worker": wid, "version": version},
            maxlen=self.settings.stream_maxlen,
            approximate=True,
        )

    async def migrate_legacy(self) -> int:
        """Rename the keys of federations stored before hash tags (`<prefix>fed:<name>…`) to
        the current names; returns how many federations moved. Such data only exists on one
        server (never on a Cluster), where RENAME across names is allowed."""
        moved = 0
        for fed in replies.texts(await self.r.smembers(self.keys.federations())):
            old = self.keys.legacy_federation(fed)
            if is_cluster(self.r) or not await self.r.exists(old):
                continue
            new = self.keys.federation(fed)
            async for key in self.r.scan_iter(match=glob_escape(old + ":") + "*", count=1000):
                await self.r.rename(key, new + key[len(old) :])
            await self.r.rename(old, new)
            moved += 1
        if moved:
            log.warning("renamed the keys of %d federation(s) to hash-tagged names", moved)
        return moved

    async def acked(self, fed: str, decision_id: int) -> AckPublic | None:
        """The ack of a decision, if any."""
        raw = await self.r.hget(self.keys.acks(fed), str(decision_id))
        return AckPublic.model_validate_json(raw) if raw else None

    async def scoring_backlog(self) -> tuple[int, int]:
        """(entries in the scoring stream, entries delivered but not acked)."""
        key = self.keys.scoring()
        length = await self.r.xlen(key)
        try:
            pending = await self.r.xpending(key, "scorers")
        except aioredis.ResponseError:
            return length, 0
        return length, int(pending["pending"])

    async def lag(self) -> Any:
        """Consumer-group info of the scoring stream (for tests and metrics)."""
        return await self.r.xinfo_groups(self.keys.scoring())


class SnapshotCache:
    """A scorer's copy of the latest snapshots, refetched only when a worker's version changed.

    Memory: at most one frame per active worker of the federations this replica scores (entries
    of workers that are no longer active are dropped on the next load of their federation).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._snaps: dict[str, dict[str, Snapshot]] = {}

    async def active(
        self, fed: str, include: Collection[str] = (), sketches: bool = False, ended: bool = False
    ) -> dict[str, Snapshot]:
        """Latest snapshots of the federation's active workers (and `include`; with `ended`,
        of every worker, lost and left ones too); with `sketches`, a worker whose latest
        publish is a sketch is loaded as that sketch."""
        versions = await self.store.active_versions(fed, include, sketches, ended)
        wids = list(versions)
        full = {w: v[0] for w, v in versions.items()}
        sketch = {w: v[1] for w, v in versions.items()}
        cached = {w: s for w, s in self._snaps.get(fed, {}).items() if w in full}
        latest = {w: max(full[w], sketch[w]) for w in wids}
        stale = [
            w for w in wids if latest[w] and (w not in cached or cached[w].version != latest[w])
        ]
        by_sketch = [w for w in stale if sketch[w] > full[w]]
        cached.update(await self.store._snapshots(fed, [w for w in stale if w not in by_sketch]))
        cached.update(await self.store.sketch_snapshots(fed, by_sketch, full))
        self._snaps[fed] = cached
        return dict(cached)

    def forget(self, fed: str) -> None:
        """Drop a (deleted) federation's frames."""
        self._snaps.pop(fed, None)
