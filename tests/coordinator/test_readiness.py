"""/readyz says whether decisions can be made (`liveness`): against real coordinator processes,
real scoring processes and real Redis servers started for the test."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from coord_helpers import frame, tensors
from test_metrics import publish_pair

from tetherfed_coordinator.embedded import EmbeddedRedis, free_port
from tetherfed_coordinator.metrics import DIR_PREFIX, MULTIPROC_ENV

F = "/v1/federations"


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not {what} in {timeout_s} s"
        time.sleep(0.3)


def ready(url: str) -> httpx.Response:
    return httpx.get(f"{url}/readyz", timeout=5)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def metrics_dir(pid: int) -> Path:
    dirs = list(Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}{pid}-*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def decisions(url: str) -> int:
    return len(httpx.get(f"{url}{F}/f/decisions").json()["data"])


def publish_again(url: str, step: int) -> None:
    for worker in httpx.get(f"{url}{F}/f/workers").json()["data"]:
        wid = worker["worker_id"]
        body = frame(wid, step=step, data=tensors(1))
        assert httpx.put(f"{url}{F}/f/workers/{wid}/tethers", content=body).status_code == 202


@pytest.mark.integration
def test_a_scorer_restarted_after_its_metrics_dir_went_away_scores_again(
    coordinator_process: Callable[..., object],
) -> None:
    coord = coordinator_process()
    url, pid = coord.url, coord.pid  # type: ignore[attr-defined]
    wait_for(lambda: ready(url).status_code == 200, 30, "ready")
    folder = metrics_dir(pid)
    shutil.rmtree(folder)  # a temp cleaner
    (scorer,) = children(pid)
    os.kill(scorer, signal.SIGKILL)
    wait_for(lambda: children(pid) not in ([], [scorer]), 30, "restarted")
    wait_for(folder.is_dir, 30, "the directory made again")
    wait_for(lambda: ready(url).status_code == 200, 30, "ready again")
    with httpx.Client() as http:
        publish_pair(http, url)
    wait_for(lambda: decisions(url) >= 2, 30, "deciding")
    assert "tetherfed_scoring_rounds_total" in httpx.get(f"{url}/metrics").text


@pytest.mark.integration
def test_readyz_is_503_while_no_scoring_process_can_start(
    coordinator_process: Callable[..., object],
) -> None:
    coord = coordinator_process()
    url, pid = coord.url, coord.pid  # type: ignore[attr-defined]
    wait_for(lambda: ready(url).status_code == 200, 30, "ready")
    folder = metrics_dir(pid)
    shutil.rmtree(folder)
    folder.write_text("not a directory")  # the scorer cannot make it again: it exits at start
    (scorer,) = children(pid)
    os.kill(scorer, signal.SIGKILL)
    wait_for(lambda: ready(url).status_code == 503, 30, "unready")
    detail = ready(url).json()["detail"]
    assert detail.startswith("cannot score: scoring process "), detail
    folder.unlink()
    wait_for(lambda: ready(url).status_code == 200, 60, "ready again")


@pytest.mark.integration
def test_a_preset_metrics_dir_that_is_missing_is_made(
    coordinator_process: Callable[..., object], tmp_path: Path
) -> None:
    preset = tmp_path / "gone" / "metrics"
    coord = coordinator_process(**{MULTIPROC_ENV: str(preset)})
    assert ready(coord.url).status_code == 200  # type: ignore[attr-defined]
    assert preset.is_dir()


@pytest.fixture
def own_redis() -> Iterator[tuple[str, redis.Redis]]:
    """A redis-server of this test's own (its settings are changed)."""
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        try:
            yield server.url, client
        finally:
            client.close()


def start(redis_url: str, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    environ |= {"TETHER_SCORING_BLOCK_MS": "50"} | env
    cmd = [sys.executable, "-m", "tetherfed_coordinator", "--port", str(port)]
    cmd += ["--redis-url", redis_url]
    proc = subprocess.Popen(cmd, env=environ, stderr=subprocess.PIPE)
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen[bytes]) -> bytes:
    """Stop it (by PID); what it wrote to stderr."""
    if proc.poll() is None:
        proc.terminate()
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err or b""


@pytest.mark.integration
def test_a_redis_that_may_evict_any_key_is_refused_unless_allowed(
    own_redis: tuple[str, redis.Redis],
) -> None:
    url, client = own_redis
    client.config_set("maxmemory-policy", "allkeys-lru")
    proc, _ = start(url)
    try:
        proc.wait(timeout=60)
    finally:
        err = stop(proc)
    assert proc.returncode != 0
    assert b"maxmemory-policy allkeys-lru" in err and b"TETHER_ALLOW_EVICTION=1" in err, err
    proc, base = start(url, TETHER_ALLOW_EVICTION="1", TETHER_SCORER_PROCESSES="0")
    try:
        wait_for(lambda: _ready_or_dead(base, proc), 30, "ready")
        assert proc.poll() is None
    finally:
        err = stop(proc)
    assert b"started anyway" in err, err


def _ready_or_dead(url: str, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        return True
    try:
        return ready(url).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.integration
@pytest.mark.parametrize("processes", ["0", "1"])
def test_readyz_is_503_while_every_scoring_round_fails(
    own_redis: tuple[str, redis.Redis], processes: str
) -> None:
    """What eviction did: the decision counter gone, the decision stream kept, so every
    round's XADD fails (its id is not above the stream's last). Nothing can be decided, and
    /readyz says so (a scoring thread dies of it; a scoring process dies and is started again,
    carrying on its predecessor's failures)."""
    url, client = own_redis
    proc, base = start(
        url,
        TETHER_SCORER_PROCESSES=processes,
        TETHER_KEY_PREFIX="tf:",
        TETHER_RECLAIM_IDLE_MS="300",
    )
    try:
        wait_for(lambda: _ready_or_dead(base, proc), 30, "ready")
        assert proc.poll() is None
        with httpx.Client() as http:
            publish_pair(http, base)
        wait_for(lambda: decisions(base) >= 2, 30, "deciding")
        assert ready(base).status_code == 200
        (counter,) = client.keys("tf:*decision_seq")
        client.delete(counter)
        # ... after a long run: the stream's last id far above what the counter starts again
        # from (each failed round still counts one up: the script's INCR is not undone).
        stream = counter.replace(b"decision_seq", b"decisions")
        assert client.type(stream) == b"stream"
        client.xadd(stream, {"d": "{}"}, id="1000000-0")
        steps = iter(range(50, 10_000, 10))

        def publishing_unready() -> bool:  # the workers go on publishing, as they did
            publish_again(base, next(steps))
            return ready(base).status_code == 503

        wait_for(publishing_unready, 60, "unready")
        detail = ready(base).json()["detail"]
        assert detail.startswith("cannot score: "), detail
    finally:
        stop(proc)
