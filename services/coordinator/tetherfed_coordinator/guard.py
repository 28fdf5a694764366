"""Who sent a request is checked before its body is read, and every JSON body is bounded.

FastAPI reads and parses a route's JSON body before it solves the route's dependencies, auth
included: an unauthenticated client could make the coordinator read and parse bodies of any
size (hundreds of MiB of memory each) before the 401, and learn the parser's complaints about
invalid JSON. `AuthFirst`, in front of the router, sees to it that for every route that takes
a JSON body:

1. its dependencies (auth, and what auth needs) are solved first, on the headers and path
   alone: a 401/403/404 is answered before one byte of the body is read;
2. then a body over the route's limit is refused with a 413 naming the limit: by its
   Content-Length before reading, or (chunked) as soon as the bytes read pass the limit.

The limit is `Settings.max_json_bytes` (8 MiB by default, far below a tether frame's
`max_frame_bytes`), and `TELEMETRY_JSON_BYTES` for telemetry batches (512 points of up to 4,096
numbers each). Frame routes read their bodies themselves, after their dependencies, and bound
them (`max_frame_bytes`, `sketches.MAX_SKETCH_BYTES`). The uvicorn protocol (`rawbody`) closes
the connection after a response sent while more than `rawbody.DISCARD_MAX` of a declared body
was still unread, so a refused upload is not received to be thrown away.

The dependencies run twice (here and in FastAPI's handler); the one that costs a Redis round
trip, the token's owner, is remembered for the request (`api.deps`).
"""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import solve_dependencies
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api.deps import OWNERS
from .edges import leaves
from .settings import Settings

TELEMETRY_JSON_BYTES = 64 << 20  # 512 points × 4,096 numbers written out in full: about 45 MB


def too_large(limit: int) -> HTTPException:
    """The 413 of a JSON body over `limit` bytes."""
    return HTTPException(413, f"request body exceeds the maximum of {limit} bytes for this route")


class AuthFirst:
    """ASGI middleware: a request for a JSON route is authenticated, then bounded, before the
    route reads its body."""

    BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

    def __init__(self, app: ASGIApp, fastapi: FastAPI) -> None:
        self.app, self.fastapi = app, fastapi
        self._guards: dict[int, Dependant] = {}

    def _route(self, scope: Scope) -> tuple[APIRoute, Scope] | None:
        """The JSON route the router will pick for `scope`, with its path parameters."""
        for route in leaves(self.fastapi.router.routes):
            match, child = route.matches(scope)
            if match == Match.FULL:
                if isinstance(route, APIRoute) and route.body_field is not None:
                    return route, child
                return None
        return None

    def _dependencies(self, route: APIRoute) -> Dependant:
        guard = self._guards.get(id(route))
        if guard is None:
            deps = list(route.dependant.dependencies)
            guard = self._guards[id(route)] = Dependant(dependencies=deps, path=route.path)
        return guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in self.BODY_METHODS:
            await self.app(scope, receive, send)
            return
        found = self._route(scope)
        if found is None:
            await self.app(scope, receive, send)
            return
        route, child = found
        scope.setdefault(OWNERS, {})  # shared with the copy below: tokens looked up once
        try:
            async with contextlib.AsyncExitStack() as stack:
                stacks = {"fastapi_inner_astack": stack, "fastapi_function_astack": stack}
                request = Request({**scope, **child, **stacks}, receive, send)
                # Errors (an invalid path parameter, say) are left to the route to report; an
                # exception (401, 403, 404, Redis down) answers here, the body unread.
                await solve_dependencies(
                    request=request,
                    dependant=self._dependencies(route),
                    async_exit_stack=stack,
                    embed_body_fields=False,
                )
            settings: Settings = self.fastapi.state.settings
            limit = json_limit(route, settings)
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise too_large(limit)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            response = await handler(Request({**scope, **child}, receive, send), exc)
            await response(scope, receive, send)
            return
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large(limit)  # FastAPI lets an HTTPException out of its body read
            return message

        await self.app(scope, bounded, send)

    def _handler(self, exc: Exception) -> Any:
        handlers = self.fastapi.exception_handlers
        return next((handlers[k] for k in type(exc).__mro__ if k in handlers), None)


def json_limit(route: APIRoute, settings: Settings) -> int:
    """The body limit of a JSON route, in bytes."""
    if route.path.endswith("/telemetry"):
        return max(settings.max_json_bytes, TELEMETRY_JSON_BYTES)
    return settings.max_json_bytes
