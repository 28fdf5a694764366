"""Pinned partner snapshots: Redis memory and dead-on-arrival decisions under merges.

Two workers publish large frames (many layers) often to a coordinator subprocess on a fresh
embedded Redis, under a policy that merges on every publish. Each worker long-polls its
decisions, fetches the partner's layer at the version the decision names (`?version=`), as a
worker applying it would, and acks it (`applied`, or `rejected` with the detail of a failed
fetch). Reported: Redis `used_memory` (INFO memory) against the bytes of the live frames (the
latest frame of each worker), its peak and its last sample, and how many decisions could not be
fetched (410: dead on arrival), with their details.

    .venv/bin/python -m bench.pins [--quick] [--seconds S] [--layers N] [--layer-mb M]
                                   [--every S] [--pin-s S]

Not a `tetherfed bench` row: it measures memory, not speed, and runs for a minute.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import redis

from tether_protocol.frame import encode_frame
from tether_protocol.messages import SnapshotMeta
from tetherfed_coordinator.embedded import EmbeddedRedis, free_port

F = "/v1/federations"
POLICY = {
    "measure": "pearson",
    "trigger": "every_publish",
    "cooldown_steps": 0,
    "merge_threshold": 0.5,
    "drift_threshold": -0.5,
    "pairing": "all",
}


@contextlib.contextmanager
def coordinator(redis_url: str, pin_s: float) -> Iterator[str]:
    """A coordinator subprocess on `redis_url`; its base URL. Stopped by PID on exit."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env |= {
        "TETHER_KEY_PREFIX": f"tfpins:{uuid.uuid4().hex[:8]}:",
        "TETHER_SNAPSHOT_PIN_S": str(pin_s),
    }
    cmd = [sys.executable, "-m", "tetherfed_coordinator", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--redis-url", redis_url]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("coordinator did not start")
            time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class Worker:
    """One publishing worker and its decision loop (two threads)."""

    def __init__(self, base: str, name: str, shapes: dict[str, tuple[int, int]]) -> None:
        self.http = httpx.Client(base_url=base, timeout=60)
        layers = [{"name": n, "shape": list(s), "dtype": "float32"} for n, s in shapes.items()]
        reg = self.http.post(f"{F}/pins/workers", json={"name": name, "layers": layers}).json()
        self.wid: str = reg["worker_id"]
        self.http.headers["Authorization"] = f"Bearer {reg['token']}"
        self.shapes = shapes
        self.fetched = 0
        self.dead: list[str] = []
        self.frame_bytes = 0

    def publisher(self, stop: threading.Event, every_s: float, base: dict[str, Any]) -> None:
        rng = np.random.default_rng(abs(hash(self.wid)) % 2**32)
        step = 0
        while not stop.is_set():
            step += 1
            data = {
                n: np.clip(base[n] + 0.01 * rng.random(s, dtype=np.float32), 0, 1)
                for n, s in self.shapes.items()
            }
            body = encode_frame(data, SnapshotMeta(worker_id=self.wid, step=step, epoch=0))
            self.frame_bytes = len(body)
            self.http.put(f"{F}/pins/workers/{self.wid}/tethers", content=body)
            stop.wait(every_s)

    def applier(self, stop: threading.Event) -> None:
        after = 0
        while not stop.is_set():
            page = self.http.get(
                f"{F}/pins/workers/{self.wid}/decisions", params={"after": after, "wait": 1}
            ).json()
            for d in page["data"]:
                after = max(after, d["id"])
                if d["action"] == "hold" or d["operator"] == "decouple":
                    continue
                ref = d["partner_snapshot"]
                r = self.http.get(
                    f"{F}/pins/workers/{d['partner_id']}/tethers/{d['layer']}",
                    params={"version": ref["version"]},
                )
                if r.status_code == 200:
                    self.fetched += 1
                    ack = {"outcome": "applied", "generation": 1}
                else:
                    self.dead.append(f"{r.status_code} {r.json()['detail']}")
                    ack = {"outcome": "rejected", "reason": r.json()["detail"]}
                self.http.post(f"{F}/pins/decisions/{d['id']}/ack", json=ack)


def measure(seconds: float, layers: int, layer_mb: float, every_s: float, pin_s: float) -> dict:
    """Run the scenario once; the row of figures."""
    side = int((layer_mb * 1e6 / 4) ** 0.5)
    shapes = {f"layer{i:02d}": (side, side) for i in range(layers)}
    rng = np.random.default_rng(0)
    base = {n: rng.random(s, dtype=np.float32) for n, s in shapes.items()}
    with EmbeddedRedis() as server, coordinator(server.url, pin_s) as url:
        r = redis.Redis.from_url(server.url)
        for _ in range(20):  # a coordinator just ready may still answer 5xx for a moment
            made = httpx.post(f"{url}{F}", json={"name": "pins", "policy": POLICY})
            if made.status_code < 500:
                break
            time.sleep(0.25)
        made.raise_for_status()
        workers = [Worker(url, name, shapes) for name in ("a", "b")]
        stop = threading.Event()
        threads = [
            threading.Thread(target=fn, args=args, daemon=True)
            for w in workers
            for fn, args in ((w.publisher, (stop, every_s, base)), (w.applier, (stop,)))
        ]
        for t in threads:
            t.start()
        samples: list[tuple[float, int, int]] = []
        started = time.monotonic()
        while (now := time.monotonic() - started) < seconds:
            used = int(r.info("memory")["used_memory"])
            samples.append((now, used, sum(w.frame_bytes for w in workers)))
            time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(timeout=70)
        r.close()
    live = max(s[2] for s in samples)
    warm = [s for s in samples if s[0] >= min(10.0, seconds / 3)]
    peak = max(s[1] for s in warm)
    dead = [d for w in workers for d in w.dead]
    reasons = collections.Counter(d[:160] for d in dead)
    return {
        "live_frames_mb": round(live / 1e6, 1),
        "used_memory_peak_mb": round(peak / 1e6, 1),
        "used_memory_last_mb": round(warm[-1][1] / 1e6, 1),
        "peak_over_live": round(peak / live, 2),
        "decisions_fetched": sum(w.fetched for w in workers),
        "decisions_dead_on_arrival": len(dead),
        "dead_reasons": dict(reasons.most_common(3)),
        "params": {
            "seconds": seconds,
            "layers": layers,
            "layer_mb": layer_mb,
            "publish_every_s": every_s,
            "snapshot_pin_s": pin_s,
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20 s, 8 layers of 1 MB")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--layer-mb", type=float, default=2.0)
    p.add_argument("--every", type=float, default=2.0, help="publish period of each worker, s")
    p.add_argument("--pin-s", type=float, default=60.0)
    a = p.parse_args(argv)
    if a.quick:
        a.seconds, a.layers, a.layer_mb, a.every = 20.0, 8, 1.0, 1.0
    row = measure(a.seconds, a.layers, a.layer_mb, a.every, a.pin_s)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
