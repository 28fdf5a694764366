"""Benchmark plumbing that needs real processes: a coordinator subprocess on real Redis."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import httpx

from tetherfed_coordinator.embedded import free_port


@dataclass(frozen=True)
class Coordinator:
    url: str
    pid: int


@contextlib.contextmanager
def coordinator(**env: str) -> Iterator[Coordinator]:
    """A `python -m tetherfed_coordinator` process on 127.0.0.1 ($REDIS_URL or embedded Redis),
    under a fresh key prefix; stopped (by PID) on exit."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    environ |= {"TETHER_KEY_PREFIX": f"tfbench:{uuid.uuid4().hex[:8]}:"} | env
    cmd = [
        sys.executable,
        "-m",
        "tetherfed_coordinator",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if os.environ.get("REDIS_URL"):
        cmd += ["--redis-url", os.environ["REDIS_URL"]]
    # stderr to a file, not a pipe nobody drains (a full pipe would stall the coordinator);
    # TETHERFED_BENCH_LOG keeps it at that path.
    log = open(os.environ.get("TETHERFED_BENCH_LOG") or os.devnull, "w+b")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log)
        yield Coordinator(url=url, pid=proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _wait_ready(
    url: str, proc: subprocess.Popen[bytes], log: IO[bytes], timeout_s: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            err = log.read().decode(errors="replace")
            raise RuntimeError(f"coordinator exited with {proc.returncode}: {err[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"coordinator at {url} not ready within {timeout_s}s")
