"""Sketch publishes: the count sketches of a worker's large layers (`SketchPolicy`,
`tether_protocol.sketch`)."""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Request, Response

from tether_protocol.frame import FrameError
from tether_protocol.messages import SketchAccepted
from tether_protocol.policy import layers_in_scope
from tether_protocol.sketch import decode_sketch_frame

from ..ingest import frame_error, publishers_frame
from .deps import MetricsDep, StoreDep, WorkerAuth
from .tethers import FRAME_BODY
from .workers import ensure_member, incarnation_header

router = APIRouter(prefix="/v1/federations/{fed}/workers/{wid}/sketch", tags=["tethers"])
MAX_SKETCH_BYTES = 64 << 20  # a sketch frame is small: k floats per large layer, small layers whole


@router.put("", status_code=202, dependencies=[WorkerAuth], openapi_extra=FRAME_BODY)
async def publish_sketch(
    fed: str,
    wid: str,
    request: Request,
    store: StoreDep,
    metrics: MetricsDep,
    response: Response,
) -> SketchAccepted:
    """Publish a sketch frame (`tether_protocol.encode_sketch_frame`): scored like a publish,
    on sketches, while the full tether a decision applies stays the last full publish. 409 when
    the federation's policy has no `sketch`; 400/413/422 naming what is wrong; nothing written.
    `full_requested` in the answer: a decision needs this worker's current tether, publish it
    in full next."""
    started = time.perf_counter()
    policy, record, _ = await store.publish_context(fed, wid)
    ensure_member(record, fed, wid)
    response.headers.update(incarnation_header(record))
    if policy.sketch is None:
        raise HTTPException(
            409, f"federation {fed!r} scores full tethers: its policy has no sketch"
        )
    body = await _body(request)
    try:
        layers = store.layers_of(record)
        in_scope = layers_in_scope(policy, [layer.name for layer in layers])
        frame, _ = decode_sketch_frame(body, layers, policy.sketch, in_scope)
    except FrameError as exc:
        raise frame_error(exc) from None
    frame = publishers_frame(frame, wid)
    assert frame.meta is not None
    version, wanted = await store.publish_sketch(fed, wid, frame.meta, body)
    metrics.api.publishes.inc()
    metrics.api.bytes_in.inc(len(body))
    metrics.api.publish_seconds.labels("sketch").observe(time.perf_counter() - started)
    return SketchAccepted(
        worker_id=wid,
        version=version,
        step=frame.meta.step,
        layers=len(frame.entries),
        bytes=len(body),
        full_requested=wanted,
    )


async def _body(request: Request) -> bytes:
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > MAX_SKETCH_BYTES:
            raise HTTPException(
                413, f"sketch frame exceeds the maximum of {MAX_SKETCH_BYTES} bytes"
            )
        chunks.append(chunk)
    return b"".join(chunks)
