"""Tethers: publish a frame, read summaries, raw layers and generation lineage."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse

from tether_protocol.frame import encode_frame, split_probe_grams, tensor_view
from tether_protocol.messages import (
    GenerationRecord,
    GenerationsPublic,
    PublishAccepted,
    TethersPublic,
    TetherStats,
)

from .. import replies
from ..ingest import receive_publish
from ..store import Snapshot, Store
from .deps import MetricsDep, ReaderAuth, SettingsDep, StoreDep, WorkerAuth
from .workers import ensure_member, incarnation_header

router = APIRouter(prefix="/v1/federations/{fed}/workers/{wid}/tethers", tags=["tethers"])

FRAME_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A safetensors frame holding registered layers (at least those the "
        "policy's `layers` name), with SnapshotMeta "
        "under __metadata__['tetherfed.snapshot'].",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
SAFETENSORS: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "safetensors"}
}


@router.put("", status_code=202, dependencies=[WorkerAuth], openapi_extra=FRAME_BODY)
async def publish(
    fed: str,
    wid: str,
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    response: Response,
) -> PublishAccepted:
    """Publish a snapshot (413 over the size cap; 400/422 naming what is wrong; nothing written)."""
    started = time.perf_counter()
    policy, record, prev = await store.publish_context(fed, wid)
    ensure_member(record, fed, wid)
    response.headers.update(incarnation_header(record))
    layers = store.layers_of(record)
    limit = settings.max_frame_bytes
    done = await receive_publish(store, request, limit, fed, wid, policy, layers, prev)
    metrics.api.publishes.inc()
    metrics.api.bytes_in.inc(done.nbytes)
    metrics.api.publish_seconds.labels("full").observe(time.perf_counter() - started)
    assert done.frame.meta is not None
    return PublishAccepted(
        worker_id=wid,
        version=done.version,
        step=done.frame.meta.step,
        layers=len(split_probe_grams(done.frame.entries)[0]),
        bytes=done.nbytes,
    )


def tether_stats(snap: Snapshot, layer: str) -> TetherStats:
    """Summary statistics and a 32-bin histogram of one layer of a snapshot."""
    entry = snap.entries[layer]
    values = tensor_view(snap.buf, entry).astype(np.float64, copy=False).reshape(-1)
    lo, hi = float(values.min()), float(values.max())
    hist, edges = np.histogram(values, bins=32, range=(lo, hi) if hi > lo else (lo, lo + 1.0))
    return TetherStats(
        layer=layer,
        shape=list(entry.shape),
        dtype=entry.dtype,
        version=snap.version,
        generation=snap.meta.generations.get(layer, 0),
        step=snap.step,
        mean=float(values.mean()),
        std=float(values.std()),
        min=lo,
        max=hi,
        histogram=[int(h) for h in hist],
        bin_edges=[float(e) for e in edges],
    )


@router.get("", dependencies=[ReaderAuth])
async def summary(fed: str, wid: str, store: StoreDep) -> TethersPublic:
    """Per-layer statistics of the worker's latest snapshot."""
    snap = await store.snapshot(fed, wid)
    data = [tether_stats(snap, layer) for layer in snap.entries]
    return TethersPublic(
        worker_id=wid, version=snap.version, step=snap.step, data=data, count=len(data)
    )


async def _layer_frame(
    store: Store, fed: str, wid: str, layer: str, generation: int | None, snap: Snapshot
) -> bytes:
    if generation is not None:
        raw = replies.opt_data(
            await store.rb.get(store.keys.generation_tensor(fed, wid, layer, generation))
        )
        if raw is None:
            raise HTTPException(404, f"generation {generation} of layer {layer!r} is not retained")
        return raw
    entry = snap.entries[layer]
    extra = {"tetherfed.version": str(snap.version)}
    # The layer's parts (merge_scope weights or model) follow its tether, float32 as published.
    parts = {name: tensor_view(snap.buf, e) for name, e in snap.parts.get(layer, {}).items()}
    return encode_frame(
        {layer: tensor_view(snap.buf, entry), **parts},
        meta=snap.meta,
        dtype=entry.dtype,
        extra_metadata=extra,
    )


async def pinned_layer_of(
    store: Store, fed: str, wid: str, version: int, layer: str, latest: int
) -> Snapshot:
    """`layer` of the worker's superseded snapshot `version` (404 when it is newer than the
    latest, 410 saying why when it is no longer stored)."""
    if version > latest:
        raise HTTPException(
            404, f"worker {wid!r} has no snapshot version {version} yet (latest: {latest})"
        )
    snap = await store.pinned_layer(fed, wid, version, layer)
    if isinstance(snap, str):
        raise HTTPException(
            410,
            f"snapshot version {version} of worker {wid!r} is no longer stored (latest: "
            f"{latest}): {snap}",
        )
    return snap


GENERATIONS = "/generations"
LayerFormat = Literal["safetensors", "stats"]
Generation = Annotated[int | None, Query(ge=0, le=2**63 - 1)]
Version = Annotated[int | None, Query(ge=1, le=2**63 - 1)]


@router.get("/{layer:path}/generations", dependencies=[ReaderAuth])
async def layer_generations(
    fed: str,
    wid: str,
    layer: str,
    store: StoreDep,
    format: Annotated[LayerFormat, Query(include_in_schema=False)] = "safetensors",
    generation: Annotated[int | None, Query(ge=0, le=2**63 - 1, include_in_schema=False)] = None,
    version: Annotated[int | None, Query(ge=1, le=2**63 - 1, include_in_schema=False)] = None,
) -> GenerationsPublic:
    """The layer's lineage: every generation of its tether with its parents and the decision
    that made it (404 for a layer the worker does not have). A layer whose own name ends in
    `/generations` is served as `GET …/tethers/{layer}` serves it: a registered name wins over
    the suffix."""
    registered = {spec.name for spec in store.layers_of(await store.worker_record(fed, wid))}
    full = layer + GENERATIONS
    if full in registered:  # a Response is served as it is, not as GenerationsPublic
        found = await _layer(store, fed, wid, full, format, generation, version)
        if isinstance(found, TetherStats):
            found = JSONResponse(found.model_dump(mode="json"))
        return found  # type: ignore[return-value]
    if layer not in registered:
        raise HTTPException(404, f"worker {wid!r} has no layer {layer!r}")
    return await generations(fed, wid, layer, store)


@router.get("/{layer:path}", dependencies=[ReaderAuth], responses=SAFETENSORS, response_model=None)
async def layer(
    fed: str,
    wid: str,
    layer: str,
    store: StoreDep,
    format: LayerFormat = "safetensors",
    generation: Generation = None,
    version: Version = None,
) -> Response | TetherStats:
    """One layer of the latest snapshot as a safetensors frame: its tether, then the parts the
    worker published with it (`merge_scope` weights or model: `<layer>@weight`, `@bias`,
    `@model:<path>`, float32) (`?format=stats`: JSON of the tether;
    `?generation=g`: a retained generation's tether alone; `?version=v`: snapshot v exactly, the
    latest or, once superseded, the layer and its parts an unacked decision names (kept until it
    is acked or `snapshot_pin_s` after it was issued), else 410 saying why). Its lineage is
    `GET …/tethers/{layer}/generations`.

    Any layer name works URL-encoded, `/` included."""
    await store.worker_record(fed, wid)  # 404 for an unknown worker, before its snapshot
    return await _layer(store, fed, wid, layer, format, generation, version)


async def _layer(
    store: Store,
    fed: str,
    wid: str,
    layer: str,
    format: LayerFormat,
    generation: int | None,
    version: int | None,
) -> Response | TetherStats:
    snap = await store.snapshot_layer(fed, wid, layer)
    if version is not None and version != snap.version:
        snap = await pinned_layer_of(store, fed, wid, version, layer, snap.version)
    if layer not in snap.entries:
        raise HTTPException(404, f"worker {wid!r} has no layer {layer!r}")
    if format == "stats":
        return tether_stats(snap, layer)
    body = await _layer_frame(store, fed, wid, layer, generation, snap)
    headers = {"X-Tether-Version": str(snap.version)}
    return Response(body, media_type="application/octet-stream", headers=headers)


async def generations(fed: str, wid: str, layer: str, store: Store) -> GenerationsPublic:
    """The layer's lineage: every generation with its parents and the decision that made it."""
    keys = store.keys
    rows = await store.r.lrange(keys.generations(fed, wid, layer), 0, -1)
    kept = set(await store.r.lrange(keys.retained(fed, wid, layer), 0, -1))
    data = []
    for row in rows:
        rec = GenerationRecord.model_validate_json(row)
        data.append(rec.model_copy(update={"retained": str(rec.generation) in kept}))
    return GenerationsPublic(worker_id=wid, layer=layer, data=data, count=len(data))
