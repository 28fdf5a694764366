"""One federation round: N workers publish at once, all pairs are scored, every worker receives
its decisions and fetches its partners' tethers (what applying a merge costs).

N = 8 workers, each with P = 4,194,304 float32 tether values in 4 layers (1024 × 1024), near-
identical so every worker merges on every layer. Each worker is a thread with its own SDK client
and its own long-poll client. A round runs from the first byte a worker sends to the last worker
holding its partners' tethers for every decision of its new snapshot; median of 10 rounds (after
one warm-up round). Target ≤ 0.5 s.

The peer, Flower, runs in the same run after ours when it is installed (`make bench-peers`; see
bench/flower_peer): a FedAvg round of the same N and P on Flower's deployment runtime over
loopback, timed from FedAvg having built the round's train messages to FedAvg having aggregated
all N replies; median of 5 rounds after one warm-up. `params.peer` carries its time and the ratio
ours ÷ Flower's; without Flower it says the peer was not measured.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from typing import Any

import numpy as np
import psutil

from tether_protocol.frame import encode_parts
from tether_protocol.messages import LayerSpec, Policy, SnapshotMeta
from tetherfed import Client, RetryPolicy

from . import flower_peer
from .common import CpuMeter, line
from .harness import coordinator

TARGET_S = 0.5
POLICY = Policy(
    trigger="every_publish",
    cooldown_steps=0,
    max_merges_per_epoch=1_000_000,
    max_staleness_steps=None,
    retain_generations=0,
)


class _Worker:
    def __init__(self, url: str, name: str, layers: list[LayerSpec]) -> None:
        self.api = Client(url, timeout=120, retry=RetryPolicy(tries=1))
        reg = self.api.register_worker("round", name, layers)
        self.api.authorize(reg.token)
        self.poller = Client(url, token=reg.token, timeout=120, retry=RetryPolicy(tries=1))
        self.wid, self.layers, self.step, self.cursor = reg.worker_id, layers, 0, 0
        self.started = self.finished = 0.0
        self.fetched = 0

    def parts(self, base: dict[str, np.ndarray], rng: np.random.Generator) -> list[memoryview]:
        self.step += 1
        tensors = {
            k: np.float32(0.99) * v + np.float32(0.01) * rng.random(v.shape, dtype=np.float32)
            for k, v in base.items()
        }
        return encode_parts(tensors, SnapshotMeta(worker_id=self.wid, step=self.step, epoch=0))

    def run(self, parts: list[memoryview], barrier: threading.Barrier, warmup: bool) -> None:
        barrier.wait()
        self.started = time.perf_counter()
        version = self.api.publish("round", self.wid, parts).version
        # The first publishes may be scored before any partner has a snapshot: no decisions.
        decisions = [] if warmup else self._decisions(version)
        for d in decisions:  # apply = fetch the partner's tether of that layer
            assert d.partner_id is not None
            self.fetched += self.api.tether("round", d.partner_id, d.layer).nbytes
        self.finished = time.perf_counter()

    def _decisions(self, version: int) -> list[Any]:
        """This snapshot's merge/drift decisions, one per layer, from the long-poll."""
        mine: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while len(mine) < len(self.layers):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.wid}: decisions for {sorted(mine)} only")
            page = self.poller.worker_decisions("round", self.wid, after=self.cursor, wait=10.0)
            for d in page.data:
                if d.own_snapshot.version == version:
                    mine[d.layer] = d
            self.cursor = page.last_id
        return list(mine.values())

    def close(self) -> None:
        self.api.close()
        self.poller.close()


def _round(workers: list[_Worker], frames: list[list[memoryview]], warmup: bool) -> float:
    barrier = threading.Barrier(len(workers))
    threads = [
        threading.Thread(target=w.run, args=(f, barrier, warmup))
        for w, f in zip(workers, frames, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if any(t.is_alive() for t in threads) or any(w.finished <= w.started for w in workers):
        raise RuntimeError("a worker did not finish its round")
    return max(w.finished for w in workers) - min(w.started for w in workers)


def _ours(n: int, side: int, rounds: int) -> tuple[list[float], dict[str, Any], float]:
    """Our rounds' seconds, the CPU they used and the bytes fetched per round."""
    layers = [LayerSpec(name=f"layer{i}", shape=[side, side]) for i in range(4)]
    rng = np.random.default_rng(0)
    base = {spec.name: rng.random((side, side), dtype=np.float32) for spec in layers}
    with coordinator() as coord:
        with Client(coord.url) as admin:
            admin.create_federation("round", policy=POLICY)
        workers = [_Worker(coord.url, f"w{i}", layers) for i in range(n)]
        try:
            times = []
            meter = CpuMeter(coord.pid)
            for r in range(rounds + 1):
                if r == 1:
                    meter.start()  # round 0 gives everyone a snapshot (publishes only)
                frames = [w.parts(base, rng) for w in workers]
                elapsed = _round(workers, frames, warmup=r == 0)
                if r:
                    times.append(elapsed)
            cpu = meter.stop()
            fetched = sum(w.fetched for w in workers) / rounds
        finally:
            for w in workers:
                w.close()
    return times, cpu, fetched


def _flower(n: int, side: int, rounds: int, ours: float) -> dict[str, Any]:
    """Flower's FedAvg round of the same N and P, run now (params.peer), or why it was not."""
    if not flower_peer.available():
        return {"name": "flower", "measured": False, "how": "make bench-peers"}
    load_before, busy_before, began = os.getloadavg()[0], _busy_s(), time.perf_counter()
    try:
        result = flower_peer.run(n, side, rounds)
    except flower_peer.FlowerError as error:  # our figure stands; the peer's failure is shown
        print(f"round: the Flower peer failed: {error}", file=sys.stderr)
        return {"name": "flower", "measured": False, "error": str(error)[:500]}
    busy = (_busy_s() - busy_before) / (time.perf_counter() - began)
    times = result["round_s"]
    median = statistics.median(times)
    return {
        "name": "flower",
        "measured": True,
        "version": result["flwr"],
        "round_s": round(median, 4),
        "ratio": round(ours / median, 4),  # ours ÷ Flower's: below 1, ours is faster
        "timed": "FedAvg's train messages built → all N replies aggregated (median)",
        "rounds": len(times),
        "min_s": round(min(times), 4),
        "max_s": round(max(times), 4),
        "warmup_s": [round(t, 4) for t in result["warmup_s"]],
        "runtime": "deployment: 1 SuperLink + N SuperNodes, insecure loopback, stock settings",
        "load_average_1m": [round(load_before, 1), round(os.getloadavg()[0], 1)],  # before, after
        "machine_busy_cores": round(busy, 2),  # over the whole Flower run, start-up included
    }


def _busy_s() -> float:
    """CPU seconds the whole machine has been busy (every process, every core)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - t.iowait)


def run(quick: bool = False) -> dict[str, Any]:
    """N workers × P values, median of `rounds` rounds (quick: 4 × 65,536 values, 2 rounds),
    then Flower's FedAvg round of the same N and P where it is installed (5 rounds; quick 2)."""
    n, side, rounds = (4, 128, 2) if quick else (8, 1024, 10)
    times, cpu, fetched = _ours(n, side, rounds)
    median = statistics.median(times)
    peer = _flower(n, side, 2 if quick else 5, median)
    values = 4 * side * side
    return line(
        "round",
        ours=median,
        reference=peer.get("round_s"),
        unit="s (first byte → last worker holds partners' tethers)",
        ratio=peer.get("ratio"),
        target=f"<= {TARGET_S} s",
        passed=median <= TARGET_S,
        params={
            "workers": n,
            "values_per_worker": values,
            "layers": 4,
            "rounds": rounds,
            "min_s": round(min(times), 4),
            "max_s": round(max(times), 4),
            "published_mb_per_round": round(n * values * 4 / 1e6, 1),
            "fetched_mb_per_round": round(fetched / 1e6, 1),
            "cpu": cpu,
            "peer": peer,
        },
    )


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv)))
