"""The embedded Redis with a data dir keeps decisions and acks across a coordinator restart, and
never outlives a coordinator that was killed."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from coord_helpers import EVERY_PUBLISH, frame, tensors, worker_body

from tetherfed_coordinator.embedded import free_port

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def coordinator(data_dir: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_") and k != "REDIS_URL"}
    cmd = [
        sys.executable,
        "-m",
        "tetherfed_coordinator",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
    ]
    proc = subprocess.Popen(cmd, env=env)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            time.sleep(0.05)
        else:
            raise RuntimeError("coordinator not ready")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=15)


def redis_children(pid: int) -> list[int]:
    """PIDs of processes whose parent is `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_decisions_and_acks_survive_a_restart(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/federations"
    with coordinator(tmp_path, port), httpx.Client(timeout=10) as http:
        assert http.post(url, json={"name": "f", "policy": EVERY_PUBLISH}).status_code == 201
        a = http.post(f"{url}/f/workers", json=worker_body("a")).json()
        b = http.post(f"{url}/f/workers", json=worker_body("b")).json()
        same = tensors(1)
        for reg in (a, b):
            http.put(
                f"{url}/f/workers/{reg['worker_id']}/tethers",
                content=frame(reg["worker_id"], data=same),
                headers={"authorization": f"Bearer {reg['token']}"},
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not http.get(f"{url}/f/decisions").json()["data"]:
            time.sleep(0.05)
        before = http.get(f"{url}/f/decisions").json()["data"]
        text = http.get(f"http://127.0.0.1:{port}/metrics").text
        rounds = re.search(r"^tetherfed_scoring_rounds_total (\d+)", text, re.M)
        assert rounds and int(rounds.group(1)) >= 1, "the scoring process's rounds are not counted"
        merge = next(d for d in before if d["action"] == "merge")
        owner = a if merge["worker_id"] == a["worker_id"] else b
        ack = http.post(
            f"{url}/f/decisions/{merge['id']}/ack",
            json={"outcome": "applied", "generation": 1},
            headers={"authorization": f"Bearer {owner['token']}"},
        )
        assert ack.status_code == 201, ack.text
    with coordinator(tmp_path, port), httpx.Client(timeout=10) as http:
        after = http.get(f"{url}/f/decisions").json()["data"]
        assert [d["id"] for d in after] == [d["id"] for d in before], "decisions were lost"
        assert http.get(f"{url}/f/decisions/{merge['id']}/ack").json()["outcome"] == "applied"


def test_a_killed_coordinator_takes_its_children_with_it(tmp_path: Path) -> None:
    with coordinator(tmp_path, free_port()) as proc:
        children = redis_children(proc.pid)
        assert len(children) >= 2, "expected the embedded redis-server and a scoring process"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(c) for c in children):
            time.sleep(0.05)
        assert not any(alive(c) for c in children), "a child outlived its coordinator"
