"""Who sent a request is checked before its body is read, and every JSON body is bounded
(`guard`): against a real coordinator process over raw sockets, so what the server read is
observable (the answer comes while the client has sent only the headers)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import pytest

from tetherfed_coordinator.guard import TELEMETRY_JSON_BYTES

TOKEN = "s3cret"
BIG = 128 << 20  # declared, never sent
F = "/v1/federations"


def exchange(url: str, head: str, sent: bytes = b"") -> tuple[int, dict[str, object], bool]:
    """Send `head` and the first bytes of a body; the answer's status and JSON, and whether the
    server then closed the connection (it did not wait for the rest of the body)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n" + sent)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed before an answer: {data!r}"
            data += chunk
        header, _, rest = data.partition(b"\r\n\r\n")
        status = int(header.split()[1])
        length = next(
            int(line.split(b":", 1)[1])
            for line in header.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk
            rest += chunk
        body = json.loads(rest[:length])
        sock.settimeout(1.0)  # well inside uvicorn's keep-alive timeout (5 s)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
    return status, body, closed


def post_head(path: str, length: int, token: str | None = None, method: str = "POST") -> str:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: coordinator\r\nContent-Type: application/json\r\n"
        f"{auth}Content-Length: {length}\r\n"
    )


@pytest.fixture
def secured(coordinator_process: Callable[..., object]) -> tuple[str, str, str]:
    """A coordinator with a token, a federation `f` and a worker of it: url, worker id, its
    token."""
    coord = coordinator_process(TETHER_TOKEN=TOKEN, TETHER_SCORER_PROCESSES="0")
    url: str = coord.url  # type: ignore[attr-defined]
    admin = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.post(f"{url}{F}", json={"name": "f"}, headers=admin).status_code == 201
    body = {"name": "w", "layers": [{"name": "fc1", "shape": [2, 2]}]}
    reg = httpx.post(f"{url}{F}/f/workers", json=body, headers=admin).json()
    return url, reg["worker_id"], reg["token"]


def json_routes(wid: str) -> list[tuple[str, str]]:
    return [
        ("POST", F),
        ("POST", f"{F}/f/workers"),
        ("PATCH", f"{F}/f/policy"),
        ("POST", f"{F}/f/workers/{wid}/heartbeat"),
        ("POST", f"{F}/f/workers/{wid}/telemetry"),
        ("POST", f"{F}/f/decisions/1/ack"),
    ]


def test_an_unauthenticated_body_is_refused_before_it_is_read(
    secured: tuple[str, str, str],
) -> None:
    url, wid, _ = secured
    for method, path in json_routes(wid):
        for token in (None, "wrong"):
            # 128 MiB declared, 10 bytes of invalid JSON sent: the 401 comes without the rest,
            # says nothing of the JSON, and the connection closes instead of taking the body.
            status, body, closed = exchange(
                url, post_head(path, BIG, token, method), b'{"name": [['
            )
            assert status == 401, (method, path, body)
            assert body == {"detail": "missing or invalid bearer token"}
            assert closed, (method, path)
    # A small invalid body without a token: 401, not the parser's 422; the connection stays.
    status, body, closed = exchange(url, post_head(F, 5), b"{not ")
    assert (status, closed) == (401, False)


def test_an_authenticated_body_over_the_limit_is_a_413_naming_it(
    secured: tuple[str, str, str],
) -> None:
    url, wid, worker_token = secured
    limit = 8 << 20
    for method, path in json_routes(wid):
        token = worker_token if "/workers/" in path or "/ack" in path else TOKEN
        status, body, closed = exchange(url, post_head(path, BIG, token, method), b"{")
        want = TELEMETRY_JSON_BYTES if path.endswith("/telemetry") else limit
        assert status == 413, (method, path, body)
        assert body == {
            "detail": f"request body exceeds the maximum of {want} bytes for this route"
        }
        assert closed
    # Chunked, so no Content-Length to go by: refused once the bytes read pass the limit.
    admin = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    def chunks() -> object:
        yield b'{"name": "x", "pad": "'
        for _ in range(12):
            yield b"a" * (1 << 20)
        yield b'"}'

    r = httpx.post(f"{url}{F}", content=chunks(), headers=admin)  # type: ignore[arg-type]
    assert r.status_code == 413, r.text
    assert str(limit) in r.json()["detail"]
    # Under the limit, a body is read as before.
    r = httpx.post(f"{url}{F}", json={"name": "g", "policy": "seed"}, headers=admin)
    assert r.status_code == 201, r.text
