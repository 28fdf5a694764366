"""Root fixtures shared by every test suite: real Redis, a per-test key prefix, the coordinator
in-process and as a real subprocess."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from procs import restore_sigint
from redis_servers import ClusterServers, SentinelServers

from tetherfed_coordinator.app import create_app
from tetherfed_coordinator.embedded import EmbeddedRedis, free_port
from tetherfed_coordinator.keys import glob_escape
from tetherfed_coordinator.settings import Settings
from tetherfed_coordinator.topology import sync_client

restore_sigint()  # the tests Ctrl-C the processes they start, even when run in the background


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio (anyio's pytest plugin)."""
    return "asyncio"


# TETHERFED_TEST_REDIS=cluster runs every test that uses `redis_url` against a Redis Cluster
# started for the session (three primaries on loopback, see redis_servers.py).
TOPOLOGY_ENV = "TETHERFED_TEST_REDIS"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """$REDIS_URL when set; a three-primary Cluster with TETHERFED_TEST_REDIS=cluster; else an
    embedded redis-server for the session (servers stopped at the end)."""
    url = os.environ.get("REDIS_URL")
    topology = os.environ.get(TOPOLOGY_ENV, "")
    if topology not in ("", "cluster"):
        raise pytest.UsageError(f"{TOPOLOGY_ENV}={topology!r}: use 'cluster' or leave it unset")
    if url:
        yield url
    elif topology == "cluster":
        with ClusterServers() as cluster:
            yield cluster.url
    else:
        with EmbeddedRedis() as server:
            yield server.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[ClusterServers]:
    """A three-primary Redis Cluster on loopback for the session."""
    with ClusterServers() as cluster:
        yield cluster


@pytest.fixture
def redis_sentinel() -> Iterator[SentinelServers]:
    """One primary, one replica and three sentinels on loopback, for one test."""
    with SentinelServers() as servers:
        yield servers


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    """A unique key prefix for one test; its keys are deleted (SCAN + UNLINK) afterwards."""
    prefix = f"tftest:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = sync_client(redis_url)
    try:
        batch = list(client.scan_iter(match=glob_escape(prefix) + "*", count=1000))
        for i in range(0, len(batch), 500):
            client.unlink(*batch[i : i + 500])
    finally:
        client.close()


@pytest.fixture
def coordinator_settings(redis_url: str, key_prefix: str) -> Settings:
    """Settings for a coordinator on `redis_url` under `key_prefix`, with fast timings."""
    return Settings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        heartbeat_ttl_s=5.0,
        scoring_block_ms=50,
        reclaim_idle_ms=300,
        long_poll_max_s=5.0,
        sse_keepalive_s=0.3,
        consumer_name=f"test-{uuid.uuid4().hex[:6]}",
        scorer_processes=0,  # in-process: the scoring loop runs on a thread of this process
    )


@pytest.fixture
async def app_client(coordinator_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An `httpx.AsyncClient` over `httpx.ASGITransport` against the real app, lifespan run
    (Redis clients and the scoring loop live for the test). Use it from `@pytest.mark.anyio`
    tests. ASGITransport buffers whole responses, so stream SSE against `coordinator_process`.
    The app is reachable as `client.app` (its `state.store`, `state.scorer`, `state.metrics`)."""
    async for client in app_client_for(coordinator_settings):
        yield client


async def app_client_for(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """What `app_client` yields, for any settings (an async generator yielding once)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://coordinator") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@dataclass
class CoordinatorProcess:
    """A coordinator running as a subprocess."""

    url: str
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s (by PID)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _wait_ready(coordinator: CoordinatorProcess, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if coordinator.proc.poll() is not None:
            raise RuntimeError(f"coordinator exited with code {coordinator.proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{coordinator.url}/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    coordinator.stop()
    raise RuntimeError(f"coordinator at {coordinator.url} not ready in {timeout_s}s")


@pytest.fixture
def coordinator_process(
    redis_url: str, key_prefix: str
) -> Iterator[Callable[..., CoordinatorProcess]]:
    """Factory: `start(port=None, **env)` runs `python -m tetherfed_coordinator` on 127.0.0.1
    (a free port unless one is given, e.g. to restart on the same one) against `redis_url`
    with `key_prefix` (extra `TETHER_*` settings as keyword env, e.g. `TETHER_TOKEN="s"`), waits
    for /readyz and returns a `CoordinatorProcess` (url, pid, stop()); every process started is
    killed by PID at teardown."""
    started: list[CoordinatorProcess] = []

    def start(port: int | None = None, **env: str) -> CoordinatorProcess:
        port = port or free_port()
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
        environ |= {
            "TETHER_KEY_PREFIX": key_prefix,
            "TETHER_RECLAIM_IDLE_MS": "300",
            "TETHER_SCORING_BLOCK_MS": "50",
            "TETHER_SSE_KEEPALIVE_S": "0.3",
        }
        environ |= env
        cmd = [
            sys.executable,
            "-m",
            "tetherfed_coordinator",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--redis-url",
            redis_url,
        ]
        proc = subprocess.Popen(cmd, env=environ)
        coordinator = CoordinatorProcess(url=f"http://127.0.0.1:{port}", proc=proc)
        started.append(coordinator)
        _wait_ready(coordinator)
        return coordinator

    yield start
    for coordinator in started:
        coordinator.stop()
