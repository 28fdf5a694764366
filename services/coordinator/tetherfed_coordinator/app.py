"""Build the FastAPI app: Redis clients, the scoring task, routers, error handlers, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import edges, guard
from .api import (
    compatibility,
    decisions,
    federations,
    health,
    partners,
    sketches,
    telemetry,
    tethers,
    ui,
    workers,
)
from .embedded import EmbeddedRedis
from .liveness import check_eviction
from .metrics import Metrics
from .scoring import Scorer, ScoringProcesses, ScoringThread
from .settings import Settings
from .store import Store, redis_clients
from .topology import aclose

log = logging.getLogger(__name__)


class CountRequests:
    """ASGI middleware counting requests by method and status (no body buffering)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.api.requests.labels(scope["method"], message["status"]).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start Redis clients (and an embedded server without a URL) and the scoring loop."""
    settings: Settings = app.state.settings
    embedded = None
    url = settings.redis_url
    if url is None:
        embedded = EmbeddedRedis(settings.data_dir).start()
        url = embedded.url
    r, rb, blocking = redis_clients(url, settings.long_poll_max_s)
    await check_eviction(r, settings)
    app.state.store = store = Store(r, rb, blocking, settings)
    await store.migrate_legacy()
    # For direct calls on this loop (tests, tools); the loop itself runs on its own thread.
    metrics: Metrics = app.state.metrics
    app.state.scorer = scorer = Scorer(store, metrics.scoring)
    await scorer.ensure_group()
    background: ScoringThread | ScoringProcesses | None = None
    supervisor: asyncio.Task[None] | None = None
    if settings.scoring_enabled and settings.scorer_processes:
        env = metrics.start_multiprocess()
        background = ScoringProcesses(url, settings, settings.scorer_processes, env).start()
        supervisor = asyncio.create_task(background.supervise())  # a killed scorer comes back
    elif settings.scoring_enabled:
        background = ScoringThread(url, settings, metrics.scoring).start()
    app.state.scoring = background  # /readyz asks it whether scoring works
    try:
        yield
    finally:
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        if background is not None:
            background.stop(timeout_s=10)
        metrics.stop_multiprocess()
        for client in (r, rb, blocking):
            await aclose(client)
        if embedded is not None:
            embedded.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The coordinator app for `settings` (read from the environment when omitted)."""
    settings = settings or Settings()
    app = FastAPI(
        title="tetherfed coordinator",
        version="1",
        description="Workers publish tether frames; the coordinator scores pairs and decides "
        "merge / drift / hold (`tether_protocol.policy`).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.scoring = None
    app.state.metrics = metrics = Metrics()
    routers = (
        health,
        federations,
        workers,
        tethers,
        partners,
        sketches,
        compatibility,
        decisions,
        telemetry,
        ui,
    )
    for module in routers:
        app.include_router(module.router, responses=edges.ERROR_RESPONSES)
    edges.install(app)
    app.add_middleware(guard.AuthFirst, fastapi=app)
    app.add_middleware(CountRequests, metrics=metrics)
    return app
