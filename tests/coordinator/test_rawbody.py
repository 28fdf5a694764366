"""The publish fast path (`rawbody.SegmentProtocol`) over raw sockets against a coordinator
process: it must keep HTTP/1.1 semantics — 100-continue, pipelining, keep-alive after an error
answered before or during the body — and a client that vanishes mid-body leaves no key."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from coord_helpers import keys_of

from tether_protocol.frame import encode_frame
from tether_protocol.messages import LayerSpec, SnapshotMeta
from tetherfed import AsyncClient, Client, RetryPolicy
from tetherfed_coordinator.api.tethers import router as tethers_router
from tetherfed_coordinator.ingest import streams_raw
from tetherfed_coordinator.keys import Keys
from tetherfed_coordinator.rawbody import SEGMENT
from tetherfed_coordinator.store import stored_frame
from tetherfed_coordinator.topology import sync_client

LAYERS = [LayerSpec(name="w", shape=[768, 1024])]  # 3 MiB: four segments


class Conn:
    """One HTTP/1.1 connection spoken by hand."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=20)
        self.pending = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.pending:
            got = self.sock.recv(1 << 16)
            if not got:
                raise ConnectionError(f"closed before {marker!r}; have {self.pending!r}")
            self.pending += got
        head, self.pending = self.pending.split(marker, 1)
        return head

    def response(self) -> tuple[int, bytes]:
        """Status and body of the next response (interim 1xx responses included)."""
        head = self._read_until(b"\r\n\r\n").decode()
        status = int(head.split()[1])
        length = next(
            (
                int(line.split(":")[1])
                for line in head.split("\r\n")
                if line.lower().startswith("content-length:")
            ),
            0,
        )
        while len(self.pending) < length:
            self.pending += self.sock.recv(1 << 16)
        body, self.pending = self.pending[:length], self.pending[length:]
        return status, body

    def close(self) -> None:
        self.sock.close()


def put_head(fed: str, wid: str, length: int, *extra: str) -> bytes:
    lines = [
        f"PUT /v1/federations/{fed}/workers/{wid}/tethers HTTP/1.1",
        "Host: t",
        "Content-Type: application/octet-stream",
        f"Content-Length: {length}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


PUBLISH_ROUTE = tethers_router.prefix  # the route the fast path must match
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.fixture
def coordinator(coordinator_process: Callable[..., object]) -> Iterator[tuple[str, str]]:
    """(url, worker id) of a coordinator process with federation `f` and one worker."""
    proc = coordinator_process()
    url: str = proc.url  # type: ignore[attr-defined]
    with Client(url, retry=RetryPolicy(tries=1)) as api:
        api.create_federation("f")
        yield url, api.register_worker("f", "w", LAYERS).worker_id


def body(wid: str, step: int, value: float = 1.0) -> bytes:
    # Tethers lie in [0, 1]: `value` is scaled into it (exactly, by a power of two).
    data = {"w": np.full(LAYERS[0].shape, value / 1024, dtype=np.float32)}
    return encode_frame(data, SnapshotMeta(worker_id=wid, step=step, epoch=0))


def stored(redis_url: str, prefix: str, wid: str) -> bytes | None:
    client = sync_client(redis_url)
    try:
        found = stored_frame(client, Keys(prefix), "f", wid)
        return found[0] if found else None
    finally:
        client.close()


def test_expect_100_continue_is_answered_before_the_body(
    coordinator: tuple[str, str], redis_url: str, key_prefix: str
) -> None:
    url, wid = coordinator
    frame = body(wid, 1)
    conn = Conn(url)
    try:
        conn.send(put_head("f", wid, len(frame), "Expect: 100-continue"))
        assert conn.response()[0] == 100, "no 100 Continue before the body was sent"
        conn.send(frame)
        status, reply = conn.response()
    finally:
        conn.close()
    assert status == 202, reply
    assert stored(redis_url, key_prefix, wid) == frame


def test_a_request_pipelined_behind_a_body_is_answered(coordinator: tuple[str, str]) -> None:
    url, wid = coordinator
    frame = body(wid, 1)
    conn = Conn(url)
    try:
        conn.send(
            put_head("f", wid, len(frame)) + frame + HEALTH
        )  # one write: body and next request
        first, second = conn.response(), conn.response()
    finally:
        conn.close()
    assert first[0] == 202, first
    assert second[0] == 200, second


def test_a_body_pipelined_behind_another_request_is_read(
    coordinator: tuple[str, str], redis_url: str, key_prefix: str
) -> None:
    url, wid = coordinator
    frame = body(wid, 1)
    conn = Conn(url)
    try:  # the publish's headers are parsed before the GET is answered
        conn.send(HEALTH + put_head("f", wid, len(frame)) + frame)
        first, second = conn.response(), conn.response()
    finally:
        conn.close()
    assert first[0] == 200, first
    assert second[0] == 202, f"the pipelined publish lost its body: {second}"
    assert stored(redis_url, key_prefix, wid) == frame


@pytest.mark.parametrize(
    ("case", "status"),
    [("unknown worker", 404), ("NaN in the last segment", 422), ("wrong worker in meta", 400)],
)
def test_an_error_leaves_the_connection_usable_and_nothing_stored(
    coordinator: tuple[str, str], redis_url: str, key_prefix: str, case: str, status: int
) -> None:
    url, wid = coordinator
    target, frame = wid, body(wid, 1)
    if case == "unknown worker":  # answered before the body is read: the rest is discarded
        target = "nobody"
    elif case == "NaN in the last segment":
        data = np.ones(LAYERS[0].shape, dtype=np.float32)
        data[-1, -1] = np.nan
        frame = encode_frame({"w": data}, SnapshotMeta(worker_id=wid, step=1, epoch=0))
    else:
        frame = body("someone-else", 1)
    good = body(wid, 2)
    conn = Conn(url)
    try:
        conn.send(put_head("f", target, len(frame)) + frame)
        failed = conn.response()
        conn.send(put_head("f", wid, len(good)) + good)
        after = conn.response()
    finally:
        conn.close()
    assert failed[0] == status, failed
    assert after[0] == 202, f"the connection was unusable after the {status}: {after}"
    assert stored(redis_url, key_prefix, wid) == good


def test_a_client_gone_mid_body_leaves_no_key(
    coordinator: tuple[str, str], redis_url: str, key_prefix: str
) -> None:
    url, wid = coordinator
    frame = body(wid, 1)
    before = keys_of(redis_url, key_prefix)
    conn = Conn(url)
    conn.send(put_head("f", wid, len(frame)) + frame[: 2 * SEGMENT + 100])  # two segments sent
    time.sleep(0.3)  # let the coordinator store them
    conn.close()

    deadline = time.monotonic() + 10
    left = None
    while time.monotonic() < deadline:
        left = keys_of(redis_url, key_prefix) - before
        if not left:
            break
        time.sleep(0.05)
    assert not left, f"an abandoned upload left keys: {left}"
    health = Conn(url)
    try:
        health.send(HEALTH)
        assert health.response()[0] == 200
    finally:
        health.close()


@pytest.mark.parametrize(
    ("method", "path", "raw"),
    [
        ("PUT", PUBLISH_ROUTE.format(fed="f", wid="w-1"), True),
        ("GET", PUBLISH_ROUTE.format(fed="f", wid="w-1"), False),
        ("PUT", PUBLISH_ROUTE.format(fed="f", wid="w-1") + "/w", False),
        ("PUT", PUBLISH_ROUTE.format(fed="", wid="w-1"), False),
        ("POST", "/v1/federations/f/workers", False),
    ],
)
def test_only_the_publish_route_streams_raw(method: str, path: str, raw: bool) -> None:
    assert streams_raw(method, path) is raw


def test_a_large_body_answered_early_closes_the_connection(coordinator: tuple[str, str]) -> None:
    url, _ = coordinator
    conn = Conn(url)
    try:  # 64 MiB declared, one segment sent: the 404 comes back and the rest is not waited for
        conn.send(put_head("f", "nobody", 64 << 20) + b"\0" * SEGMENT)
        status, _ = conn.response()
        closed = conn.sock.recv(1) == b""
    finally:
        conn.close()
    assert status == 404
    assert closed, "the connection stayed open for a 63 MiB body nobody will read"


def test_the_sdk_gets_the_413_of_an_oversized_publish(
    coordinator_process: Callable[..., object],
) -> None:
    proc = coordinator_process(TETHER_MAX_FRAME_BYTES=str(1 << 20))
    with Client(proc.url, retry=RetryPolicy(tries=1)) as api:  # type: ignore[attr-defined]
        api.create_federation("f")
        wid = api.register_worker("f", "w", LAYERS).worker_id
        with pytest.raises(Exception) as caught:  # 3 MiB frame, 1 MiB cap
            api.publish("f", wid, body(wid, 1))
    assert getattr(caught.value, "status", None) == 413, repr(caught.value)


def test_concurrent_publishes_each_store_their_own_frame(
    coordinator_process: Callable[..., object], redis_url: str, key_prefix: str
) -> None:
    proc = coordinator_process()
    url: str = proc.url  # type: ignore[attr-defined]
    with Client(url, retry=RetryPolicy(tries=1)) as api:
        api.create_federation("f")
        wids = [api.register_worker("f", f"w{i}", LAYERS).worker_id for i in range(6)]

    def publish_all(wid: str) -> bytes:
        with Client(url, retry=RetryPolicy(tries=1)) as own:
            for step in range(1, 4):
                last = body(wid, step, value=float(step))
                assert own.publish("f", wid, last).version == step
        return last

    with ThreadPoolExecutor(len(wids)) as pool:
        last = dict(zip(wids, pool.map(publish_all, wids), strict=True))
    for wid, frame in last.items():
        assert stored(redis_url, key_prefix, wid) == frame, f"{wid} holds another frame"


@pytest.mark.anyio
async def test_the_async_sdk_publishes_through_the_fast_path(
    coordinator: tuple[str, str], redis_url: str, key_prefix: str
) -> None:
    url, wid = coordinator
    frame = body(wid, 1, value=3.0)
    async with AsyncClient(url, retry=RetryPolicy(tries=1)) as api:
        accepted = await api.publish("f", wid, frame)
        layer = await api.tether("f", wid, "w")
    assert (accepted.version, accepted.bytes) == (1, len(frame))
    assert stored(redis_url, key_prefix, wid) == frame
    np.testing.assert_array_equal(layer, np.full(LAYERS[0].shape, 3.0 / 1024, np.float32))
