"""Ingest benchmark: an SDK publish through the real HTTP server vs redis-py SET of the same bytes.

Ours is `tetherfed.Client.publish` of the frame as `encode_parts` makes it, to a coordinator
subprocess, until the 202 (validated, stored, bookkeeping written); the reference is redis-py
`SET` of the same frame bytes to the same Redis. Reps are interleaved (alternating which goes
first, after one warm-up each) and medians compared; after timing, the stored snapshot is checked
to equal the frame. Also measures raw loopback TCP throughput, for context. Target: ours/ref ≥ 1.0.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable

import httpx
import numpy as np
import redis

from tether_protocol.frame import encode_parts, frame_size
from tether_protocol.messages import LayerSpec, SnapshotMeta
from tetherfed import Client, RetryPolicy
from tetherfed_coordinator.embedded import EmbeddedRedis, free_port
from tetherfed_coordinator.keys import Keys, glob_escape
from tetherfed_coordinator.store import stored_frame

from .common import interleaved

MB = 1e6


def loopback_mbps(payload: memoryview) -> float:
    """Raw TCP throughput over 127.0.0.1 for one payload, MB/s."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def drain() -> None:
        conn, _ = server.accept()
        with conn:
            buf = bytearray(1 << 20)
            while conn.recv_into(buf):
                pass

    thread = threading.Thread(target=drain)
    thread.start()
    with socket.create_connection(("127.0.0.1", port)) as client:
        start = time.perf_counter()
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        thread.join()
        elapsed = time.perf_counter() - start
    server.close()
    return payload.nbytes / MB / elapsed


def _process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_per_frame(
    publish: Callable[[], object], r: redis.Redis, coordinator_pid: int | None, reps: int = 3
) -> dict[str, float | None]:
    """CPU ms per frame of each process on the path: this client, the coordinator, Redis."""

    def redis_s() -> float:
        info = r.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    pid_s = (lambda: _process_cpu_s(coordinator_pid)) if coordinator_pid else (lambda: None)
    start = (time.process_time(), pid_s(), redis_s())
    for _ in range(reps):
        publish()
    end = (time.process_time(), pid_s(), redis_s())
    ms = [
        None if a is None or b is None else round((b - a) / reps * 1e3, 1)
        for a, b in zip(start, end, strict=True)
    ]
    return {"client_ms": ms[0], "coordinator_ms": ms[1], "redis_ms": ms[2]}


def _start(url: str, prefix: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env |= {"TETHER_KEY_PREFIX": prefix, "TETHER_SCORING_ENABLED": "false"}
    cmd = [
        sys.executable,
        "-m",
        "tetherfed_coordinator",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--redis-url",
        url,
    ]
    proc = subprocess.Popen(cmd, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return proc, base
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("coordinator did not start")


def _measure(url: str, size_mb: int, reps: int) -> dict[str, float]:
    prefix = f"tfbench:{uuid.uuid4().hex[:8]}:"
    proc, base = _start(url, prefix)
    r = redis.Redis.from_url(url)
    try:
        side = int((size_mb * MB / 4) ** 0.5)
        tether = np.random.default_rng(0).random((side, side), dtype=np.float32)
        with Client(base, timeout=120, retry=RetryPolicy(tries=1)) as api:
            api.create_federation("bench")
            layers = [LayerSpec(name="w", shape=[side, side])]
            wid_id = api.register_worker("bench", "b", layers).worker_id
            parts = encode_parts({"w": tether}, SnapshotMeta(worker_id=wid_id, step=0, epoch=0))
            size = frame_size(parts)
            reference = b"".join(parts)  # redis-py gets the frame as one bytes (its fastest input)
            ours_fn = lambda: api.publish("bench", wid_id, parts)  # noqa: E731
            ref_fn = lambda: r.set(f"{prefix}reference", reference)  # noqa: E731
            ours_t, ref_t = interleaved(ours_fn, ref_fn, repeats=reps)
            cpu = {
                "ours": _cpu_per_frame(ours_fn, r, proc.pid),
                "reference": _cpu_per_frame(ref_fn, r, None),
            }
            stored = stored_frame(r, Keys(prefix), "bench", wid_id)
            if stored is None or stored[0] != reference:
                raise RuntimeError("the stored snapshot differs from the published frame")
            tcp = statistics.median(loopback_mbps(memoryview(reference)) for _ in range(3))
        return {
            "ours": size / MB / ours_t.median,
            "reference": size / MB / ref_t.median,
            "ours_range": [size / MB / ours_t.high, size / MB / ours_t.low],
            "reference_range": [size / MB / ref_t.high, size / MB / ref_t.low],
            "tcp": tcp,
            "bytes": size,
            "cpu": cpu,
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        keys = list(r.scan_iter(match=glob_escape(prefix) + "*"))
        if keys:
            r.unlink(*keys)
        r.close()


def run(quick: bool = False) -> dict[str, object]:
    """Run the benchmark (64 MB frame, 15 reps; 8 MB and 5 reps when quick)."""
    size_mb, reps = (8, 5) if quick else (64, 15)
    url = os.environ.get("REDIS_URL")
    with contextlib.ExitStack() as stack:
        if url is None:
            url = stack.enter_context(EmbeddedRedis()).url
        m = _measure(url, size_mb, reps)
    ratio = m["ours"] / m["reference"]
    return {
        "name": "ingest",
        "ours": round(m["ours"], 1),
        "reference": round(m["reference"], 1),
        "unit": "MB/s",
        "ratio": round(ratio, 3),
        "target": 1.0,
        "passed": ratio >= 1.0,
        "params": {
            "frame_bytes": m["bytes"],
            "reps": reps,
            "loopback_tcp_mbps": round(m["tcp"], 1),
            "ours_min_max": [round(x, 1) for x in m["ours_range"]],
            "reference_min_max": [round(x, 1) for x in m["reference_range"]],
            "redis": "REDIS_URL" if os.environ.get("REDIS_URL") else "embedded",
            "cpu_ms_per_frame": m["cpu"],
            "cores": os.cpu_count(),
        },
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv)))
