"""Health, readiness and metrics."""

from __future__ import annotations

import redis.asyncio as aioredis
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from .. import liveness
from ..metrics import CONTENT_TYPE
from .deps import MetricsDep, StoreDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(request: Request, store: StoreDep) -> dict[str, str] | JSONResponse:
    """Redis answers and, with scoring on, decisions can be made: the scoring group exists (503
    while Redis has lost it and the scorer has not recreated it yet), a scorer runs (a scoring
    process reported within 10 s) and its steps do not keep failing (3 in a row)."""
    try:
        await store.r.ping()
        if store.settings.scoring_enabled:
            await store.r.xinfo_groups(store.keys.scoring())
            trouble = await liveness.problem(store.r, store.settings, request.app.state.scoring)
            if trouble:
                return JSONResponse({"detail": f"cannot score: {trouble}"}, status_code=503)
    except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
        return JSONResponse({"detail": f"redis unreachable: {exc}"}, status_code=503)
    except aioredis.ResponseError as exc:  # no such key: the scoring stream and group are gone
        return JSONResponse({"detail": f"cannot score: scoring group missing ({exc})"}, 503)
    return {"status": "ready"}


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(store: StoreDep, metrics: MetricsDep) -> Response:
    """Prometheus text exposition (prometheus_client) of this coordinator: its API, its
    scoring (thread or processes), and the scoring stream's backlog from Redis."""
    backlog, pending = await store.scoring_backlog()
    return Response(metrics.render(backlog, pending), media_type=CONTENT_TYPE)
