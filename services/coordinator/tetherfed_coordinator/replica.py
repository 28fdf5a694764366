"""The coordinator as a Ray actor: one replica of `tetherfed up --engine ray`.

Here rather than in the `tetherfed` client package so that starting a replica imports neither
torch nor the worker code (an actor's imports are most of its start-up time). The driver side
is `tetherfed._ray.RayEngine`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import httpx

from .embedded import die_with_parent


def node_address(ray: Any) -> str:
    """The address Ray reaches this process's node at (the raylet's `--node-ip-address`),
    which other nodes reach a server on it at too."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return str(node["NodeManagerAddress"])
    return str(ray.util.get_node_ip_address())


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> str | None:
    """None once GET /readyz on 127.0.0.1:`port` answers 200; else why not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"the coordinator exited with code {proc.returncode}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2, trust_env=False).is_success:
                return None
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return f"not ready within {timeout_s:g}s"


class CoordinatorReplica:
    """One coordinator replica in a Ray actor: `python -m tetherfed_coordinator` on this node,
    bound to every interface on `port`, against `redis_url`; its output goes to `log`. The
    process gets SIGTERM when the actor dies (PR_SET_PDEATHSIG), so none outlives its actor.
    RuntimeError when it is not ready within `ready_timeout_s`."""

    def __init__(self, redis_url: str, port: int, log: str, ready_timeout_s: float) -> None:
        import ray  # noqa: PLC0415 (only inside a Ray actor)

        cmd = [
            sys.executable,
            "-m",
            "tetherfed_coordinator",
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            "--redis-url",
            redis_url,
        ]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,  # noqa: PLW1509 (prctl only, before exec)
            )
        self.url = f"http://{node_address(ray)}:{port}"
        problem = wait_ready(port, self.proc, ready_timeout_s)
        if problem is not None:
            self.proc.kill()
            raise RuntimeError(f"coordinator replica on {self.url}: {problem}; see {log}")

    def address(self) -> tuple[str, int]:
        """(URL other nodes reach this replica at, this actor's process id)."""
        return self.url, os.getpid()

    def wait(self) -> int:
        """Block until the coordinator process exits; its exit code."""
        return self.proc.wait()
