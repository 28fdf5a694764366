"""Health, readiness and metrics."""

from __future__ import annotations

import redis.asyncio as aioredis
from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from .deps import MetricsDep, StoreDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(store: StoreDep) -> dict[str, str] | JSONResponse:
    """Redis answers."""
    try:
        await store.r.ping()
    except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
        return JSONResponse({"detail": f"redis unreachable: {exc}"}, status_code=503)
    return {"status": "ready"}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(store: StoreDep, metrics: MetricsDep) -> PlainTextResponse:
    """Prometheus text exposition (request counters of this replica; scoring counters and
    backlog from Redis)."""
    backlog, pending = await store.scoring_backlog()
    stats = await store.r.hgetall(store.keys.stats())
    return PlainTextResponse(
        metrics.render(backlog, pending, stats), media_type="text/plain; version=0.0.4"
    )
