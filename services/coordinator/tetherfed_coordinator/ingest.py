"""Tether publish: stream the body in under a size cap, validate, store with one MULTI.

The body is copied once, chunk by chunk, into a buffer preallocated from Content-Length; the frame
is validated (header, layer table, byte lengths, finiteness) before anything is written, so a bad
frame leaves no trace; then one transaction stores the frame as one value, the snapshot metadata,
the liveness renewal, the scoring-queue entry and any new generation records.
"""

from __future__ import annotations

import json

import anyio.to_thread
from fastapi import HTTPException, Request

from tether_protocol.frame import (
    DTypeError,
    Frame,
    FrameError,
    LayerMismatchError,
    NonFiniteError,
    ShapeError,
    decode_frame,
    encode_frame,
)
from tether_protocol.messages import GenerationRecord, LayerSpec, Policy, SnapshotRef, utcnow

from .store import FIELD_SEP, Store

# Frame errors about the registered table or the values are 422; malformed frames are 400.
_UNPROCESSABLE = (LayerMismatchError, ShapeError, DTypeError, NonFiniteError)
_THREAD_MIN_BYTES = 1 << 20


def too_large(limit: int) -> HTTPException:
    """413 naming the configured limit."""
    return HTTPException(413, f"frame exceeds the maximum of {limit} bytes")


async def read_body(request: Request, limit: int) -> memoryview:
    """The request body, failing with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is None:
        return await _read_chunked(request, limit)
    if not declared.isdigit():
        raise HTTPException(400, "Content-Length is not a number")
    size = int(declared)
    if size > limit:
        raise too_large(limit)
    buf = bytearray(size)
    pos = 0
    async for chunk in request.stream():
        end = pos + len(chunk)
        if end > size:
            raise HTTPException(400, "body is longer than its Content-Length")
        buf[pos:end] = chunk
        pos = end
    if pos != size:
        raise HTTPException(400, f"body ended after {pos} of {size} bytes")
    return memoryview(buf)


async def _read_chunked(request: Request, limit: int) -> memoryview:
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return memoryview(b"".join(chunks))


async def validate(buf: memoryview, layers: list[LayerSpec], wid: str) -> Frame:
    """Decode the frame against the layer table; 400/422 naming the problem."""
    try:
        if buf.nbytes >= _THREAD_MIN_BYTES:
            frame = await anyio.to_thread.run_sync(lambda: decode_frame(buf, layers=layers))
        else:
            frame = decode_frame(buf, layers=layers)
    except _UNPROCESSABLE as exc:
        raise HTTPException(422, str(exc)) from None
    except FrameError as exc:
        raise HTTPException(400, str(exc)) from None
    assert frame.meta is not None
    if frame.meta.worker_id != wid:
        raise HTTPException(
            400, f"snapshot metadata names worker {frame.meta.worker_id!r}, not {wid!r}"
        )
    return frame


async def store_publish(
    store: Store, fed: str, wid: str, policy: Policy, buf: memoryview, frame: Frame
) -> int:
    """Write the snapshot and its bookkeeping in one transaction; returns the new version."""
    keys, meta = store.keys, frame.meta
    assert meta is not None
    prev = await store.r.hgetall(keys.snapshot_meta(fed, wid))
    # The big write goes through a synchronous client in a worker thread: redis-py's blocking
    # socket `sendall` of the memoryview is ~4x faster than its asyncio transport for 64 MB.
    with store.sync_rb.pipeline(transaction=True) as pipe:
        pipe.set(keys.snapshot(fed, wid), buf)
        pipe.eval(
            store.publish_script, 4,
            keys.worker(fed, wid), keys.snapshot_meta(fed, wid), keys.scoring(), keys.alive(fed, wid),
            fed, wid, meta.step, meta.epoch, _blank(meta.loss), _blank(meta.grad_norm),
            meta.model_dump_json(), utcnow().isoformat(), store._ttl_ms(),
            store.settings.stream_maxlen,
        )  # fmt: skip
        await _queue_generations(store, pipe, fed, wid, policy, prev, frame)
        results = await anyio.to_thread.run_sync(pipe.execute)
    return int(results[1])


def _blank(value: float | None) -> str | float:
    return "" if value is None else value


async def _queue_generations(
    store: Store, pipe: object, fed: str, wid: str, policy: Policy, prev: dict[str, str],
    frame: Frame,
) -> None:  # fmt: skip
    meta = frame.meta
    assert meta is not None
    old = json.loads(prev["meta"])["generations"] if prev else {}
    changed = {
        layer: g for layer, g in meta.generations.items()
        if layer in frame.entries and g > old.get(layer, 0)
    }  # fmt: skip
    if not changed:
        return
    own = (
        SnapshotRef(worker_id=wid, version=int(prev["version"]), step=int(prev["step"]))
        if prev
        else None
    )
    for layer, generation in changed.items():
        await _queue_generation(store, pipe, fed, wid, policy, own, frame, layer, generation)


async def _queue_generation(
    store: Store, pipe: object, fed: str, wid: str, policy: Policy, own: SnapshotRef | None,
    frame: Frame, layer: str, generation: int,
) -> None:  # fmt: skip
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
        retained=policy.retain_generations > 0,
    )
    p = pipe  # a redis pipeline (typed loosely to keep redis-py generics out)
    p.rpush(keys.generations(fed, wid, layer), record.model_dump_json())  # type: ignore[attr-defined]
    if policy.retain_generations == 0:
        return
    kept = [int(g) for g in await store.r.lrange(keys.retained(fed, wid, layer), 0, -1)]
    kept.append(generation)
    dropped = kept[: max(0, len(kept) - policy.retain_generations)]
    entry = frame.entries[layer]
    tensor = encode_frame({layer: frame.tensors[layer]}, meta=frame.meta, dtype=entry.dtype)
    p.set(keys.generation_tensor(fed, wid, layer, generation), tensor)  # type: ignore[attr-defined]
    p.rpush(keys.retained(fed, wid, layer), generation)  # type: ignore[attr-defined]
    p.ltrim(keys.retained(fed, wid, layer), -policy.retain_generations, -1)  # type: ignore[attr-defined]
    for g in dropped:
        p.unlink(keys.generation_tensor(fed, wid, layer, g))  # type: ignore[attr-defined]
