"""Sustained load of many workers on sketches: W simulated workers × 4 layers publishing sketch
frames at R Hz each for D seconds, from G generator processes, against one coordinator with its
scoring processes.

Full run: 1,000 workers × 4 layers of 64 × 64 (every layer sketched, k = 256) × 10 Hz for 60 s
from 4 generator processes. Each worker registers and publishes its full tethers once (a partner
needs a full tether to be merged with), then only sketch frames; its tethers share a base, so a
round merges. Publishes are scored under an every-publish policy; a publish overtaken by a newer
one of the same worker before scoring is scored as the newer one (coalesced).

Everything is read from the coordinator's `/metrics` (`prometheus_client` histograms): every
publish scored = `tetherfed_publish_to_decision_seconds_count` equals the publishes accepted;
p50/p99 publish → decision from that histogram (from a publish's commit in Redis to the commit
of the round that scored it, interpolated within buckets as Prometheus's histogram_quantile
does); backlog from `tetherfed_scoring_backlog` sampled every 0.5 s. Passing: every publish
scored, the backlog flat (last quarter's maximum ≤ first quarter's + 2 × W / 10), p99 ≤ 50 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import sys
import time
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tether_protocol.frame import encode_frame
from tether_protocol.messages import LayerSpec, Policy, SketchPolicy, SnapshotMeta
from tether_protocol.sketch import LayerSketch, encode_sketch_frame, sketch_layer

from .common import CpuMeter, line
from .harness import coordinator

TARGET_P99_MS = 50.0
FED = "/v1/federations/load"
SHAPE = (64, 64)
LAYERS = [LayerSpec(name=f"layer{i}", shape=list(SHAPE)) for i in range(4)]
SKETCH = SketchPolicy(k=256, seed=1, min_values=SHAPE[0] * SHAPE[1], full_every=1_000_000)
POLICY = Policy(
    trigger="every_publish", cooldown_steps=0, max_merges_per_epoch=1_000_000,
    max_staleness_steps=None, retain_generations=0, sketch=SKETCH,
)  # fmt: skip


def _worker_tethers(base: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, Any]:
    return {
        k: 0.7 * v + np.float32(0.3) * rng.random(SHAPE, dtype=np.float32) for k, v in base.items()
    }


async def _setup(
    api: httpx.AsyncClient, name: str, base: dict[str, np.ndarray], gate: asyncio.Semaphore
) -> tuple[str, Any]:
    """Register and publish the full tethers once; the worker's id and layer sketches."""
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    tethers = _worker_tethers(base, rng)
    body = {"name": name, "layers": [spec.model_dump() for spec in LAYERS]}
    async with gate:  # a few at a time: setup is not what is measured
        reply = await api.post(f"{FED}/workers", json=body)
        wid = reply.raise_for_status().json()["worker_id"]
        frame = encode_frame(tethers, SnapshotMeta(worker_id=wid, step=0, epoch=0))
        (await api.put(f"{FED}/workers/{wid}/tethers", content=frame)).raise_for_status()
    return wid, {k: sketch_layer(v, SKETCH, k) for k, v in tethers.items()}


async def _worker(
    api: httpx.AsyncClient, wid: str, sketches: dict[str, LayerSketch], hz: float, start: float,
    until: float,
) -> int:  # fmt: skip
    """Publish sketch frames at `hz` from `start` until `until` (monotonic clock)."""
    step, period = 0, 1.0 / hz
    next_at = start + np.random.default_rng(abs(hash(wid)) % 2**32).random() * period
    while next_at < until:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        step += 1
        meta = SnapshotMeta(worker_id=wid, step=step, epoch=0, loss=1.0)
        frame = encode_sketch_frame(sketches, meta, SKETCH)
        with contextlib.suppress(httpx.HTTPError):  # counted: sent − accepted (from /metrics)
            (await api.put(f"{FED}/workers/{wid}/sketch", content=frame)).raise_for_status()
        next_at = max(next_at + period, time.monotonic())  # a late publish is not made up for
    return step


async def _generate(url: str, names: list[str], hz: float, seconds: float, sync: Any) -> int:
    ready, go, start_at, _ = sync
    base_rng = np.random.default_rng(0)
    base = {spec.name: base_rng.random(SHAPE, dtype=np.float32) for spec in LAYERS}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    transport = httpx.AsyncHTTPTransport(limits=limits)  # one pool of 64 per process
    # Plain httpx: a generator process that imported tetherfed would load torch for nothing.
    async with httpx.AsyncClient(base_url=url, timeout=60, transport=transport) as api:
        gate = asyncio.Semaphore(8)
        workers = await asyncio.gather(*(_setup(api, n, base, gate) for n in names))
        ready.put(len(workers))
        await asyncio.to_thread(go.wait)
        start = start_at.value - time.time() + time.monotonic()
        loops = (_worker(api, wid, sk, hz, start, start + seconds) for wid, sk in workers)
        return sum(await asyncio.gather(*loops))


def _generator(url: str, names: list[str], hz: float, seconds: float, sync: Any) -> None:
    """One generator process: its share of the workers as asyncio tasks."""
    sync[3].put(asyncio.run(_generate(url, names, hz, seconds, sync)))


def scrape(
    url: str, timeout_s: float = 60.0
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) → value from the coordinator's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=timeout_s).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def quantile(m: dict[str, Any], name: str, q: float, **where: str) -> float:
    """histogram_quantile(q) of the histogram's increase over the run (`after` − `before`),
    linear within buckets (seconds); `where`: label values to select."""

    def buckets(got: dict[Any, float]) -> dict[float, float]:
        return {
            float(dict(labels)["le"]): v
            for (n, labels), v in got.items()
            if n == f"{name}_bucket" and where.items() <= dict(labels).items()
        }

    before, after = buckets(m["before"]), buckets(m["after"])
    rows = sorted((le, n - before.get(le, 0.0)) for le, n in after.items())
    rank, prev_le, prev_n = q * rows[-1][1], 0.0, 0.0
    for le, n in rows:
        if n >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_n) / max(n - prev_n, 1e-12)
        prev_le, prev_n = le, n
    return float("nan")


def _backlog(url: str, until: float) -> list[int]:
    samples = []
    while time.time() < until + 3:
        try:  # an overloaded API may not answer in time: a gap in the samples
            got = scrape(url, timeout_s=5.0)
        except httpx.HTTPError:
            got = {}
        samples.append(int(got.get(("tetherfed_scoring_backlog", ()), -1)))
        time.sleep(0.5)
    return samples


def _drive(
    url: str, workers: int, hz: float, seconds: float, procs: int, meter: CpuMeter | None = None
) -> dict[str, Any]:
    with httpx.Client(base_url=url) as admin:
        body = {"name": "load", "policy": POLICY.model_dump()}
        admin.post("/v1/federations", json=body).raise_for_status()
    names = [f"sim{i}" for i in range(workers)]
    ctx = mp.get_context("spawn")
    sync = (ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0), ctx.Queue())
    gens = [
        ctx.Process(target=_generator, args=(url, names[i::procs], hz, seconds, sync))
        for i in range(procs)
    ]
    for g in gens:
        g.start()
    try:
        for _ in gens:  # every worker registered and holds a full snapshot
            sync[0].get(timeout=300)
        time.sleep(2.0)  # let their scoring finish
        before = scrape(url)
        sync[2].value = start = time.time() + 0.5
        sync[1].set()
        if meter is not None:
            meter.start()
        backlog = _backlog(url, start + seconds)
        cpu = meter.stop() if meter is not None else {}
        sent = sum(sync[3].get(timeout=120) for _ in gens)
    finally:
        for g in gens:
            g.join(timeout=30)
            if g.is_alive():
                g.kill()
    time.sleep(1.0)
    return {"before": before, "after": scrape(url), "backlog": backlog, "sent": sent, "cpu": cpu}


def _delta(m: dict[str, Any], name: str) -> float:
    key = (name, ())
    return m["after"].get(key, 0.0) - m["before"].get(key, 0.0)


def run(quick: bool = False) -> dict[str, Any]:
    """Run the load (quick: 20 workers, 1 generator process, 3 s) and judge it."""
    workers, hz, seconds, procs = (20, 10.0, 3.0, 1) if quick else (1000, 10.0, 60.0, 4)
    with coordinator(
        TETHER_SCORER_PROCESSES=os.environ.get("TETHER_SCORER_PROCESSES", "1")
    ) as coord:
        m = _drive(coord.url, workers, hz, seconds, procs, CpuMeter(coord.pid))
    name = "tetherfed_publish_to_decision_seconds"
    p50, p99 = quantile(m, name, 0.5) * 1e3, quantile(m, name, 0.99) * 1e3
    accepted = int(_delta(m, "tetherfed_publishes_total"))  # sketch publishes only, by then
    scored = int(_delta(m, f"{name}_count"))
    rounds = int(_delta(m, "tetherfed_scoring_rounds_total"))
    backlog = [b for b in m["backlog"] if b >= 0] or [0]
    quarter = max(1, len(backlog) // 4)
    stable = max(backlog[-quarter:]) <= max(backlog[:quarter]) + 2 * workers // 10
    every = scored == accepted
    return line(
        "load-1000", ours=p99, reference=None, unit="ms (p99 publish→decision, /metrics histogram)",
        ratio=None, target=f"every publish scored, backlog flat, p99 <= {TARGET_P99_MS} ms",
        passed=every and stable and p99 <= TARGET_P99_MS,
        params={
            "workers": workers, "layers": len(LAYERS), "shape": list(SHAPE), "sketch_k": SKETCH.k,
            "hz_per_worker": hz, "seconds": seconds, "generator_processes": procs,
            "scorer_processes": int(os.environ.get("TETHER_SCORER_PROCESSES", "1")),
            "offered_publishes_per_s": workers * hz,
            "achieved_sketch_publishes_per_s": round(m["sent"] / seconds, 1),
            "publishes_sent": m["sent"], "publishes_accepted": accepted, "publishes_scored": scored, "rounds_committed": rounds,
            "coalesced": accepted - rounds, "every_publish_scored": every,
            "p50_ms": round(p50, 2), "p99_ms": round(p99, 2),
            "scoring_round_p99_ms": round(quantile(m, "tetherfed_scoring_round_seconds", 0.99) * 1e3, 2),
            "sketch_publish_handling_p99_ms": round(
                quantile(m, "tetherfed_publish_seconds", 0.99, kind="sketch") * 1e3, 2),
            "backlog_first_quarter_max": max(backlog[:quarter]),
            "backlog_last_quarter_max": max(backlog[-quarter:]), "backlog_stable": stable,
            "cpu": m["cpu"],
        },
    )  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv)))
