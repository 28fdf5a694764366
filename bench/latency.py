"""Publish → decision visible to the worker through its long-poll, vs a 4 KB HTTP round trip.

8 workers with 64×64 tethers (nearly identical, so every publish yields a merge) under an
every-publish pearson policy. For each sample one worker long-polls its decisions while it
publishes; the latency runs from the start of the PUT to the long-poll's answer. The reference is
a GET of a 4 KB raw tether from the same server. Target: p99 ≤ 5 ms (issue #17).
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from typing import Any

import numpy as np

from tether_protocol.frame import encode_frame
from tether_protocol.messages import LayerSpec, Policy, SnapshotMeta
from tetherfed import Client

from .common import CpuMeter, line
from .harness import coordinator
from .swarm import quantile, scrape

TARGET_P99_MS = 5.0
WORKERS = 8
POLICY = Policy(
    trigger="every_publish",
    cooldown_steps=0,
    max_merges_per_epoch=1_000_000,
    max_staleness_steps=None,
)


def percentile(samples: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation."""
    return float(np.quantile(np.asarray(samples), q))


class _Worker:
    def __init__(self, url: str, fed: str, name: str, layer: LayerSpec) -> None:
        self.api = Client(url)
        reg = self.api.register_worker(fed, name, [layer])
        self.api.authorize(reg.token)
        self.poller = Client(url, token=reg.token)
        self.fed, self.wid, self.step, self.cursor = fed, reg.worker_id, 0, 0
        self.rng = np.random.default_rng(abs(hash(name)) % 2**32)

    def frame(self, base: np.ndarray) -> bytes:
        self.step += 1
        tether = np.clip(base + 0.01 * self.rng.random(base.shape, dtype=np.float32), 0, 1)
        meta = SnapshotMeta(worker_id=self.wid, step=self.step, epoch=0, loss=1.0)
        return encode_frame({"fc": tether}, meta)

    def sample(self, base: np.ndarray) -> float:
        """Seconds from the start of a publish to the decision arriving on the long-poll."""
        frame, seen = self.frame(base), threading.Event()
        arrived: list[float] = []

        def poll() -> None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                page = self.poller.worker_decisions(self.fed, self.wid, after=self.cursor, wait=5.0)
                self.cursor = page.last_id
                # This publish's decision, not a late one of an earlier publish (which would
                # read as a negative latency, and leave this one for the next sample).
                if any(d.own_snapshot.step == self.step for d in page.data):
                    arrived.append(time.perf_counter())
                    break
            seen.set()

        thread = threading.Thread(target=poll)
        thread.start()
        time.sleep(0.002)  # let the long-poll reach the server first, as a waiting worker's would
        started = time.perf_counter()
        self.api.publish(self.fed, self.wid, frame)
        thread.join(timeout=15)
        if not arrived:
            raise RuntimeError(f"no decision for {self.wid} within 10 s")
        return arrived[0] - started

    def close(self) -> None:
        self.api.close()
        self.poller.close()


def _hops(m: dict[str, Any]) -> dict[str, float]:
    """Where a decision's time goes, p50 in ms from the coordinator's /metrics histograms
    (linear within buckets of 0.5, 1, 2.5, 5, 10 ms: coarse): the publish in the API, the
    scoring round, and a publish's commit to its round's commit."""
    return {
        "publish_handling": round(
            quantile(m, "tetherfed_publish_seconds", 0.5, kind="full") * 1e3, 2
        ),
        "scoring_round": round(quantile(m, "tetherfed_scoring_round_seconds", 0.5) * 1e3, 2),
        "commit_to_decision": round(
            quantile(m, "tetherfed_publish_to_decision_seconds", 0.5) * 1e3, 2
        ),
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Measure p50/p99 publish→decision latency and a 4 KB round trip, interleaved."""
    samples = 40 if quick else 400
    rng = np.random.default_rng(0)
    base = rng.random((64, 64), dtype=np.float32)
    with coordinator(TETHER_SCORING_BLOCK_MS="1000") as coord:
        admin = Client(coord.url)
        admin.create_federation("latency", policy=POLICY)
        admin.create_federation("reference", policy="default")
        workers = [
            _Worker(coord.url, "latency", f"w{i}", LayerSpec(name="fc", shape=[64, 64]))
            for i in range(WORKERS)
        ]
        for w in workers:  # everyone has a snapshot before we measure
            w.api.publish("latency", w.wid, w.frame(base))
        time.sleep(0.5)
        for w in workers:
            w.cursor = max(
                [d.id for d in w.poller.worker_decisions("latency", w.wid).data], default=0
            )
        ref = _Worker(coord.url, "reference", "ref", LayerSpec(name="fc", shape=[32, 32]))
        ref.api.publish(
            "reference",
            ref.wid,
            encode_frame({"fc": base[:32, :32]}, SnapshotMeta(worker_id=ref.wid, step=1, epoch=0)),
        )
        ours, reference = [], []
        meter = CpuMeter(coord.pid)
        before = scrape(coord.url)
        meter.start()
        for i in range(samples):
            ours.append(workers[i % WORKERS].sample(base))
            started = time.perf_counter()
            ref.api.tether("reference", ref.wid, "fc")
            reference.append(time.perf_counter() - started)
        cpu = meter.stop()
        time.sleep(0.2)  # the last round's metrics reach the scrape
        hops = _hops({"before": before, "after": scrape(coord.url)})
        for w in [*workers, ref]:
            w.close()
        admin.close()
    p50, p99 = percentile(ours, 0.5) * 1e3, percentile(ours, 0.99) * 1e3
    ref_p50 = statistics.median(reference) * 1e3
    return line(
        "latency",
        ours=p99,
        reference=ref_p50,
        unit="ms (p99 publish→decision; reference: p50 4 KB round trip; ratio: p50 ÷ that p50)",
        ratio=p50 / ref_p50,
        target=f"p99 <= {TARGET_P99_MS} ms",
        passed=p99 <= TARGET_P99_MS,
        params={
            "workers": WORKERS,
            "shape": [64, 64],
            "samples": samples,
            "p50_ms": round(p50, 3),
            "p99_ms": round(p99, 3),
            "reference_p99_ms": round(percentile(reference, 0.99) * 1e3, 3),
            "hops_p50_ms": hops,
            "cpu": cpu,
        },
    )


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv)))
