"""Dependencies as named Annotated types, and bearer-token auth (docs/protocol.md, "Auth").

With `TETHER_TOKEN` set: admin calls need that token; reads inside a federation accept it, the
read-only `TETHER_READ_TOKEN` (which may also list federations) or any of the federation's worker
tokens; publishing, heartbeats and acks need the worker's own token;
leaving and long-polling accept the worker's own token or the admin token. 401: missing or unknown
token; 403: a valid token of the wrong principal.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from ..metrics import Metrics
from ..settings import Settings
from ..store import Store


async def get_settings(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


async def get_store(request: Request) -> Store:
    """The app's store."""
    store: Store = request.app.state.store
    return store


async def get_metrics(request: Request) -> Metrics:
    """The app's metrics."""
    metrics: Metrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

UNAUTHORIZED = "missing or invalid bearer token"


def bearer(request: Request) -> str | None:
    """The bearer token of a request, if any."""
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _is_admin(token: str | None, settings: Settings) -> bool:
    return (
        token is not None
        and settings.token is not None
        and hmac.compare_digest(token.encode(), settings.token.encode())
    )


def _is_read_only(token: str | None, settings: Settings) -> bool:
    return (
        token is not None
        and settings.read_token is not None
        and hmac.compare_digest(token.encode(), settings.read_token.encode())
    )


OWNERS = "tetherfed.token_owners"  # scope key: token owners looked up for this request


async def token_owner(request: Request, store: Store, fed: str, token: str) -> str | None:
    """The worker `token` belongs to in `fed`, looked up once per request (a JSON route's
    dependencies run before its body is read and again after: `guard`)."""
    memo: dict[tuple[str, str], str | None] = request.scope.setdefault(OWNERS, {})
    if (fed, token) not in memo:
        memo[fed, token] = await store.token_owner(fed, token)
    return memo[fed, token]


def _auth_error() -> HTTPException:
    return HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})


async def require_admin(request: Request, settings: SettingsDep) -> None:
    """Admin calls: the configured token (no-op when auth is off)."""
    if settings.token is not None and not _is_admin(bearer(request), settings):
        raise _auth_error()


async def require_reader(
    fed: str, request: Request, settings: SettingsDep, store: StoreDep
) -> None:
    """Reads in a federation: the admin token or any of its worker tokens."""
    if settings.token is None:
        return
    token = bearer(request)
    if _is_admin(token, settings) or _is_read_only(token, settings):
        return
    if token is None or await token_owner(request, store, fed, token) is None:
        raise _auth_error()


async def require_read_all(request: Request, settings: SettingsDep) -> None:
    """Reads across federations (listing them): the admin or the read-only token."""
    token = bearer(request)
    if settings.token is not None and not (
        _is_admin(token, settings) or _is_read_only(token, settings)
    ):
        raise _auth_error()


async def acting_worker(
    fed: str, request: Request, settings: SettingsDep, store: StoreDep
) -> str | None:
    """The worker a worker-only call acts as (None when auth is off)."""
    if settings.token is None:
        return None
    token = bearer(request)
    if _is_admin(token, settings):
        raise HTTPException(403, "this call needs a worker's own token, not the admin token")
    owner = await token_owner(request, store, fed, token) if token else None
    if owner is None:
        raise _auth_error()
    return owner


async def require_worker(
    fed: str, wid: str, owner: Annotated[str | None, Depends(acting_worker)]
) -> None:
    """Publish and heartbeat: only the worker's own token."""
    if owner is not None and owner != wid:
        raise HTTPException(403, f"token belongs to worker {owner!r}, not {wid!r}")


async def require_worker_or_admin(
    fed: str, wid: str, request: Request, settings: SettingsDep, store: StoreDep
) -> None:
    """Leave and long-poll: the worker's own token or the admin token."""
    if settings.token is None or _is_admin(bearer(request), settings):
        return
    owner = await acting_worker(fed, request, settings, store)
    await require_worker(fed, wid, owner)


AdminAuth = Depends(require_admin)
ReaderAuth = Depends(require_reader)
ReadAllAuth = Depends(require_read_all)
WorkerAuth = Depends(require_worker)
WorkerOrAdminAuth = Depends(require_worker_or_admin)
ActingWorker = Annotated[str | None, Depends(acting_worker)]
