"""Tether publish: validate the body as it streams in, store it as segments, commit in one MULTI.

A frame is stored as consecutive string keys of `SEGMENT` bytes (see `Keys.segment`), not one
value: Redis (its allocator) stores values of about 1 MiB at about twice the rate of one 64 MB
value, and one string could not hold a frame over Redis's 512 MB `proto-max-bulk-len`. Under the
coordinator's own server the body arrives as those segments straight from the socket
(`rawbody`); under any other ASGI server it is regrouped from `receive()`.

Each segment is validated (`tether_protocol.framestream`: header as soon as it is complete,
finiteness segment by segment) and sent as `SET … PX` over one dedicated connection, pipelined
without waiting for replies, so receiving, checking and storing overlap. The TTL means a crashed
coordinator leaks nothing. On success one transaction runs `publish.lua`, which makes the
segments permanent, unlinks the previous snapshot's and writes the bookkeeping (version,
metadata, liveness, scoring entry, generation records); on any failure the segments are
unlinked before the error is raised, so a bad frame leaves no trace. Frames of one segment are SET
inside that transaction. Under the `update_cosine` measure the same transaction keeps the
worker's first such snapshot as its origin (`workerfacts`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import redis.asyncio as aioredis
from fastapi import Request
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import Connection

from tether_protocol.frame import (
    DTypeError,
    Frame,
    FrameError,
    LayerMismatchError,
    NonFiniteError,
    RangeError,
    ShapeError,
    TensorEntry,
    encode_frame,
)
from tether_protocol.framestream import FrameStream
from tether_protocol.messages import (
    GenerationRecord,
    LayerSpec,
    Policy,
    SnapshotMeta,
    SnapshotRef,
    utcnow,
)
from tether_protocol.policy import layers_in_scope

from .errors import BadInput, CoordinatorError, FederationNotFound, Invalid, TooLarge, Unavailable
from .rawbody import BODY_EXTENSION, SEGMENT, BodySegments, SegmentProtocol
from .store import FIELD_SEP, Store, frame_keys
from .topology import borrow_connection
from .workerfacts import queue_origin

# Frame errors about the registered table or the values are Invalid; malformed frames BadInput.
_UNPROCESSABLE = (LayerMismatchError, ShapeError, DTypeError, NonFiniteError, RangeError)
# An upload's segments expire this long after their last renewal (renewed every RENEW_S).
UPLOAD_TTL_MS = 120_000
RENEW_S = 30.0
UNLINK_BATCH = 512

Buffer = bytes | bytearray | memoryview


def too_large(limit: int) -> TooLarge:
    """The error for a frame over the configured limit, naming it."""
    return TooLarge(f"frame exceeds the maximum of {limit} bytes")


def frame_error(exc: FrameError) -> CoordinatorError:
    """BadInput for a malformed frame; Invalid for one that disagrees with the table or holds
    NaN/Inf."""
    return (Invalid if isinstance(exc, _UNPROCESSABLE) else BadInput)(str(exc))


@dataclass(frozen=True)
class Published:
    """What a stored publish was: its new version, the frame (meta, entries) and its size."""

    version: int
    frame: Frame
    nbytes: int


def declared_size(request: Request, limit: int) -> int | None:
    """The Content-Length (None when absent); BadInput when malformed, TooLarge over `limit`."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not declared.isdigit():
        raise BadInput("Content-Length is not a number")
    if int(declared) > limit:
        raise too_large(limit)
    return int(declared)


def streams_raw(method: str, path: str) -> bool:
    """The requests whose bodies `rawbody.SegmentProtocol` hands over as segments: publishes."""
    parts = path.split("/")
    return (
        method == "PUT"
        and len(parts) == 7
        and parts[1:3] == ["v1", "federations"]
        and parts[4] == "workers"
        and parts[6] == "tethers"
        and all(parts[3:6])
    )


class PublishProtocol(SegmentProtocol):
    """The coordinator's HTTP protocol: uvicorn's, with publish bodies received as segments."""

    @staticmethod
    def streams_raw(method: str, path: str) -> bool:
        """Publishes (the module's `streams_raw`)."""
        return streams_raw(method, path)


async def body_segments(request: Request, size: int) -> AsyncIterator[Buffer]:
    """The body as `SEGMENT`-sized pieces (the last shorter); BadInput when it ends early."""
    extension = request.scope.get("extensions", {}).get(BODY_EXTENSION)
    raw: BodySegments | None = extension["segments"] if extension else None
    segment: Buffer
    if raw is None:  # another ASGI server: regroup its messages
        async for segment in _regrouped(_sized_body(request, size)):
            yield segment
        return
    try:
        async for segment in raw:
            yield segment
    finally:
        raw.close()


async def _regrouped(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    pending = bytearray()
    async for chunk in chunks:
        pending += chunk
        while len(pending) >= SEGMENT:
            yield bytes(pending[:SEGMENT])
            del pending[:SEGMENT]
    if pending:
        yield bytes(pending)


async def _slices(whole: bytes) -> AsyncIterator[Buffer]:
    view = memoryview(whole)
    for at in range(0, len(whole), SEGMENT):
        yield view[at : at + SEGMENT]


async def _sized_body(request: Request, size: int) -> AsyncIterator[bytes]:
    pos = 0
    async for chunk in request.stream():
        pos += len(chunk)
        if pos > size:
            raise BadInput("body is longer than its Content-Length")
        if chunk:
            yield chunk
    if pos != size:
        raise BadInput(f"body ended after {pos} of {size} bytes")


async def _read_chunked(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class Upload:
    """Segments SET with a TTL over one connection taken from the pool, pipelined: replies are
    read only in `complete()`. Renewing every TTL at least every RENEW_S while segments go out
    leaves each more than a minute when the upload completes, and the commit checks them all."""

    def __init__(
        self,
        store: Store,
        conn: Connection,
        fed: str,
        wid: str,
        tag: str,
        release: Callable[[], Awaitable[None]],
    ) -> None:
        self.client, self.conn, self.tag, self._release = store.rb, conn, tag, release
        self.key = functools.partial(store.keys.segment, fed, wid, tag)
        self.meta_key, self.abort_script = store.keys.snapshot_meta(fed, wid), store.abort_script
        self.count = 0  # segments sent
        self.pending = 0  # replies sent for but not read yet
        self.renewed = time.monotonic()

    @classmethod
    async def open(cls, store: Store, fed: str, wid: str, tag: str) -> Upload:
        """Take a connection to the server holding `wid`'s keys for one upload of its frame."""
        conn, release = await borrow_connection(store.rb, store.keys.snapshot_meta(fed, wid))
        return cls(store, conn, fed, wid, tag, release)

    async def put(self, segment: Buffer) -> None:
        """Send the next segment (and, every RENEW_S, the earlier ones' TTL renewals)."""
        commands: list[tuple[Any, ...]] = [
            ("SET", self.key(self.count), memoryview(segment), "PX", UPLOAD_TTL_MS)
        ]
        if time.monotonic() - self.renewed > RENEW_S:
            commands += self._renewals()
        await self.conn.send_packed_command(self.conn.pack_commands(commands), check_health=False)
        self.pending += len(commands)
        self.count += 1

    def _renewals(self) -> list[tuple[Any, ...]]:
        self.renewed = time.monotonic()
        return [("PEXPIRE", self.key(i), UPLOAD_TTL_MS) for i in range(self.count)]

    async def complete(self) -> None:
        """Read every pending reply; Unavailable if Redis refused a segment or one had expired."""
        while self.pending:
            self.pending -= 1
            try:
                reply = await self.conn.read_response()
            except aioredis.ResponseError as exc:  # e.g. maxmemory; abort() reads the rest
                raise Unavailable(f"redis refused the frame upload: {exc}") from None
            if reply in (0, b"0"):
                raise Unavailable("frame upload was interrupted (a segment expired)")

    async def abort(self) -> None:
        """Unlink every segment sent, unless the commit ran after all (its reply lost): after
        the in-flight replies, or on a fresh connection if this one is broken."""
        keys = [self.key(i) for i in range(self.count)]
        try:
            while self.pending:
                self.pending -= 1
                with contextlib.suppress(aioredis.ResponseError):
                    await self.conn.read_response()
            for batch in self._batches(keys):
                await self.conn.send_command(
                    "EVAL", self.abort_script, len(batch), *batch, self.tag
                )
                await self.conn.read_response()
        except Exception:
            await self.conn.disconnect()
            for batch in self._batches(keys):  # may race with in-flight SETs; their TTL covers it
                await self.client.eval(self.abort_script, len(batch), *batch, self.tag)

    def _batches(self, keys: list[str]) -> Iterator[list[str]]:
        for at in range(0, len(keys), UNLINK_BATCH):
            yield [self.meta_key, *keys[at : at + UNLINK_BATCH]]

    async def release(self) -> None:
        """Give the connection back to the pool."""
        await self._release()


def _changed(
    meta: SnapshotMeta | None, entries: Mapping[str, Any], prev: dict[str, str]
) -> dict[str, int]:
    """Layers whose generation moved past the previous snapshot's (they get generation records)."""
    if meta is None:
        return {}
    old = json.loads(prev["meta"])["generations"] if prev else {}
    return {
        layer: g
        for layer, g in meta.generations.items()
        if layer in entries and g > old.get(layer, 0)
    }


async def receive_publish(
    store: Store,
    request: Request,
    limit: int,
    fed: str,
    wid: str,
    policy: Policy,
    layers: list[LayerSpec],
    prev: dict[str, str],
) -> Published:
    """Stream, validate and store one publish; BadInput, TooLarge or Invalid with nothing written on
    failure.

    `prev` is the worker's snapshot metadata hash as read before the body (empty if none)."""
    size = declared_size(request, limit)
    if size is None:  # chunked: bounded by the limit, read whole to learn its length
        whole = await _read_chunked(request, limit)
        size, segments = len(whole), _slices(whole)
    else:
        segments = body_segments(request, size)
    stream = FrameStream(
        size,
        layers,
        keep=lambda meta, entries: _changed(meta, entries, prev),
        worker_id=wid,
        required=layers_in_scope(policy, [layer.name for layer in layers]),
    )
    tag = uuid.uuid4().hex
    if size <= SEGMENT:  # one segment: SET inside the commit's transaction
        parts = [segment async for segment in segments]
        for part in parts:
            _feed(stream, part)
        frame = _finish(stream, wid)
        version = await _commit(store, fed, wid, policy, prev, frame, tag, parts)
        return Published(version, frame, size)
    upload = await Upload.open(store, fed, wid, tag)
    try:
        frame = await _pump(segments, stream, upload, wid)
        version = await _commit(store, fed, wid, policy, prev, frame, tag, upload.count)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await upload.abort()
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await upload.release()
    return Published(version, frame, size)


async def _pump(
    segments: AsyncIterator[Buffer], stream: FrameStream, upload: Upload, wid: str
) -> Frame:
    async for segment in segments:
        _feed(stream, segment)
        await upload.put(segment)
    frame = _finish(stream, wid)
    await upload.complete()
    return frame


def _feed(stream: FrameStream, chunk: Buffer) -> None:
    try:
        stream.feed(chunk)
    except FrameError as exc:
        raise frame_error(exc) from None


def _finish(stream: FrameStream, wid: str) -> Frame:
    """The validated frame; BadInput/Invalid naming the problem, or naming another publisher."""
    try:
        frame = stream.finish()
    except FrameError as exc:
        raise frame_error(exc) from None
    return publishers_frame(frame, wid)


def publishers_frame(frame: Frame, wid: str) -> Frame:
    """The frame, once its metadata names `wid` as the publisher (BadInput otherwise)."""
    assert frame.meta is not None
    if frame.meta.worker_id != wid:
        raise BadInput(f"snapshot metadata names worker {frame.meta.worker_id!r}, not {wid!r}")
    return frame


async def _commit(
    store: Store,
    fed: str,
    wid: str,
    policy: Policy,
    prev: dict[str, str],
    frame: Frame,
    tag: str,
    segments: Sequence[Buffer] | int,
) -> int:
    """Make the frame's segments the snapshot and write its bookkeeping, in one transaction,
    then queue it for scoring (the global scoring stream stays out of the federation's slot).

    `segments` are either the uploaded count or the bytes to SET here (a one-segment frame).
    """
    keys, meta = store.keys, frame.meta
    assert meta is not None
    inline = [] if isinstance(segments, int) else list(segments)
    count = segments if isinstance(segments, int) else len(inline)
    async with store.rb.pipeline(transaction=True) as pipe:
        await _watch_previous(pipe, keys.snapshot_meta(fed, wid), prev)
        pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves Pipeline.multi unannotated
        for i, part in enumerate(inline):
            pipe.set(keys.segment(fed, wid, tag, i), memoryview(part), px=UPLOAD_TTL_MS)
        names = [
            keys.worker(fed, wid),
            keys.snapshot_meta(fed, wid),
            keys.alive(fed, wid),
            keys.federation(fed),
            keys.legacy_snapshot(fed, wid),
            keys.pin(fed, wid, int(prev.get("version") or 0)),
            *(keys.segment(fed, wid, tag, i) for i in range(count)),
            *(frame_keys(keys, fed, wid, prev) if "tag" in prev else []),
        ]
        pipe.eval(
            store.publish_script,
            len(names),
            *names,
            meta.step,
            meta.epoch,
            _blank(meta.loss),
            _blank(meta.grad_norm),
            meta.model_dump_json(),
            utcnow().isoformat(),
            store._ttl_ms(),
            tag,
            count,
            prev.get("tag", ""),
        )
        if policy.measure == "update_cosine":  # the first such publish becomes the origin
            queue_origin(pipe, keys, fed, wid, tag, count)
        await _queue_generations(store, pipe, fed, wid, policy, prev, frame)
        try:
            results = await pipe.execute()
        except aioredis.WatchError:
            raise Unavailable(CONCURRENT_PUBLISH) from None
    version = int(results[len(inline)])
    if version == -2:  # deleted while this frame streamed in: remove what the MULTI wrote
        await store.unlink_worker(fed, wid)
        raise FederationNotFound(fed)
    if version == -3:  # a segment vanished before the commit (Redis evicted it?)
        raise Unavailable("frame upload was interrupted (a segment expired); publish again")
    await store.queue_scoring(fed, wid, version)
    return version


CONCURRENT_PUBLISH = "another publish of this worker committed meanwhile; publish again"


async def _watch_previous(pipe: Any, meta_key: str, prev: Mapping[str, str]) -> None:
    """WATCH the snapshot meta hash and check it still names the frame `prev` describes, so the
    previous segments the commit declares (and unlinks) are the stored ones; Unavailable
    otherwise."""
    await pipe.watch(meta_key)
    tag = await pipe.hget(meta_key, "tag")
    if (tag.decode() if tag else "") != prev.get("tag", ""):
        raise Unavailable(CONCURRENT_PUBLISH)


def _blank(value: float | None) -> str | float:
    return "" if value is None else value


async def _queue_generations(
    store: Store,
    pipe: Pipeline,
    fed: str,
    wid: str,
    policy: Policy,
    prev: dict[str, str],
    frame: Frame,
) -> None:
    changed = _changed(frame.meta, frame.entries, prev)
    if not changed:
        return
    own = (
        SnapshotRef(worker_id=wid, version=int(prev["version"]), step=int(prev["step"]))
        if prev
        else None
    )
    old = json.loads(prev["meta"])["generations"] if prev else {}
    for layer, generation in changed.items():
        # Several decisions may land between two publishes: every generation gets its record,
        # only the published one has a tensor to retain.
        for skipped in range(old.get(layer, 0) + 1, generation):
            await _queue_record(store, pipe, fed, wid, own, layer, skipped, retained=False)
        await _queue_generation(store, pipe, fed, wid, policy, own, frame, layer, generation)


async def _queue_record(
    store: Store,
    pipe: Pipeline,
    fed: str,
    wid: str,
    own: SnapshotRef | None,
    layer: str,
    generation: int,
    retained: bool,
) -> None:
    """Queue one generation's lineage record (its decision and partner, when acked)."""
    keys = store.keys
    applied = await store.r.hget(keys.applied(fed, wid), f"{layer}{FIELD_SEP}{generation}")
    decision = json.loads(applied) if applied else None
    partner = (
        SnapshotRef.model_validate(decision["partner_snapshot"])
        if decision and decision["partner_snapshot"]
        else None
    )
    record = GenerationRecord(
        generation=generation,
        parents=[own, partner],
        decision_id=decision["id"] if decision else None,
        action=decision["action"] if decision else None,
        created_at=utcnow(),
        retained=retained,
    )
    pipe.rpush(keys.generations(fed, wid, layer), record.model_dump_json())


async def _queue_generation(
    store: Store,
    pipe: Pipeline,
    fed: str,
    wid: str,
    policy: Policy,
    own: SnapshotRef | None,
    frame: Frame,
    layer: str,
    generation: int,
) -> None:
    keys = store.keys
    retained = policy.retain_generations > 0
    await _queue_record(store, pipe, fed, wid, own, layer, generation, retained)
    if not retained:
        return
    kept = [int(g) for g in await store.r.lrange(keys.retained(fed, wid, layer), 0, -1)]
    kept.append(generation)
    dropped = kept[: max(0, len(kept) - policy.retain_generations)]
    tensor = _generation_frame(frame, frame.entries[layer])
    pipe.set(keys.generation_tensor(fed, wid, layer, generation), tensor)
    pipe.rpush(keys.retained(fed, wid, layer), generation)
    pipe.ltrim(keys.retained(fed, wid, layer), -policy.retain_generations, -1)
    for g in dropped:
        pipe.unlink(keys.generation_tensor(fed, wid, layer, g))


def _generation_frame(frame: Frame, entry: TensorEntry) -> bytes:
    """A one-layer frame of a kept layer (the stream kept the bytes of every changed layer)."""
    return encode_frame({entry.name: frame.tensors[entry.name]}, meta=frame.meta, dtype=entry.dtype)
