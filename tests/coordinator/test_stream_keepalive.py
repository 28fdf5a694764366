"""The decision stream's idle bound follows the coordinator's keep-alive period
(`tether_protocol.stream`): the coordinator states its `sse_keepalive_s` in `X-Tether-Keepalive`
and keeps that period; a client that follows it survives a long period where a fixed bound
reconnects for nothing, and notices a dead coordinator (SIGSTOPped: the connection stays open
and says nothing) within 3 short periods rather than after the 60 s it would otherwise wait.
Real coordinator processes on the test Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from coord_helpers import EVERY_PUBLISH, LAYERS, frame, tensors

from tether_protocol.messages import Decision, LayerSpec
from tether_protocol.stream import KEEPALIVE_HEADER, idle_bound
from tetherfed.client import AsyncClient, Client, TransportError
from tetherfed.client._sdk import STREAM_IDLE_S, follow_keepalive

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
MERGE_ANYTHING = EVERY_PUBLISH | {"merge_threshold": -1.0, "drift_threshold": None}


def decide(client: Client, fed: str) -> None:
    """Make the federation issue decisions now: two workers publish, every publish is scored
    and any score merges."""
    specs = [LayerSpec(**spec) for spec in LAYERS]
    ids = [client.register_worker(fed, f"w{i}", specs).worker_id for i in range(2)]
    for i, wid in enumerate(ids):
        client.publish(fed, wid, frame(wid, step=1, data=tensors(i)))


class Follower:
    """`Client.stream_decisions` on a thread: what it yields (and the error that ended it)
    goes into `seen`, in order."""

    def __init__(self, url: str, fed: str, idle_timeout_s: float | None = None) -> None:
        self.seen: queue.Queue[Decision | BaseException] = queue.Queue()
        self._client = Client(url)
        self._thread = threading.Thread(
            target=self._follow, args=(fed, idle_timeout_s), daemon=True
        )
        self._thread.start()

    def _follow(self, fed: str, idle_timeout_s: float | None) -> None:
        try:
            for decision in self._client.stream_decisions(fed, idle_timeout_s=idle_timeout_s):
                self.seen.put(decision)
        except BaseException as error:
            self.seen.put(error)

    def next(self, timeout_s: float) -> Decision | BaseException:
        return self.seen.get(timeout=timeout_s)

    def close(self) -> None:
        self._client.close()
        self._thread.join(timeout=10)


@pytest.fixture
def follow() -> Iterator[Callable[..., Follower]]:
    started: list[Follower] = []

    def start(url: str, fed: str, idle_timeout_s: float | None = None) -> Follower:
        started.append(Follower(url, fed, idle_timeout_s))
        return started[-1]

    yield start
    for follower in started:
        follower.close()


def fed_name() -> str:
    return f"ka-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("keepalive", ["0.4", "7"])
def test_the_stream_states_its_keepalive_period_and_the_client_follows_it(
    coordinator_process: Callable[..., Any], keepalive: str
) -> None:
    coordinator = coordinator_process(TETHER_SSE_KEEPALIVE_S=keepalive)
    fed = fed_name()
    with Client(coordinator.url) as client:
        client.create_federation(fed)
    path = f"{coordinator.url}/v1/federations/{fed}/decisions/stream"
    with (
        httpx.Client(trust_env=False) as http,
        http.stream("GET", path, timeout=httpx.Timeout(30.0, connect=5.0)) as response,
    ):
        assert response.headers[KEEPALIVE_HEADER] == keepalive
        assert follow_keepalive(response) == idle_bound(float(keepalive))
        assert follow_keepalive(response, idle_timeout_s=9.0) == 9.0, "a chosen bound is kept"
        if keepalive == "0.4":  # the short period is kept: comments keep coming
            comments = 0
            for line in response.iter_lines():  # each read bounded by the 30 s timeout
                comments += line.startswith(":")
                if comments >= 4:
                    break
            assert comments >= 4


def test_a_long_keepalive_is_followed_where_a_fixed_shorter_bound_reconnects_for_nothing(
    coordinator_process: Callable[..., Any], follow: Callable[..., Follower]
) -> None:
    period = 3.0
    coordinator = coordinator_process(TETHER_SSE_KEEPALIVE_S=str(period))
    fed = fed_name()
    with Client(coordinator.url) as client:
        client.create_federation(fed, MERGE_ANYTHING)  # type: ignore[arg-type]
        following = follow(coordinator.url, fed)  # the default: follows the stated period
        fixed = follow(coordinator.url, fed, idle_timeout_s=1.0)  # a bound under the period
        # The fixed bound gives up on a healthy, idle stream: the spurious reconnect.
        assert isinstance(fixed.next(timeout_s=30), TransportError)
        # The follower stays through a silence longer than one period ...
        time.sleep(period + 1.0)
        assert following.seen.empty(), following.seen.queue
        decide(client, fed)
        # ... and gets the decisions on the same connection.
        first = following.next(timeout_s=30)
    assert isinstance(first, Decision), first


@pytest.mark.parametrize("sdk", ["sync", "async"])
def test_a_dead_coordinator_is_noticed_within_three_short_keepalive_periods(
    coordinator_process: Callable[..., Any], follow: Callable[..., Follower], sdk: str
) -> None:
    period = 0.5
    coordinator = coordinator_process(TETHER_SSE_KEEPALIVE_S=str(period))
    fed = fed_name()
    with Client(coordinator.url) as client:
        client.create_federation(fed, MERGE_ANYTHING)  # type: ignore[arg-type]
        if sdk == "sync":
            following = follow(coordinator.url, fed)
        else:
            following = AsyncFollower(coordinator.url, fed)
        decide(client, fed)
        assert isinstance(following.next(timeout_s=30), Decision), "the stream flows"
    # The process stops: its socket stays open and says nothing, as a hung server's would.
    os.kill(coordinator.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        while not isinstance(ended := following.next(timeout_s=STREAM_IDLE_S), BaseException):
            pass
        waited = time.monotonic() - stopped
    finally:
        os.kill(coordinator.pid, signal.SIGCONT)
        following.close()
    assert isinstance(ended, TransportError | httpx.ReadTimeout), repr(ended)
    assert waited < idle_bound(period) + 3.0, f"noticed after {waited:.1f} s"


class AsyncFollower:
    """`AsyncClient.stream_decisions` on an event loop of its own thread, as `Follower`."""

    def __init__(self, url: str, fed: str) -> None:
        self.seen: queue.Queue[Decision | BaseException] = queue.Queue()
        self._thread = threading.Thread(target=asyncio.run, args=(self._follow(url, fed),))
        self._thread.daemon = True
        self._thread.start()

    async def _follow(self, url: str, fed: str) -> None:
        try:
            async with AsyncClient(url) as client:
                async for decision in client.stream_decisions(fed):
                    self.seen.put(decision)
        except BaseException as error:
            self.seen.put(error)

    def next(self, timeout_s: float) -> Decision | BaseException:
        return self.seen.get(timeout=timeout_s)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._thread.join(timeout=10)


@pytest.mark.parametrize("bound", [0, -1.0, float("nan")])
def test_a_bound_that_is_not_a_positive_number_is_refused(bound: float) -> None:
    with Client("http://127.0.0.1:9") as client, pytest.raises(ValueError, match="idle_timeout_s"):
        next(client.stream_decisions("any", idle_timeout_s=bound))
