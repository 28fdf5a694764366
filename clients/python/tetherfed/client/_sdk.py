"""Typed httpx clients (sync and async) for every call of the coordinator's REST API v1.

Both clients share one table of calls (`_Calls`): each method builds a `Call` (method, path,
body, response model, idempotent or not) and the client sends it. Idempotent calls are retried
on transport errors and 5xx with backoff and full jitter (`RetryPolicy`); others are sent once.
Pass `transport=` (e.g. `httpx.ASGITransport(app)`) to talk to an in-process app.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast
from urllib.parse import quote

import httpx
import numpy as np
import numpy.typing as npt
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse
from pydantic import BaseModel

from tether_protocol.frame import Frame, decode_frame
from tether_protocol.messages import (
    INCARNATION_HEADER,
    LAST_DECISION_HEADER,
    AckCreate,
    AckItem,
    AckPublic,
    AcksCreate,
    AcksPublic,
    CompatibilitiesPublic,
    CompatibilityPublic,
    Decision,
    DecisionsPublic,
    FederationCreate,
    FederationPublic,
    FederationsPublic,
    GenerationsPublic,
    Heartbeat,
    LayerSpec,
    Policy,
    PolicyPatch,
    PublishAccepted,
    SketchAccepted,
    TethersPublic,
    TetherStats,
    WorkerCreate,
    WorkerPublic,
    WorkerRegistered,
    WorkersPublic,
)
from tether_protocol.stream import KEEPALIVE_HEADER, idle_bound, parse_keepalive
from tether_protocol.telemetry import TelemetryCreate, TelemetryMetrics, TelemetrySeries

from ._errors import TetherError, TransportError, error_for
from ._retry import RetryPolicy

T = TypeVar("T")
Body = bytes | Sequence[memoryview] | None

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
# A decision stream's wait for its headers, and its idle bound when the coordinator states no
# keep-alive period (an older one); otherwise the bound follows the period it states
# (`tether_protocol.stream.idle_bound`).
STREAM_IDLE_S = 60.0


@dataclass(frozen=True)
class Call(Generic[T]):
    """One REST call: what to send and how to read the answer."""

    method: str
    path: str
    model: type[T] | None = None
    json: Any = None
    content: Body = None
    params: Mapping[str, Any] = field(default_factory=dict)
    idempotent: bool = True
    raw: bool = False
    timeout: float | None = None


def _p(*parts: str) -> str:
    return "/".join(quote(part, safe="") for part in parts)


def _dump(model: BaseModel) -> Any:
    return model.model_dump(mode="json", exclude_unset=False)


class _Calls:
    """The coordinator's REST surface as `Call` builders (shared by both clients)."""

    @staticmethod
    def healthz() -> Call[dict[str, Any]]:
        return Call("GET", "/healthz")

    @staticmethod
    def readyz() -> Call[dict[str, Any]]:
        return Call("GET", "/readyz")

    @staticmethod
    def create_federation(name: str, policy: Policy | str = "default") -> Call[FederationPublic]:
        body = FederationCreate(name=name, policy=policy)  # type: ignore[arg-type]
        return Call("POST", "/v1/federations", FederationPublic, json=_dump(body), idempotent=False)

    @staticmethod
    def list_federations() -> Call[FederationsPublic]:
        return Call("GET", "/v1/federations", FederationsPublic)

    @staticmethod
    def get_federation(fed: str) -> Call[FederationPublic]:
        return Call("GET", f"/v1/federations/{_p(fed)}", FederationPublic)

    @staticmethod
    def update_policy(fed: str, patch: PolicyPatch | Mapping[str, Any]) -> Call[FederationPublic]:
        body = patch if isinstance(patch, PolicyPatch) else PolicyPatch.model_validate(patch)
        return Call(
            "PATCH",
            f"/v1/federations/{_p(fed)}/policy",
            FederationPublic,
            json=body.model_dump(mode="json", exclude_unset=True),
        )

    @staticmethod
    def delete_federation(fed: str) -> Call[None]:
        return Call("DELETE", f"/v1/federations/{_p(fed)}")

    @staticmethod
    def register_worker(
        fed: str, name: str, layers: Sequence[LayerSpec], meta: Mapping[str, Any] | None = None
    ) -> Call[WorkerRegistered]:
        body = WorkerCreate(name=name, layers=list(layers), meta=dict(meta or {}))
        path = f"/v1/federations/{_p(fed)}/workers"
        return Call("POST", path, WorkerRegistered, json=_dump(body), idempotent=False)

    @staticmethod
    def heartbeat(fed: str, wid: str, beat: Heartbeat) -> Call[dict[str, Any]]:
        path = f"/v1/federations/{_p(fed, 'workers', wid)}/heartbeat"
        return Call("POST", path, json=_dump(beat))

    @staticmethod
    def post_telemetry(fed: str, wid: str, body: TelemetryCreate) -> Call[None]:
        path = f"/v1/federations/{_p(fed, 'workers', wid)}/telemetry"
        return Call("POST", path, json=_dump(body))

    @staticmethod
    def telemetry(
        fed: str, wid: str, metric: str | None, layer: str | None, after: int | None
    ) -> Call[Any]:
        path = f"/v1/federations/{_p(fed, 'workers', wid)}/telemetry"
        query = {"metric": metric, "layer": layer, "after": after}
        model = TelemetryMetrics if metric is None else TelemetrySeries
        params = {k: v for k, v in query.items() if v is not None}
        return Call("GET", path, params=params, model=model)

    @staticmethod
    def leave(fed: str, wid: str) -> Call[None]:
        return Call("DELETE", f"/v1/federations/{_p(fed, 'workers', wid)}")

    @staticmethod
    def rejoin(fed: str, wid: str) -> Call[WorkerPublic]:
        return Call("POST", f"/v1/federations/{_p(fed, 'workers', wid)}/rejoin", WorkerPublic)

    @staticmethod
    def list_workers(fed: str) -> Call[WorkersPublic]:
        return Call("GET", f"/v1/federations/{_p(fed)}/workers", WorkersPublic)

    @staticmethod
    def get_worker(fed: str, wid: str) -> Call[WorkerPublic]:
        return Call("GET", f"/v1/federations/{_p(fed, 'workers', wid)}", WorkerPublic)

    @staticmethod
    def publish(fed: str, wid: str, frame: Body) -> Call[PublishAccepted]:
        path = f"/v1/federations/{_p(fed, 'workers', wid)}/tethers"
        return Call("PUT", path, PublishAccepted, content=frame)

    @staticmethod
    def publish_sketch(fed: str, wid: str, frame: Body) -> Call[SketchAccepted]:
        path = f"/v1/federations/{_p(fed, 'workers', wid)}/sketch"
        return Call("PUT", path, SketchAccepted, content=frame)

    @staticmethod
    def tethers(fed: str, wid: str) -> Call[TethersPublic]:
        return Call("GET", f"/v1/federations/{_p(fed, 'workers', wid)}/tethers", TethersPublic)

    @staticmethod
    def tether_bytes(fed: str, wid: str, layer: str, version: int | None = None) -> Call[bytes]:
        path = f"/v1/federations/{_p(fed, 'workers', wid, 'tethers', layer)}"
        return Call("GET", path, raw=True, params={} if version is None else {"version": version})

    @staticmethod
    def decision_tethers_bytes(fed: str, wid: str, decision_ids: Sequence[int]) -> Call[bytes]:
        path = f"/v1/federations/{_p(fed, 'workers', wid)}/decisions/tethers"
        return Call("GET", path, raw=True, params={"decision": list(decision_ids)})

    @staticmethod
    def tether_stats(fed: str, wid: str, layer: str) -> Call[TetherStats]:
        path = f"/v1/federations/{_p(fed, 'workers', wid, 'tethers', layer)}"
        return Call("GET", path, TetherStats, params={"format": "stats"})

    @staticmethod
    def generations(fed: str, wid: str, layer: str) -> Call[GenerationsPublic]:
        path = f"/v1/federations/{_p(fed, 'workers', wid, 'tethers', layer)}/generations"
        return Call("GET", path, GenerationsPublic)

    @staticmethod
    def compatibility(fed: str, layer: str | None = None) -> Call[Any]:
        path = f"/v1/federations/{_p(fed)}/compatibility"
        if layer is None:
            return Call("GET", path, CompatibilitiesPublic)
        return Call("GET", path, CompatibilityPublic, params={"layer": layer})

    @staticmethod
    def decisions(
        fed: str,
        *,
        worker: str | None = None,
        layer: str | None = None,
        action: str | None = None,
        after: int | None = None,
        limit: int | None = None,
    ) -> Call[DecisionsPublic]:
        query = {"worker": worker, "layer": layer, "action": action, "after": after, "limit": limit}
        params = {k: v for k, v in query.items() if v is not None}
        return Call("GET", f"/v1/federations/{_p(fed)}/decisions", DecisionsPublic, params=params)

    @staticmethod
    def worker_decisions(
        fed: str, wid: str, after: int = 0, wait: float = 0.0
    ) -> Call[DecisionsPublic]:
        path = f"/v1/federations/{_p(fed, 'workers', wid)}/decisions"
        return Call(
            "GET", path, DecisionsPublic, params={"after": after, "wait": wait}, timeout=wait + 10.0
        )

    @staticmethod
    def ack(fed: str, decision_id: int, ack: AckCreate) -> Call[AckPublic]:
        path = f"/v1/federations/{_p(fed)}/decisions/{decision_id}/ack"
        return Call("POST", path, AckPublic, json=_dump(ack))

    @staticmethod
    def ack_many(fed: str, acks: Sequence[AckItem]) -> Call[AcksPublic]:
        body = AcksCreate(data=list(acks))
        return Call("POST", f"/v1/federations/{_p(fed)}/acks", AcksPublic, json=_dump(body))

    @staticmethod
    def get_ack(fed: str, decision_id: int) -> Call[AckPublic]:
        return Call("GET", f"/v1/federations/{_p(fed)}/decisions/{decision_id}/ack", AckPublic)


CALLS = _Calls()


def _read(call: Call[T], response: httpx.Response) -> T:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except (json.JSONDecodeError, AttributeError):
            detail = response.text
        raise error_for(response.status_code, detail, call.method, call.path)
    if call.raw:
        return cast(T, response.content)
    if call.model is None:
        return cast(T, response.json() if response.content else None)
    model = cast(type[BaseModel], call.model)
    return cast(T, model.model_validate_json(response.content))


def _request_kwargs(call: Call[Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"params": call.params or None}
    if call.json is not None:
        kwargs["json"] = call.json
    if call.content is not None:
        parts = _parts(call.content)
        kwargs["content"] = _chunks(parts)
        # An explicit length keeps httpx from switching a streamed body to chunked encoding.
        kwargs["headers"] = {
            "content-type": "application/octet-stream",
            "content-length": str(sum(p.nbytes for p in parts)),
        }
    if call.timeout is not None:
        kwargs["timeout"] = httpx.Timeout(call.timeout, connect=5.0)
    return kwargs


def _parts(content: bytes | Sequence[memoryview]) -> Sequence[memoryview]:
    return [memoryview(content)] if isinstance(content, bytes) else content


_CHUNK = 1 << 20


def _chunks(parts: Sequence[memoryview]) -> Iterator[memoryview]:
    # httpx streams iterables of bytes-likes; memoryview slices of 1 MiB avoid joining the frame,
    # and sending them one by one avoids httpcore's copy-the-rest loop over one huge bytes.
    for part in parts:
        flat = part.cast("B") if part.ndim != 1 or part.itemsize != 1 else part
        for start in range(0, flat.nbytes, _CHUNK):
            yield flat[start : start + _CHUNK]


async def _achunks(parts: Sequence[memoryview]) -> AsyncIterator[memoryview]:
    for chunk in _chunks(parts):
        yield chunk


def _headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


def _seen(
    headers: httpx.Headers, incarnation: str | None, last_decision: int | None
) -> tuple[str | None, int | None]:
    """(incarnation, last decision id) as an answer's headers update them (a worker-facing
    answer carries the first, a long poll the second)."""
    last = headers.get(LAST_DECISION_HEADER)
    return (
        headers.get(INCARNATION_HEADER, incarnation),
        int(last) if last is not None and last.isdigit() else last_decision,
    )


def is_loopback(base_url: str) -> bool:
    """Whether the URL names this machine (localhost, 127.0.0.0/8, ::1)."""
    host = httpx.URL(base_url).host
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def http_options(base_url: str) -> dict[str, Any]:
    """httpx client options for `base_url`: a loopback coordinator is never reached through a
    proxy (`trust_env=False`: HTTP_PROXY / ALL_PROXY / NO_PROXY are not read); any other honours
    the environment, and a proxy it names that cannot be used raises `TransportError` naming it
    (e.g. a socks5:// proxy without the `socksio` package)."""
    if is_loopback(base_url):
        return {"trust_env": False}
    try:
        httpx.Client(base_url=base_url).close()  # builds the proxy transports the env asks for
    except (ImportError, ValueError) as exc:
        proxies = {k: v for k, v in os.environ.items() if k.lower().endswith("_proxy") and v}
        raise TransportError(
            f"cannot reach {base_url} through the proxy set in the environment {proxies}: {exc}"
        ) from None
    return {"trust_env": True}


def coordinator_urls(spec: str | Sequence[str]) -> list[str]:
    """The coordinator URLs of `spec`: one URL, several separated by commas (`--coordinator
    http://a:8420,http://b:8420`), or a sequence of them; ValueError when there is none.

    Several URLs name replicas of one coordinator (every replica serves the same Redis, so any
    of them answers any call): a client sends to one and moves to the next when it cannot reach
    it (`Endpoints`)."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    urls = [u.strip().rstrip("/") for u in parts if u.strip()]
    if not urls:
        raise ValueError(f"no coordinator URL in {spec!r}")
    return urls


@dataclass
class Endpoints:
    """Coordinator replicas and which one is in use (failover in request order).

    A request that could not connect (`httpx.ConnectError`: nothing was sent) goes to the next
    replica at once, whatever the call; any other transport failure moves to the next replica
    for the following attempt (retried only when the call is idempotent, per `RetryPolicy`)."""

    urls: list[str]
    current: int = 0

    @property
    def url(self) -> str:
        """The replica in use."""
        return self.urls[self.current]

    def advance(self) -> str:
        """Move to the next replica (round robin); returns its URL."""
        self.current = (self.current + 1) % len(self.urls)
        return self.url


class Client:
    """Synchronous client of a tetherfed coordinator.

    >>> with Client("http://127.0.0.1:8000") as api:
    ...     api.create_federation("demo", policy="seed")

    `base_url` may name several replicas of one coordinator (`coordinator_urls`): requests fail
    over between them (`Endpoints`). ValueError when it names none.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        token: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.endpoints = Endpoints(coordinator_urls(base_url))
        # The federation incarnation the last worker-facing answer named (X-Tether-Incarnation),
        # and the federation's last decision id the last long poll saw (X-Tether-Last-Decision).
        self.incarnation: str | None = None
        self.last_decision: int | None = None
        self._http = httpx.Client(
            base_url=self.endpoints.url,
            headers=_headers(token),
            timeout=timeout,
            transport=transport,
            **({} if transport else http_options(self.endpoints.url)),
        )

    def authorize(self, token: str | None) -> None:
        """Send `token` as the bearer token from now on (a worker's own token after registering)."""
        self._http.headers.pop("authorization", None)
        self._http.headers.update(_headers(token))

    def _headers(self, headers: httpx.Headers) -> None:
        self.incarnation, self.last_decision = _seen(headers, self.incarnation, self.last_decision)

    def call(self, call: Call[T]) -> T:
        """Send one call, retrying idempotent ones per `self.retry`."""
        started, attempt = time.monotonic(), 0
        while True:
            try:
                return self._once(call)
            except TetherError as error:
                if not call.idempotent or not self.retry.should_retry(error, attempt, started):
                    raise
                time.sleep(self.retry.delay(attempt))
                attempt += 1

    def _once(self, call: Call[T]) -> T:
        for left in range(len(self.endpoints.urls) - 1, -1, -1):
            try:
                response = self._http.request(call.method, call.path, **_request_kwargs(call))
            except httpx.TransportError as exc:
                self._http.base_url = httpx.URL(self.endpoints.advance())
                if left and isinstance(exc, httpx.ConnectError):
                    continue  # nothing was sent: the next replica may take it
                raise TransportError(f"{call.method} {call.path}: {exc!r}") from exc
            self._headers(response.headers)
            return _read(call, response)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- the REST surface ---------------------------------------------------------------------
    def healthz(self) -> dict[str, Any]:
        return self.call(CALLS.healthz())

    def readyz(self) -> dict[str, Any]:
        return self.call(CALLS.readyz())

    def create_federation(self, name: str, policy: Policy | str = "default") -> FederationPublic:
        return self.call(CALLS.create_federation(name, policy))

    def list_federations(self) -> FederationsPublic:
        return self.call(CALLS.list_federations())

    def get_federation(self, fed: str) -> FederationPublic:
        return self.call(CALLS.get_federation(fed))

    def update_policy(self, fed: str, patch: PolicyPatch | Mapping[str, Any]) -> FederationPublic:
        return self.call(CALLS.update_policy(fed, patch))

    def delete_federation(self, fed: str) -> None:
        self.call(CALLS.delete_federation(fed))

    def register_worker(
        self,
        fed: str,
        name: str,
        layers: Sequence[LayerSpec],
        meta: Mapping[str, Any] | None = None,
    ) -> WorkerRegistered:
        return self.call(CALLS.register_worker(fed, name, layers, meta))

    def heartbeat(self, fed: str, wid: str, beat: Heartbeat) -> dict[str, Any]:
        return self.call(CALLS.heartbeat(fed, wid, beat))

    def post_telemetry(self, fed: str, wid: str, body: TelemetryCreate) -> None:
        """Send diagnostics points (the worker's own token)."""
        self.call(CALLS.post_telemetry(fed, wid, body))

    def telemetry(
        self,
        fed: str,
        wid: str,
        metric: str | None = None,
        layer: str | None = None,
        after: int | None = None,
    ) -> TelemetryMetrics | TelemetrySeries:
        """The series a worker has (no `metric`), or one series' points with step > `after`."""
        return cast(
            TelemetryMetrics | TelemetrySeries,
            self.call(CALLS.telemetry(fed, wid, metric, layer, after)),
        )

    def leave(self, fed: str, wid: str) -> None:
        self.call(CALLS.leave(fed, wid))

    def rejoin(self, fed: str, wid: str) -> WorkerPublic:
        """Come back under the same id after leaving (needs the worker's own token)."""
        return self.call(CALLS.rejoin(fed, wid))

    def list_workers(self, fed: str) -> WorkersPublic:
        return self.call(CALLS.list_workers(fed))

    def get_worker(self, fed: str, wid: str) -> WorkerPublic:
        return self.call(CALLS.get_worker(fed, wid))

    def publish(self, fed: str, wid: str, frame: Body) -> PublishAccepted:
        return self.call(CALLS.publish(fed, wid, frame))

    def publish_sketch(self, fed: str, wid: str, frame: Body) -> SketchAccepted:
        """Publish a sketch frame (`tether_protocol.encode_sketch_frame`; the federation's
        policy must have a `sketch`)."""
        return self.call(CALLS.publish_sketch(fed, wid, frame))

    def tethers(self, fed: str, wid: str) -> TethersPublic:
        return self.call(CALLS.tethers(fed, wid))

    def tether(
        self, fed: str, wid: str, layer: str, version: int | None = None
    ) -> npt.NDArray[np.floating[Any]]:
        """One layer's latest published tether (or that of snapshot `version`: NotFoundError
        (410) once the coordinator no longer stores it), decoded from its safetensors frame."""
        call = CALLS.tether_bytes(fed, wid, layer, version)
        frame = decode_frame(self.call(call), require_meta=False)
        return frame.tensors[layer]

    def tether_frame(self, fed: str, wid: str, layer: str, version: int | None = None) -> Frame:
        """As `tether`, the whole decoded frame: the layer's tether and the parts published with
        it (`<layer>@weight`, `@bias`, `@model:<path>` under `merge_scope` weights or model;
        `tether_protocol.frame.split_entries` sorts them), validated (`FrameError`)."""
        call = CALLS.tether_bytes(fed, wid, layer, version)
        return decode_frame(self.call(call), require_meta=False)

    def decision_tethers(self, fed: str, wid: str, decision_ids: Sequence[int]) -> Frame:
        """The partner tethers of worker `wid`'s decisions in one request, decoded and validated
        (`FrameError`): decision `i`'s under the name `"i"`, its parts as `"i@weight"` etc.; the
        ones left out, with why, in `extra_metadata[tether_protocol.frame.MISSING_KEY]` (JSON)."""
        call = CALLS.decision_tethers_bytes(fed, wid, decision_ids)
        return decode_frame(self.call(call), require_meta=False)

    def tether_stats(self, fed: str, wid: str, layer: str) -> TetherStats:
        return self.call(CALLS.tether_stats(fed, wid, layer))

    def generations(self, fed: str, wid: str, layer: str) -> GenerationsPublic:
        return self.call(CALLS.generations(fed, wid, layer))

    def compatibility(self, fed: str, layer: str | None = None) -> Any:
        """CompatibilityPublic for one layer, or CompatibilitiesPublic for every layer."""
        return self.call(CALLS.compatibility(fed, layer))

    def decisions(self, fed: str, **query: Any) -> DecisionsPublic:
        """Decisions of a federation, filtered by worker, layer, action, after, limit."""
        return self.call(CALLS.decisions(fed, **query))

    def worker_decisions(
        self, fed: str, wid: str, after: int = 0, wait: float = 0.0
    ) -> DecisionsPublic:
        """A worker's decisions after id `after`, long-polling up to `wait` seconds."""
        return self.call(CALLS.worker_decisions(fed, wid, after, wait))

    def ack(self, fed: str, decision_id: int, ack: AckCreate) -> AckPublic:
        return self.call(CALLS.ack(fed, decision_id, ack))

    def ack_many(self, fed: str, acks: Sequence[AckItem]) -> AcksPublic:
        """Several acks in one request (1 to `MAX_ACKS`), recorded in order; each result's
        `status` is what `ack` would have got (a refused one raises nothing here)."""
        return self.call(CALLS.ack_many(fed, acks))

    def get_ack(self, fed: str, decision_id: int) -> AckPublic:
        """The worker's ack of a decision; NotFoundError until it is acked."""
        return self.call(CALLS.get_ack(fed, decision_id))

    def stream_decisions(
        self, fed: str, last_event_id: int | None = None, idle_timeout_s: float | None = None
    ) -> Iterator[Decision]:
        """Follow the federation's decisions as Server-Sent Events (resumes after `last_event_id`).

        The coordinator sends a keep-alive comment while idle, every `X-Tether-Keepalive`
        seconds; a connection silent for `idle_timeout_s` raises `TransportError` instead of
        hanging. None (the default) follows the coordinator: 3 of its keep-alive periods plus
        2 s (`tether_protocol.stream.idle_bound`), STREAM_IDLE_S when it states none."""
        headers = {"last-event-id": str(last_event_id)} if last_event_id is not None else {}
        path = f"/v1/federations/{_p(fed)}/decisions/stream"
        timeout = _stream_timeout(idle_timeout_s)
        try:
            with connect_sse(self._http, "GET", path, headers=headers, timeout=timeout) as source:
                if source.response.status_code >= 400:
                    source.response.read()
                    _read(Call("GET", path), source.response)
                follow_keepalive(source.response, idle_timeout_s)
                yield from _decisions(source.iter_sse())
        except httpx.TransportError as exc:
            raise TransportError(f"GET {path}: {exc!r}") from exc

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stream_timeout(idle_timeout_s: float | None) -> httpx.Timeout:
    """The timeout a decision stream's request starts under (until `follow_keepalive`);
    ValueError for an idle bound that is not a positive number of seconds."""
    if idle_timeout_s is not None and not idle_timeout_s > 0:
        raise ValueError(f"idle_timeout_s must be > 0 seconds (or None), not {idle_timeout_s}")
    return httpx.Timeout(STREAM_IDLE_S if idle_timeout_s is None else idle_timeout_s, connect=5.0)


def stream_idle_s(response: httpx.Response, idle_timeout_s: float | None = None) -> float:
    """A decision stream's idle bound: `idle_timeout_s` when the caller chose one, else
    `idle_bound` of the keep-alive period the coordinator states in `X-Tether-Keepalive`
    (STREAM_IDLE_S when it states none)."""
    if idle_timeout_s is not None:
        return idle_timeout_s
    keepalive_s = parse_keepalive(response.headers.get(KEEPALIVE_HEADER))
    return STREAM_IDLE_S if keepalive_s is None else idle_bound(keepalive_s)


def follow_keepalive(response: httpx.Response, idle_timeout_s: float | None = None) -> float:
    """Make `stream_idle_s` the read timeout of the rest of a streamed response's body; the
    bound. The headers came under the request's own timeout; httpcore takes the read timeout
    from the request's `timeout` extension when the body starts to stream, so changing it
    there, before the first body read, bounds every read after."""
    bound = stream_idle_s(response, idle_timeout_s)
    timeouts = response.request.extensions.get("timeout")
    if isinstance(timeouts, dict):
        timeouts["read"] = bound
    return bound


def _decisions(events: Iterator[ServerSentEvent]) -> Iterator[Decision]:
    for event in events:
        if event.event == "end":  # the federation went away: the stream is over
            return
        if event.event == "decision":
            yield Decision.model_validate_json(event.data)


class AsyncClient:
    """Asynchronous client of a tetherfed coordinator (same calls as `Client`, awaited)."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        token: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.endpoints = Endpoints(coordinator_urls(base_url))
        self.incarnation: str | None = None  # as Client's
        self.last_decision: int | None = None
        self._http = httpx.AsyncClient(
            base_url=self.endpoints.url,
            headers=_headers(token),
            timeout=timeout,
            transport=transport,
            **({} if transport else http_options(self.endpoints.url)),
        )

    def authorize(self, token: str | None) -> None:
        """Send `token` as the bearer token from now on."""
        self._http.headers.pop("authorization", None)
        self._http.headers.update(_headers(token))

    def _headers(self, headers: httpx.Headers) -> None:
        self.incarnation, self.last_decision = _seen(headers, self.incarnation, self.last_decision)

    async def call(self, call: Call[T]) -> T:
        """Send one call, retrying idempotent ones per `self.retry`."""
        started, attempt = time.monotonic(), 0
        while True:
            try:
                return await self._once(call)
            except TetherError as error:
                if not call.idempotent or not self.retry.should_retry(error, attempt, started):
                    raise
                await asyncio.sleep(self.retry.delay(attempt))
                attempt += 1

    async def _once(self, call: Call[T]) -> T:
        for left in range(len(self.endpoints.urls) - 1, -1, -1):
            kwargs = _request_kwargs(call)
            if call.content is not None:
                kwargs["content"] = _achunks(_parts(call.content))  # async httpx: async iterable
            try:
                response = await self._http.request(call.method, call.path, **kwargs)
            except httpx.TransportError as exc:
                self._http.base_url = httpx.URL(self.endpoints.advance())
                if left and isinstance(exc, httpx.ConnectError):
                    continue  # nothing was sent: the next replica may take it
                raise TransportError(f"{call.method} {call.path}: {exc!r}") from exc
            self._headers(response.headers)
            return _read(call, response)
        raise AssertionError("unreachable")  # pragma: no cover

    async def healthz(self) -> dict[str, Any]:
        return await self.call(CALLS.healthz())

    async def readyz(self) -> dict[str, Any]:
        return await self.call(CALLS.readyz())

    async def create_federation(
        self, name: str, policy: Policy | str = "default"
    ) -> FederationPublic:
        return await self.call(CALLS.create_federation(name, policy))

    async def list_federations(self) -> FederationsPublic:
        return await self.call(CALLS.list_federations())

    async def get_federation(self, fed: str) -> FederationPublic:
        return await self.call(CALLS.get_federation(fed))

    async def update_policy(
        self, fed: str, patch: PolicyPatch | Mapping[str, Any]
    ) -> FederationPublic:
        return await self.call(CALLS.update_policy(fed, patch))

    async def delete_federation(self, fed: str) -> None:
        await self.call(CALLS.delete_federation(fed))

    async def register_worker(
        self,
        fed: str,
        name: str,
        layers: Sequence[LayerSpec],
        meta: Mapping[str, Any] | None = None,
    ) -> WorkerRegistered:
        return await self.call(CALLS.register_worker(fed, name, layers, meta))

    async def heartbeat(self, fed: str, wid: str, beat: Heartbeat) -> dict[str, Any]:
        return await self.call(CALLS.heartbeat(fed, wid, beat))

    async def post_telemetry(self, fed: str, wid: str, body: TelemetryCreate) -> None:
        """Send diagnostics points (the worker's own token)."""
        await self.call(CALLS.post_telemetry(fed, wid, body))

    async def telemetry(
        self,
        fed: str,
        wid: str,
        metric: str | None = None,
        layer: str | None = None,
        after: int | None = None,
    ) -> TelemetryMetrics | TelemetrySeries:
        """The series a worker has (no `metric`), or one series' points with step > `after`."""
        return cast(
            TelemetryMetrics | TelemetrySeries,
            await self.call(CALLS.telemetry(fed, wid, metric, layer, after)),
        )

    async def leave(self, fed: str, wid: str) -> None:
        await self.call(CALLS.leave(fed, wid))

    async def rejoin(self, fed: str, wid: str) -> WorkerPublic:
        return await self.call(CALLS.rejoin(fed, wid))

    async def list_workers(self, fed: str) -> WorkersPublic:
        return await self.call(CALLS.list_workers(fed))

    async def get_worker(self, fed: str, wid: str) -> WorkerPublic:
        return await self.call(CALLS.get_worker(fed, wid))

    async def publish(self, fed: str, wid: str, frame: Body) -> PublishAccepted:
        return await self.call(CALLS.publish(fed, wid, frame))

    async def publish_sketch(self, fed: str, wid: str, frame: Body) -> SketchAccepted:
        return await self.call(CALLS.publish_sketch(fed, wid, frame))

    async def tethers(self, fed: str, wid: str) -> TethersPublic:
        return await self.call(CALLS.tethers(fed, wid))

    async def tether(
        self, fed: str, wid: str, layer: str, version: int | None = None
    ) -> npt.NDArray[np.floating[Any]]:
        data = await self.call(CALLS.tether_bytes(fed, wid, layer, version))
        frame = decode_frame(data, require_meta=False)
        return frame.tensors[layer]

    async def decision_tethers(self, fed: str, wid: str, decision_ids: Sequence[int]) -> Frame:
        """As `Client.decision_tethers`."""
        data = await self.call(CALLS.decision_tethers_bytes(fed, wid, decision_ids))
        return decode_frame(data, require_meta=False)

    async def tether_stats(self, fed: str, wid: str, layer: str) -> TetherStats:
        return await self.call(CALLS.tether_stats(fed, wid, layer))

    async def generations(self, fed: str, wid: str, layer: str) -> GenerationsPublic:
        return await self.call(CALLS.generations(fed, wid, layer))

    async def compatibility(self, fed: str, layer: str | None = None) -> Any:
        return await self.call(CALLS.compatibility(fed, layer))

    async def decisions(self, fed: str, **query: Any) -> DecisionsPublic:
        return await self.call(CALLS.decisions(fed, **query))

    async def worker_decisions(
        self, fed: str, wid: str, after: int = 0, wait: float = 0.0
    ) -> DecisionsPublic:
        return await self.call(CALLS.worker_decisions(fed, wid, after, wait))

    async def ack(self, fed: str, decision_id: int, ack: AckCreate) -> AckPublic:
        return await self.call(CALLS.ack(fed, decision_id, ack))

    async def ack_many(self, fed: str, acks: Sequence[AckItem]) -> AcksPublic:
        """As `Client.ack_many`."""
        return await self.call(CALLS.ack_many(fed, acks))

    async def get_ack(self, fed: str, decision_id: int) -> AckPublic:
        """The worker's ack of a decision; NotFoundError until it is acked."""
        return await self.call(CALLS.get_ack(fed, decision_id))

    async def stream_decisions(
        self, fed: str, last_event_id: int | None = None, idle_timeout_s: float | None = None
    ) -> AsyncIterator[Decision]:
        """Follow the federation's decisions as Server-Sent Events (silent `idle_timeout_s`:
        httpx's ReadTimeout; None follows the coordinator's keep-alive period, as
        `Client.stream_decisions`)."""
        headers = {"last-event-id": str(last_event_id)} if last_event_id is not None else {}
        path = f"/v1/federations/{_p(fed)}/decisions/stream"
        timeout = _stream_timeout(idle_timeout_s)
        async with aconnect_sse(
            self._http, "GET", path, headers=headers, timeout=timeout
        ) as source:
            if source.response.status_code >= 400:
                await source.response.aread()
                _read(Call("GET", path), source.response)
            follow_keepalive(source.response, idle_timeout_s)
            async for event in source.aiter_sse():
                if event.event == "end":
                    return
                if event.event == "decision":
                    yield Decision.model_validate_json(event.data)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
