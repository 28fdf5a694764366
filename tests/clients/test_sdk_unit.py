"""SDK pieces that need no server: the error tree, retries, the exported surface."""

from __future__ import annotations

import json
import threading
import time
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import tetherfed
import tetherfed.client._sdk
from tetherfed import Client, RetryPolicy
from tetherfed.client._errors import (
    APIError,
    AuthError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    ServerError,
    TetherError,
    TransportError,
    error_for,
)

EXPECTED_EXPORTS = {
    "APIError",
    "AsyncClient",
    "AuthError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "Diagnostics",
    "Federation",
    "NotFoundError",
    "OperatorError",
    "RetryPolicy",
    "ServerError",
    "StepReport",
    "Task",
    "TetherError",
    "TetherMode",
    "TetherParametrization",
    "TransportError",
    "WorkerConfig",
    "WorkerInfo",
    "__version__",
    "apply_operator_",
    "build_model",
    "default_model",
    "get_tether",
    "layer_table",
    "load_task",
    "run_worker",
    "set_tether_",
    "tether",
    "tethered_layers",
    "update_importance",
    "ROOT_LAYER",
    "RefusedError",
    "load_plain_state_dict",
    "untether",
    "without_tethers",  # Hugging Face surgery on a tethered model
    "GateCheck",
    "Probe",  # the merge gate and probe batches
    "Coverage",
    "register_tetherable",
    "tether_coverage",
}


def test_public_surface_is_curated() -> None:
    assert set(tetherfed.__all__) == EXPECTED_EXPORTS
    for name in tetherfed.__all__:
        assert getattr(tetherfed, name) is not None
    # Public submodules (cli, diagnostics, report, experiment…) appear once some test imports them.
    private = {
        n
        for n in dir(tetherfed)
        if not n.startswith("_")
        and n not in tetherfed.__all__
        and not isinstance(getattr(tetherfed, n), types.ModuleType)
    }
    assert not private, f"public names missing from __all__: {private}"


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, BadRequestError),
        (413, BadRequestError),
        (422, BadRequestError),
        (401, AuthError),
        (403, AuthError),
        (404, NotFoundError),
        (409, ConflictError),
        (500, ServerError),
        (503, ServerError),
    ],
)
def test_status_codes_map_to_the_error_tree(status: int, kind: type[APIError]) -> None:
    error = error_for(status, "what went wrong", "GET", "/v1/x")
    assert isinstance(error, kind) and isinstance(error, TetherError)
    assert (error.status, error.detail) == (status, "what went wrong")
    assert "what went wrong" in str(error) and str(status) in str(error)


def test_backoff_is_full_jitter_and_bounded() -> None:
    policy = RetryPolicy(tries=5, base_s=0.1, cap_s=0.4)
    delays = [policy.delay(k) for k in range(8) for _ in range(50)]
    assert min(delays) >= 0.0 and max(delays) <= 0.4
    assert max(policy.delay(0) for _ in range(200)) <= 0.1
    started = time.monotonic()
    assert policy.should_retry(TransportError("down"), 0, started)
    assert not policy.should_retry(TransportError("down"), 4, started), "tries are bounded"
    assert not policy.should_retry(NotFoundError(404, "gone"), 0, started), "4xx is not retried"
    assert not RetryPolicy(deadline_s=0.0).should_retry(ServerError(503, "busy"), 0, started - 1)


def serve(ok_after: int) -> Iterator[tuple[str, dict[str, int]]]:
    """A real HTTP server on 127.0.0.1 that answers 503 to the first `ok_after` requests of each
    method, then 200 {"status": "ok"}; yields (url, hits per method)."""
    hits: dict[str, int] = {}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            hits[self.command] = hits.get(self.command, 0) + 1
            length = int(self.headers.get("content-length") or 0)
            self.rfile.read(length)
            ok = hits[self.command] > ok_after
            body = json.dumps({"status": "ok"} if ok else {"detail": "warming up"}).encode()
            self.send_response(200 if ok else 503)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def flaky_server() -> Iterator[tuple[str, dict[str, int]]]:
    """A real HTTP server that answers 503 to the first two requests of each method."""
    yield from serve(ok_after=2)


def test_idempotent_calls_are_retried_on_5xx_and_others_are_not(
    flaky_server: tuple[str, dict[str, int]],
) -> None:
    url, hits = flaky_server
    retry = RetryPolicy(tries=4, base_s=0.001, cap_s=0.002)
    with Client(url, retry=retry) as api:
        assert api.healthz() == {"status": "ok"}
        assert hits["GET"] == 3
        with pytest.raises(ServerError, match="warming up"):
            api.create_federation("f")  # POST creating state: sent once
        assert hits["POST"] == 1


def test_unreachable_coordinator_raises_transport_error() -> None:
    retry = RetryPolicy(tries=2, base_s=0.001, cap_s=0.001)
    with (
        Client("http://127.0.0.1:9", retry=retry, timeout=1.0) as api,
        pytest.raises(TransportError),
    ):
        api.healthz()


@pytest.fixture
def ok_server() -> Iterator[tuple[str, dict[str, int]]]:
    """A real HTTP server that answers 200 {"status": "ok"} to every GET and POST."""
    yield from serve(ok_after=0)


def test_several_urls_fail_over_to_a_replica_that_answers(
    ok_server: tuple[str, dict[str, int]],
) -> None:
    url, hits = ok_server
    dead = "http://127.0.0.1:9"  # discard: nothing listens, the connection is refused
    with Client(f"{dead}, {url}/", retry=RetryPolicy(tries=1)) as api:
        assert api.endpoints.urls == [dead, url], "comma-separated, trimmed, no trailing slash"
        assert api.healthz() == {"status": "ok"}
        assert api.endpoints.url == url, "stays on the replica that answered"
        # Refused connections sent nothing: even a non-idempotent call may go to the next one.
        api.endpoints.current = 0
        api._http.base_url = dead  # type: ignore[assignment]
        api.call(tetherfed.client._sdk.Call("POST", "/v1/federations", idempotent=False, json={}))
        assert hits == {"GET": 1, "POST": 1}
    with Client([dead, dead], retry=RetryPolicy(tries=1)) as api, pytest.raises(TransportError):
        api.healthz()
    with pytest.raises(ValueError, match="no coordinator URL"):
        Client(" , ")
