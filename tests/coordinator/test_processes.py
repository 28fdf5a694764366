"""Real coordinator processes on real Redis: shared scoring, SSE resume, auth."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import httpx
import pytest
from coord_helpers import EVERY_PUBLISH, frame, tensors, worker_body
from procs import child_pids

F = "/v1/federations"


def _decisions(c: httpx.Client, n: int, timeout_s: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        data = c.get(f"{F}/f/decisions?limit=10000").json()["data"]
        backlog = "tetherfed_scoring_backlog 0" in c.get("/metrics").text
        if len(data) >= n and backlog:
            return data
        time.sleep(0.1)
    raise AssertionError(f"expected ≥ {n} decisions within {timeout_s}s")


def test_two_processes_share_scoring_without_duplicates(coordinator_process) -> None:
    one, two = coordinator_process(), coordinator_process()
    with httpx.Client(base_url=one.url) as c1, httpx.Client(base_url=two.url) as c2:
        c1.post(F, json={"name": "f", "policy": EVERY_PUBLISH}).raise_for_status()
        wids = [
            c1.post(f"{F}/f/workers", json=worker_body(f"w{i}")).json()["worker_id"]
            for i in range(4)
        ]
        base = tensors(0)
        for step in range(1, 6):
            for i, wid in enumerate(wids):
                client = (c1, c2)[(i + step) % 2]
                body = frame(wid, step, tensors(10 * step + i, base))
                client.put(f"{F}/f/workers/{wid}/tethers", content=body).raise_for_status()
        data = _decisions(c2, 1)
    ids = [d["id"] for d in data]
    assert ids == list(range(1, len(ids) + 1)), "decision ids must be unique and contiguous"
    rounds = Counter(
        (d["own_snapshot"]["worker_id"], d["own_snapshot"]["version"], d["layer"], d["action"])
        for d in data
    )
    assert max(rounds.values()) == 1, f"a round emitted a decision twice: {rounds.most_common(1)}"


def _scorers(pid: int, timeout_s: float = 60, other_than: tuple[int, ...] = ()) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = child_pids(pid, "tetherfed_coordinator.scorer")
        if pids and not set(pids) & set(other_than):
            return pids
        time.sleep(0.1)
    raise AssertionError(
        f"expected a scoring process (other than {other_than}) within {timeout_s}s"
    )


def test_a_killed_scoring_process_is_started_again_and_scores(coordinator_process) -> None:
    coordinator = coordinator_process(TETHER_SCORER_PROCESSES="1")
    killed = _scorers(coordinator.pid)
    os.kill(killed[0], signal.SIGKILL)
    _scorers(coordinator.pid, other_than=tuple(killed))
    with httpx.Client(base_url=coordinator.url) as c:
        c.post(F, json={"name": "f", "policy": EVERY_PUBLISH}).raise_for_status()
        wids = [
            c.post(f"{F}/f/workers", json=worker_body(f"w{i}")).json()["worker_id"]
            for i in range(2)
        ]
        base = tensors(0)
        for i, wid in enumerate(wids):
            c.put(f"{F}/f/workers/{wid}/tethers", content=frame(wid, 1, tensors(i, base)))
        assert _decisions(c, 1, timeout_s=60), "the restarted scoring process made no decision"


def test_sse_resumes_after_last_event_id(coordinator_process) -> None:
    coord = coordinator_process()
    with httpx.Client(base_url=coord.url, timeout=10) as c:
        c.post(F, json={"name": "f", "policy": EVERY_PUBLISH}).raise_for_status()
        a, b = (c.post(f"{F}/f/workers", json=worker_body(n)).json()["worker_id"] for n in "ab")
        base = tensors(0)
        c.put(f"{F}/f/workers/{a}/tethers", content=frame(a, 1, base)).raise_for_status()
        c.put(
            f"{F}/f/workers/{b}/tethers", content=frame(b, 1, tensors(1, base))
        ).raise_for_status()
        total = len(_decisions(c, 2))
        first = _read_events(c, {}, 1)
        assert first[0][0] == "1"
        rest = _read_events(c, {"Last-Event-ID": "1"}, total - 1)
    assert [int(i) for i, _ in rest] == list(range(2, total + 1))


def _read_events(c: httpx.Client, headers: dict[str, str], n: int) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = []
    current: dict[str, str] = {}
    keepalive = False
    with c.stream("GET", f"{F}/f/decisions/stream", headers=headers) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            keepalive |= line.startswith(": keep-alive")
            if line.startswith(("id: ", "data: ")):
                key, _, value = line.partition(": ")
                current[key] = value
            elif not line and "id" in current:
                events.append((current["id"], current["data"]))
                current = {}
                if len(events) >= n:
                    break
    return events


@pytest.mark.parametrize("token", ["s3cret"])
def test_auth(coordinator_process, token: str) -> None:
    coord = coordinator_process(TETHER_TOKEN=token)
    admin = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=coord.url) as c:
        assert c.post(F, json={"name": "f"}).status_code == 401
        assert (
            c.post(F, json={"name": "f"}, headers={"Authorization": "Bearer no"}).status_code == 401
        )
        assert (
            c.post(F, json={"name": "f", "policy": EVERY_PUBLISH}, headers=admin).status_code == 201
        )
        a = c.post(f"{F}/f/workers", json=worker_body("a"), headers=admin).json()
        b = c.post(f"{F}/f/workers", json=worker_body("b"), headers=admin).json()
        as_a = {"Authorization": f"Bearer {a['token']}"}
        as_b = {"Authorization": f"Bearer {b['token']}"}
        url = f"{F}/f/workers/{a['worker_id']}"
        assert (
            c.put(f"{url}/tethers", content=frame(a["worker_id"]), headers=as_b).status_code == 403
        )
        assert (
            c.put(f"{url}/tethers", content=frame(a["worker_id"]), headers=admin).status_code == 403
        )
        assert (
            c.put(f"{url}/tethers", content=frame(a["worker_id"]), headers=as_a).status_code == 202
        )
        assert c.post(f"{url}/heartbeat", json={"step": 1, "epoch": 0}).status_code == 401
        assert (
            c.post(f"{url}/heartbeat", json={"step": 1, "epoch": 0}, headers=as_a).status_code
            == 204
        )
        assert c.get(f"{url}/tethers", headers=as_b).status_code == 200, "peers may read tethers"
        assert c.get(f"{F}/f/workers").status_code == 401
        assert c.get(f"{url}/decisions", headers=admin).status_code == 200
        assert c.get(f"{url}/decisions", headers=as_b).status_code == 403
        assert c.get("/healthz").status_code == 200
