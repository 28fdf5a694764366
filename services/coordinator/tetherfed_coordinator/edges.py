"""What the API does at its edges, made explicit: every error status in the OpenAPI document,
`Allow` on 405 listing every method of the path, Redis trouble as 503, and the status code of
each kind of domain error (`errors`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from tether_protocol.messages import ErrorBody, servable

from .errors import (
    BadInput,
    Conflict,
    CoordinatorError,
    Invalid,
    NotFound,
    TooLarge,
    Unavailable,
)

_WHY = {
    400: "Malformed request: the detail says what is wrong.",
    401: "Missing or unknown bearer token (when the coordinator has one).",
    403: "A valid token of the wrong principal.",
    404: "Unknown federation, worker, layer or decision.",
    409: "Conflicts with the current state (name taken, worker left, different ack).",
    410: "No longer stored: a superseded snapshot version whose pin lapsed.",
    413: "Body over the configured maximum.",
    422: "The request is well-formed but invalid (validation, frame contents).",
    503: "Redis is unavailable or lost the data needed; retry later.",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": why} for code, why in _WHY.items()
}


def allowed_methods(app: FastAPI, scope: dict[str, Any]) -> list[str]:
    """Every method some route of `app` serves at the request's path."""
    methods: set[str] = set()
    for route in leaves(app.router.routes):
        match, _ = route.matches({**scope, "method": "__NONE__"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def leaves(routes: Sequence[BaseRoute]) -> Iterator[BaseRoute]:
    """Every route of `routes`, included routers' routes in their place."""
    # FastAPI ≥ 0.165 keeps an included router as one entry holding the original router.
    for route in routes:
        inner = getattr(route, "original_router", None)
        yield from leaves(inner.routes) if inner is not None else (route,)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's HTTP errors as JSON; a 405 carries `Allow` with every method of the path."""
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(request.app, dict(request.scope)))
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)


# The status code of each kind of domain error (`errors`); a subclass answers its base's code.
STATUS: dict[type[CoordinatorError], int] = {
    BadInput: 400,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    Invalid: 422,
    Unavailable: 503,
}


def status_of(exc: CoordinatorError) -> int:
    """The status code `STATUS` gives the error's kind (500 for a kind it does not list)."""
    return next((STATUS[k] for k in type(exc).__mro__ if k in STATUS), 500)


async def coordinator_error(request: Request, exc: Exception) -> JSONResponse:
    """A domain error as JSON: its kind's status code, its detail unchanged."""
    assert isinstance(exc, CoordinatorError)
    return JSONResponse({"detail": exc.detail}, status_code=status_of(exc))


async def redis_down(request: Request, exc: Exception) -> JSONResponse:
    """503 while Redis cannot be reached or answers too slowly."""
    return JSONResponse({"detail": f"redis unavailable: {exc}"}, status_code=503)


async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 (the validation errors, each with the input it refused), with any string
    that UTF-8 cannot encode (a lone surrogate, legal as a JSON escape) spelled out: echoing
    it as is made the error handler itself fail with a 500."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": servable(jsonable_encoder(exc.errors()))}, status_code=422)


def install(app: FastAPI) -> None:
    """Register the handlers above on `app`."""
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(CoordinatorError, coordinator_error)
    for exc_type in (aioredis.ConnectionError, aioredis.TimeoutError):
        app.add_exception_handler(exc_type, redis_down)
