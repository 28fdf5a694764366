"""Sustained load from simulated workers, shared by the `load` and `load-1000` rows.

W simulated workers, each with L layers of one shape, publish at R Hz each for D seconds from G
generator processes (`bench.loadgen`, raw keep-alive HTTP on uvloop, so the generators cost a
small share of what the coordinator does), against one coordinator with its scoring processes.
Each worker registers and publishes its full tethers once; then it publishes either full frames
(`sketch` None) or sketch frames on every tick. Its tethers share a base with everyone's, so a
round merges. Publishes are scored under an every-publish policy; a publish overtaken by a newer
one of the same worker before scoring is scored as the newer one (coalesced). A late publish is
not made up for: what the generators reach is the achieved rate.

Everything is read from the coordinator's `/metrics` (`prometheus_client` histograms), as a user
would in Prometheus: every publish scored = `tetherfed_publish_to_decision_seconds_count` equals
the publishes accepted; p50/p99 publish → decision from that histogram (from a publish's commit
in Redis to the commit of the round that scored it, interpolated within buckets as Prometheus's
histogram_quantile does; the publish's own handling is `tetherfed_publish_seconds`, reported
beside it); backlog from `tetherfed_scoring_backlog` sampled every 0.5 s. The counts are read
once the queue has drained after the load (a publish scored late is counted, with its latency).
Passing: every publish scored, the backlog flat (last quarter's maximum ≤ first quarter's
+ 2 × W / 10), p99 ≤ 50 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import queue
import time
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from tether_protocol.frame import encode_frame
from tether_protocol.messages import LayerSpec, Policy, SketchPolicy, SnapshotMeta
from tether_protocol.sketch import encode_sketch_frame, sketch_layer

from .common import CpuMeter, line
from .harness import coordinator
from .loadgen import Connection, HttpError, Lanes

TARGET_P99_MS = 50.0
CONNECTIONS_PER_GENERATOR = 32  # keep-alive connections each generator process holds


@dataclass(frozen=True)
class Swarm:
    """One load configuration; `sketch` None publishes full frames every tick."""

    row: str
    workers: int
    hz: float
    seconds: float
    generators: int
    shape: tuple[int, int] = (64, 64)
    layers: int = 4
    sketch: SketchPolicy | None = None

    @property
    def layer_specs(self) -> list[LayerSpec]:
        return [LayerSpec(name=f"layer{i}", shape=list(self.shape)) for i in range(self.layers)]

    @property
    def policy(self) -> Policy:
        return Policy(
            trigger="every_publish",
            cooldown_steps=0,
            max_merges_per_epoch=1_000_000,
            max_staleness_steps=None,
            retain_generations=0,
            sketch=self.sketch,
        )

    @property
    def fed(self) -> str:
        return f"/v1/federations/{self.row}"


async def _setup(
    swarm: Swarm, lane: Connection, name: str, base: dict[str, Any]
) -> tuple[str, Any]:
    """Register and publish the full tethers once; the worker's id and what it publishes."""
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    tethers = {
        k: 0.7 * v + np.float32(0.3) * rng.random(swarm.shape, dtype=np.float32)
        for k, v in base.items()
    }
    layers = [spec.model_dump() for spec in swarm.layer_specs]
    body = json.dumps({"name": name, "layers": layers}).encode()
    status, reply = await lane.request("POST", f"{swarm.fed}/workers", body, "application/json")
    if status != 201:
        raise RuntimeError(f"registering {name}: HTTP {status} {reply[:200]!r}")
    wid = json.loads(reply)["worker_id"]
    frame = encode_frame(tethers, SnapshotMeta(worker_id=wid, step=0, epoch=0))
    status, reply = await lane.request("PUT", f"{swarm.fed}/workers/{wid}/tethers", frame)
    if status != 202:
        raise RuntimeError(f"first publish of {name}: HTTP {status} {reply[:200]!r}")
    if swarm.sketch is None:
        return wid, tethers
    return wid, {k: sketch_layer(v, swarm.sketch, k) for k, v in tethers.items()}


async def _worker(
    swarm: Swarm, lane: Connection, wid: str, tensors: dict[str, Any], start: float
) -> int:
    """Publish at `swarm.hz` for `swarm.seconds` from `start` (monotonic clock)."""
    step, period, until = 0, 1.0 / swarm.hz, start + swarm.seconds
    next_at = start + np.random.default_rng(abs(hash(wid)) % 2**32).random() * period
    kind = "tethers" if swarm.sketch is None else "sketch"
    path = f"{swarm.fed}/workers/{wid}/{kind}"
    while next_at < until:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        step += 1
        meta = SnapshotMeta(worker_id=wid, step=step, epoch=0, loss=1.0)
        if swarm.sketch is None:
            frame = encode_frame(tensors, meta)
        else:
            frame = encode_sketch_frame(tensors, meta, swarm.sketch)
        with contextlib.suppress(HttpError):  # counted: sent − accepted (from /metrics)
            await lane.request("PUT", path, frame)
        next_at = max(next_at + period, time.monotonic())  # a late publish is not made up for
    return step


async def _generate(swarm: Swarm, url: str, names: list[str], sync: Any) -> int:
    ready, go, start_at, _ = sync
    base_rng = np.random.default_rng(0)
    base = {s.name: base_rng.random(swarm.shape, dtype=np.float32) for s in swarm.layer_specs}
    lanes = Lanes(url, CONNECTIONS_PER_GENERATOR)
    try:
        workers = await asyncio.gather(
            *(_setup(swarm, lanes[i], n, base) for i, n in enumerate(names))
        )
        ready.put(len(workers))
        await asyncio.to_thread(go.wait)
        start = start_at.value - time.time() + time.monotonic()
        loops = (_worker(swarm, lanes[i], w, t, start) for i, (w, t) in enumerate(workers))
        return sum(await asyncio.gather(*loops))
    finally:
        await lanes.close()


def _generator(swarm: Swarm, url: str, names: list[str], sync: Any) -> None:
    """One generator process: its share of the workers as asyncio tasks on uvloop."""
    sync[3].put(uvloop.run(_generate(swarm, url, names, sync)))


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


def _backlog(
    url: str, start: float, until: float, meter: CpuMeter | None
) -> tuple[list[int], dict[str, Any]]:
    """Backlog samples every 0.5 s from `start` to 3 s past `until` (wall clock), and the CPU
    `meter` read over exactly the load's window."""
    samples: list[int] = []
    cpu: dict[str, Any] = {}
    time.sleep(max(0.0, start - time.time()))
    if meter is not None:
        meter.start()
    while time.time() < until + 3:
        if meter is not None and not cpu and time.time() >= until:
            cpu = meter.stop()
        try:  # an overloaded API may not answer in time: a gap in the samples
            got = scrape(url, timeout_s=5.0)
        except httpx.HTTPError:
            got = {}
        samples.append(int(got.get(("tetherfed_scoring_backlog", ()), -1)))
        time.sleep(min(0.5, max(until - time.time(), 0.0)) or 0.5)  # wake at `until` too
    return samples, cpu or (meter.stop() if meter is not None else {})


def _settle(url: str, timeout_s: float = 120.0) -> None:
    """Wait until every publish so far is scored (backlog and pending both 0): before the
    measured window, so that its counts hold only the load's own publishes; after it, so that
    a publish still queued when the load stops counts, with its latency, rather than missing."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = scrape(url)
        if (
            got.get(("tetherfed_scoring_backlog", ()), 1) == 0
            and got.get(("tetherfed_scoring_pending", ()), 1) == 0
        ):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the setup publishes were not all scored within {timeout_s} s")


def _wait_ready(gens: list[Any], ready: Any, timeout_s: float) -> None:
    """Wait for every generator's ready report; raises at once when one of them died."""
    deadline, reported = time.monotonic() + timeout_s, 0
    while reported < len(gens):
        with contextlib.suppress(queue.Empty):
            ready.get(timeout=0.5)
            reported += 1
            continue
        dead = [g.exitcode for g in gens if g.exitcode not in (None, 0)]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"load generators not ready (exit codes {dead or 'none yet'})")


def drive(swarm: Swarm, url: str, meter: CpuMeter | None = None) -> dict[str, Any]:
    """Run `swarm` against the coordinator at `url`: /metrics before and after, the backlog
    samples, publishes sent and the CPU each process group used over the measured window."""
    with httpx.Client(base_url=url) as admin:
        body = {"name": swarm.row, "policy": swarm.policy.model_dump()}
        admin.post("/v1/federations", json=body).raise_for_status()
    names = [f"sim{i}" for i in range(swarm.workers)]
    ctx = mp.get_context("spawn")
    sync = (ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0), ctx.Queue())
    n = swarm.generators
    gens = [ctx.Process(target=_generator, args=(swarm, url, names[i::n], sync)) for i in range(n)]
    for g in gens:
        g.start()
    try:
        _wait_ready(gens, sync[0], timeout_s=300)  # every worker registered, with a snapshot
        _settle(url)
        before = scrape(url)
        sync[2].value = start = time.time() + 0.5
        sync[1].set()
        backlog, cpu = _backlog(url, start, start + swarm.seconds, meter)
        sent = sum(sync[3].get(timeout=120) for _ in gens)
    finally:
        for g in gens:
            g.join(timeout=30)
            if g.is_alive():
                g.kill()
    # Publishes still queued when the load stops are scored and counted, late as they are.
    _settle(url, timeout_s=max(120.0, swarm.seconds))
    return {"before": before, "after": scrape(url), "backlog": backlog, "sent": sent, "cpu": cpu}


def _delta(m: dict[str, Any], name: str) -> float:
    key = (name, ())
    return m["after"].get(key, 0.0) - m["before"].get(key, 0.0)


def run(swarm: Swarm) -> dict[str, Any]:
    """Run `swarm` against a fresh coordinator and judge it: one benchmark row."""
    scorers = os.environ.get("TETHER_SCORER_PROCESSES", "1")
    with coordinator(TETHER_SCORER_PROCESSES=scorers) as coord:
        m = drive(swarm, coord.url, CpuMeter(coord.pid))
    name = "tetherfed_publish_to_decision_seconds"
    p50, p99 = quantile(m, name, 0.5) * 1e3, quantile(m, name, 0.99) * 1e3
    accepted = int(_delta(m, "tetherfed_publishes_total"))
    scored = int(_delta(m, f"{name}_count"))
    rounds = int(_delta(m, "tetherfed_scoring_rounds_total"))
    backlog = [b for b in m["backlog"] if b >= 0] or [0]
    quarter = max(1, len(backlog) // 4)
    stable = max(backlog[-quarter:]) <= max(backlog[:quarter]) + 2 * swarm.workers // 10
    every = scored == accepted
    kind = "full" if swarm.sketch is None else "sketch"
    handling = quantile(m, "tetherfed_publish_seconds", 0.99, kind=kind) * 1e3
    return line(
        swarm.row,
        ours=p99,
        reference=None,
        unit="ms (p99 publish→decision, /metrics histogram)",
        ratio=None,
        target=f"every publish scored, backlog flat, p99 <= {TARGET_P99_MS} ms",
        passed=every and stable and p99 <= TARGET_P99_MS,
        params={
            "workers": swarm.workers,
            "layers": swarm.layers,
            "shape": list(swarm.shape),
            "frames": kind,
            "sketch_k": None if swarm.sketch is None else swarm.sketch.k,
            "hz_per_worker": swarm.hz,
            "seconds": swarm.seconds,
            "generator_processes": swarm.generators,
            "scorer_processes": int(scorers),
            "offered_publishes_per_s": swarm.workers * swarm.hz,
            "achieved_publishes_per_s": round(accepted / swarm.seconds, 1),  # answered 202
            "publishes_sent": m["sent"],
            "publishes_accepted": accepted,
            "publishes_scored": scored,
            "rounds_committed": rounds,
            "coalesced": accepted - rounds,
            "every_publish_scored": every,
            "p50_ms": round(p50, 2),
            "p99_ms": round(p99, 2),
            "scoring_round_p99_ms": round(
                quantile(m, "tetherfed_scoring_round_seconds", 0.99) * 1e3, 2
            ),
            "publish_handling_p99_ms": round(handling, 2),
            "backlog_first_quarter_max": max(backlog[:quarter]),
            "backlog_last_quarter_max": max(backlog[-quarter:]),
            "backlog_stable": stable,
            "cpu": m["cpu"],
            "cpu_ms_per_publish": _cpu_per_publish(m["cpu"], swarm.seconds, accepted),
        },
    )


def _cpu_per_publish(cpu: dict[str, Any], seconds: float, accepted: int) -> dict[str, float]:
    """CPU milliseconds per accepted publish of each coordinator process group (API, scorers,
    Redis) and of the three together: cores used over the load's window × its length ÷ the
    publishes accepted in it. A figure that does not depend on how many cores are free (the
    issue's target is ≤ 1 ms in all)."""
    cores = cpu.get("cores_used", {})
    per = {
        k: round(1e3 * cores.get(k, 0.0) * seconds / max(accepted, 1), 3)
        for k in ("api", "scorers", "redis")
    }
    return {**per, "coordinator": round(sum(per.values()), 3)}
