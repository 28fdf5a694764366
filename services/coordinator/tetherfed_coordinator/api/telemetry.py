"""Telemetry: the weight diagnostics a worker reports (docs/how-to/diagnostics.md), as bounded
series per metric and layer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from tether_protocol.telemetry import Metric, TelemetryCreate, TelemetryMetrics, TelemetrySeries

from .. import telemetry
from .deps import ReaderAuth, StoreDep, WorkerAuth
from .workers import ensure_member

router = APIRouter(prefix="/v1/federations/{fed}/workers/{wid}/telemetry", tags=["telemetry"])


@router.post("", status_code=204, dependencies=[WorkerAuth])
async def post_telemetry(fed: str, wid: str, body: TelemetryCreate, store: StoreDep) -> Response:
    """Append points to the worker's series (each kept to its newest `telemetry_maxlen`);
    404 for an unknown worker, 409 after it left."""
    ensure_member(await store.worker_record(fed, wid), fed, wid)
    await telemetry.add(store, fed, wid, body.data)
    return Response(status_code=204)


@router.get("", dependencies=[ReaderAuth], response_model=None)
async def get_telemetry(
    fed: str,
    wid: str,
    store: StoreDep,
    metric: Annotated[Metric | None, Query(description="One of the diagnostics metrics.")] = None,
    layer: Annotated[str | None, Query(description="Layer, `all` or `model`.")] = None,
    after: Annotated[
        int | None, Query(ge=-1, description="Only points with a larger step.")
    ] = None,
) -> TelemetryMetrics | TelemetrySeries:
    """Without `metric`: the series the worker has (metric, layer, count, last step). With it:
    that series' points with step > `after`, oldest first (`last_step` is the next `after`).
    422 for a metric that is not one of the diagnostics names (or a layer needed and missing);
    404 for a worker, metric or layer without telemetry."""
    await store.worker_record(fed, wid)
    if metric is None:
        return await telemetry.listing(store, fed, wid)
    return await telemetry.series(store, fed, wid, metric, layer, after)
