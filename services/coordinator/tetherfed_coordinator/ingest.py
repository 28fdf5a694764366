"""Tether publish: stream the body into Redis while validating it, then commit with one MULTI.

Receiving a large body over HTTP is slower than Redis can store it, so the two overlap: each
chunk is validated incrementally (`tether_protocol.framestream`: header as soon as it is
complete, finiteness chunk by chunk) and appended to a temporary key over one dedicated
connection, pipelined without waiting for replies. The temporary key carries a TTL (renewed
with every chunk), so a crashed coordinator leaks nothing. On success one transaction renames it
to the snapshot key and writes the bookkeeping (version, metadata, liveness, scoring entry,
generation records); on any failure the temporary key is deleted before the 4xx goes out, so a
bad frame leaves no trace.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import redis.asyncio as aioredis
from fastapi import HTTPException, Request
from redis.asyncio.connection import Connection

from tether_protocol.frame import (
    DTypeError,
    Frame,
    FrameError,
    LayerMismatchError,
    NonFiniteError,
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

from .store import FIELD_SEP, Store

# Frame errors about the registered table or the values are 422; malformed frames are 400.
_UNPROCESSABLE = (LayerMismatchError, ShapeError, DTypeError, NonFiniteError)
# Frames up to this size are read whole and SET: fewer round trips than streaming them.
SMALL_FRAME = 1 << 20
# An upload idle this long loses its temporary key (renewed with every chunk).
UPLOAD_TTL_MS = 120_000


def too_large(limit: int) -> HTTPException:
    """413 naming the configured limit."""
    return HTTPException(413, f"frame exceeds the maximum of {limit} bytes")


def frame_http_error(exc: FrameError) -> HTTPException:
    """400 for a malformed frame, 422 for one that disagrees with the table or holds NaN/Inf."""
    return HTTPException(422 if isinstance(exc, _UNPROCESSABLE) else 400, str(exc))


@dataclass(frozen=True)
class Published:
    """What a stored publish was: its new version, the frame (meta, entries) and its size."""

    version: int
    frame: Frame
    nbytes: int


def declared_size(request: Request, limit: int) -> int | None:
    """The Content-Length (None when absent); 400 when malformed, 413 over `limit`."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not declared.isdigit():
        raise HTTPException(400, "Content-Length is not a number")
    if int(declared) > limit:
        raise too_large(limit)
    return int(declared)


async def _sized_body(request: Request, size: int) -> AsyncIterator[bytes]:
    pos = 0
    async for chunk in request.stream():
        pos += len(chunk)
        if pos > size:
            raise HTTPException(400, "body is longer than its Content-Length")
        if chunk:
            yield chunk
    if pos != size:
        raise HTTPException(400, f"body ended after {pos} of {size} bytes")


async def _read_chunked(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_sized(request: Request, size: int) -> bytes:
    return b"".join([chunk async for chunk in _sized_body(request, size)])


class Upload:
    """A temporary key filled by pipelined APPENDs over one connection taken from the pool."""

    def __init__(self, client: aioredis.Redis, conn: Connection, key: str) -> None:
        self.client, self.conn, self.key = client, conn, key
        self.pending = 0  # replies sent for but not read yet
        self.length = 0

    @classmethod
    async def open(cls, client: aioredis.Redis, key: str) -> Upload:
        """Take a connection from `client`'s pool for one upload."""
        conn = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        return cls(client, conn, key)

    async def append(self, chunk: bytes) -> None:
        """Send the chunk (and a TTL renewal) without waiting for the replies."""
        packed = self.conn.pack_commands(
            [("APPEND", self.key, chunk), ("PEXPIRE", self.key, UPLOAD_TTL_MS)]
        )
        await self.conn.send_packed_command(packed, check_health=False)
        self.pending += 2
        self.length += len(chunk)

    async def complete(self) -> None:
        """Read every pending reply; raise unless the key holds exactly the bytes sent."""
        stored, i = 0, 0
        while self.pending:
            self.pending -= 1
            try:
                reply = await self.conn.read_response()
            except aioredis.ResponseError as exc:  # e.g. maxmemory; abort() reads the rest
                raise HTTPException(503, f"redis refused the frame upload: {exc}") from None
            if i % 2 == 0:
                stored = int(reply)
            i += 1
        if stored != self.length:
            raise HTTPException(503, "frame upload was interrupted (temporary key expired)")

    async def abort(self) -> None:
        """Delete the temporary key after the in-flight APPENDs (or drop the connection)."""
        try:
            while self.pending:
                self.pending -= 1
                with contextlib.suppress(aioredis.ResponseError):
                    await self.conn.read_response()
            await self.conn.send_command("DEL", self.key)
            await self.conn.read_response()
        except Exception:
            await self.conn.disconnect()
            await self.client.delete(self.key)  # may race with in-flight APPENDs; TTL covers it

    async def release(self) -> None:
        """Give the connection back to the pool."""
        await self.client.connection_pool.release(self.conn)


def _changed(meta: SnapshotMeta | None, entries: Mapping[str, Any], prev: dict[str, str]) -> dict[
    str, int]:  # fmt: skip
    """Layers whose generation moved past the previous snapshot's (they get generation records)."""
    if meta is None:
        return {}
    old = json.loads(prev["meta"])["generations"] if prev else {}
    return {
        layer: g for layer, g in meta.generations.items()
        if layer in entries and g > old.get(layer, 0)
    }  # fmt: skip


async def receive_publish(
    store: Store, request: Request, limit: int, fed: str, wid: str, policy: Policy,
    layers: list[LayerSpec],
) -> Published:  # fmt: skip
    """Stream, validate and store one publish; 400/413/422 with nothing written on failure."""
    size = declared_size(request, limit)
    prev: dict[str, str] = await store.r.hgetall(store.keys.snapshot_meta(fed, wid))  # type: ignore[assignment]
    stream = FrameStream(
        size or 0, layers, keep=lambda meta, entries: _changed(meta, entries, prev)
    )
    if size is None or size <= SMALL_FRAME:
        whole = await (
            _read_chunked(request, limit) if size is None else _read_sized(request, size)
        )
        if size is None:
            stream = FrameStream(len(whole), layers, keep=lambda m, e: _changed(m, e, prev))
        _feed(stream, whole)
        frame = _finish(stream, wid)
        version = await _commit(store, fed, wid, policy, prev, frame, whole)
        return Published(version, frame, len(whole))
    temp = store.keys.snapshot_upload(fed, wid, uuid.uuid4().hex)
    upload = await Upload.open(store.rb, temp)
    try:
        frame = await _pump(_sized_body(request, size), stream, upload, wid)
        version = await _commit(store, fed, wid, policy, prev, frame, temp)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await upload.abort()
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await upload.release()
    return Published(version, frame, size)


async def _pump(body: AsyncIterator[bytes], stream: FrameStream, upload: Upload, wid: str) -> Frame:
    async for chunk in body:
        _feed(stream, chunk)
        await upload.append(chunk)
    frame = _finish(stream, wid)
    await upload.complete()
    return frame


def _feed(stream: FrameStream, chunk: bytes) -> None:
    try:
        stream.feed(chunk)
    except FrameError as exc:
        raise frame_http_error(exc) from None


def _finish(stream: FrameStream, wid: str) -> Frame:
    """The validated frame; 400/422 naming the problem, or naming another publisher."""
    try:
        frame = stream.finish()
    except FrameError as exc:
        raise frame_http_error(exc) from None
    assert frame.meta is not None
    if frame.meta.worker_id != wid:
        raise HTTPException(
            400, f"snapshot metadata names worker {frame.meta.worker_id!r}, not {wid!r}"
        )
    return frame


async def _commit(
    store: Store, fed: str, wid: str, policy: Policy, prev: dict[str, str], frame: Frame,
    source: str | bytes,
) -> int:  # fmt: skip
    """Put the frame in place (rename the uploaded temporary key, or SET a small frame's bytes)
    and write its bookkeeping, in one transaction."""
    keys, meta = store.keys, frame.meta
    assert meta is not None
    async with store.rb.pipeline(transaction=True) as pipe:
        if isinstance(source, bytes):
            pipe.set(keys.snapshot(fed, wid), source)
        else:
            pipe.rename(source, keys.snapshot(fed, wid))
            pipe.persist(keys.snapshot(fed, wid))
        pipe.eval(
            store.publish_script, 5,
            keys.worker(fed, wid), keys.snapshot_meta(fed, wid), keys.scoring(), keys.alive(fed, wid),
            keys.federation(fed),
            fed, wid, meta.step, meta.epoch, _blank(meta.loss), _blank(meta.grad_norm),
            meta.model_dump_json(), utcnow().isoformat(), store._ttl_ms(),
            store.settings.stream_maxlen,
        )  # fmt: skip
        await _queue_generations(store, pipe, fed, wid, policy, prev, frame)
        results = await pipe.execute()
    version = int(results[1 if isinstance(source, bytes) else 2])
    if version == -2:  # deleted while this frame streamed in: remove what the MULTI wrote
        await store.unlink_worker(fed, wid)
        raise HTTPException(404, f"federation {fed!r} not found")
    return version


def _blank(value: float | None) -> str | float:
    return "" if value is None else value


async def _queue_generations(
    store: Store, pipe: object, fed: str, wid: str, policy: Policy, prev: dict[str, str],
    frame: Frame,
) -> None:  # fmt: skip
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
    store: Store, pipe: object, fed: str, wid: str, own: SnapshotRef | None, layer: str,
    generation: int, retained: bool,
) -> None:  # fmt: skip
    """Queue one generation's lineage record (its decision and partner, when acked)."""
    keys = store.keys
    applied = await store.r.hget(keys.applied(fed, wid), f"{layer}{FIELD_SEP}{generation}")
    decision = json.loads(applied) if applied else None
    partner = SnapshotRef.model_validate(decision["partner_snapshot"]) if decision and decision[
        "partner_snapshot"] else None  # fmt: skip
    record = GenerationRecord(
        generation=generation,
        parents=[own, partner],
        decision_id=decision["id"] if decision else None,
        action=decision["action"] if decision else None,
        created_at=utcnow(),
        retained=retained,
    )
    pipe.rpush(keys.generations(fed, wid, layer), record.model_dump_json())  # type: ignore[attr-defined]


async def _queue_generation(
    store: Store, pipe: object, fed: str, wid: str, policy: Policy, own: SnapshotRef | None,
    frame: Frame, layer: str, generation: int,
) -> None:  # fmt: skip
    keys = store.keys
    retained = policy.retain_generations > 0
    await _queue_record(store, pipe, fed, wid, own, layer, generation, retained)
    p = pipe  # a redis pipeline (typed loosely to keep redis-py generics out)
    if not retained:
        return
    kept = [int(g) for g in await store.r.lrange(keys.retained(fed, wid, layer), 0, -1)]
    kept.append(generation)
    dropped = kept[: max(0, len(kept) - policy.retain_generations)]
    tensor = _generation_frame(frame, frame.entries[layer])
    p.set(keys.generation_tensor(fed, wid, layer, generation), tensor)  # type: ignore[attr-defined]
    p.rpush(keys.retained(fed, wid, layer), generation)  # type: ignore[attr-defined]
    p.ltrim(keys.retained(fed, wid, layer), -policy.retain_generations, -1)  # type: ignore[attr-defined]
    for g in dropped:
        p.unlink(keys.generation_tensor(fed, wid, layer, g))  # type: ignore[attr-defined]


def _generation_frame(frame: Frame, entry: TensorEntry) -> bytes:
    """A one-layer frame of a kept layer (the stream kept the bytes of every changed layer)."""
    return encode_frame({entry.name: frame.tensors[entry.name]}, meta=frame.meta, dtype=entry.dtype)
