"""What synchronous rounds cost: steps/s of 8 workers federating every 10 steps (the FedAvg round,
each worker waiting in `Federation.step()` until its round's decisions are applied) against the
same 8 workers training independently. Target ≥ 0.9.

The workers are 8 processes (multiprocessing, spawn), one torch thread each, each training the
seed-001 model (the 128-64-10 MLP, static tethers: 3 tethered layers) on random-classification,
batch 32, Adam, with `loss.item()` every step in both arms. Every worker starts from the same
initial model (as FedAvg's clients start from the global one) and cycles the data from its own
offset.

Two arms, in blocks of 50 steps (5 rounds) that alternate (a 10-step warm-up block of each,
then A B, B A, A B), every worker running every block, all started together (a barrier) so
that machine noise hits both arms alike:

- federated: a fresh federation per block whose policy is the FedAvg round, `fedavg_every =
  sync_every = 10`, `trigger = "every_publish"`, no staleness bound, no cooldown, unlimited
  merges: at steps 10, 20, ... every worker publishes and becomes the federation mean before it
  trains on. Each worker opens its `Federation` (registered) before the block and closes it
  after, neither timed.
- independent: the same loop with no `Federation` at all. The target compares federating with
  not federating; a `Federation` left open through these blocks (deciding nothing) would charge
  its heartbeats and long polls to the reference, and what an idle `Federation` costs is the
  `overhead` row's business.

An arm's figure is the aggregate steps/s of a block, all workers' steps over the block's wall
time (the first worker's start to the last worker's end: what a run that waits for all its
workers sees; in the federated arm the rounds keep the workers in step, in the independent arm
the slowest sets the end), the median over the arm's blocks; ratio = federated / independent.
`params.per_worker_steps_per_s` gives the median over workers of each worker's own steps/s too.

Where a federated round's time goes (`params.round_ms`, medians over rounds and workers, from
timestamps taken in the worker processes on the machine's monotonic clock): `publish` (the round's
`step()` call to the coordinator's 202), `peers` (this worker's publish to the round's last
publish: the round waits for its slowest worker), `decide` (the round's last publish to this
worker's first decision arriving on its long poll: the coordinator's deferral, scoring and
commit, the long poll's wake-up), `fetch` (the I/O thread fetching the partners' tethers: one
request per partner snapshot, all its decided layers in one frame), `apply` (from there to
`step()` returning: the training thread applying the merges) and `total`; the I/O thread acks a
page in one request (`ack_requests_per_round`, `ack_request_ms`), which overlaps the next steps'
training. `fetches_per_round` and `acks_per_round` count a worker's requests and acks a round.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from tether_protocol.messages import Policy
from tetherfed import Client

from .common import CpuMeter, line
from .harness import coordinator

TARGET = 0.9
EVERY = 10
BLOCK_TIMEOUT_S = 300.0  # the longest one block (or a worker's start) may take
POLICY = Policy(
    trigger="every_publish",
    fedavg_every=EVERY,
    sync_every=EVERY,
    sync_timeout_s=60.0,
    max_staleness_steps=None,
    cooldown_steps=0,
    max_merges_per_epoch=1_000_000,
    retain_generations=0,
)


# -- the worker process -----------------------------------------------------------------------------


def _worker(index: int, url: str, conn: Connection, barrier: Any) -> None:
    """A worker process: build the model, then run the blocks the parent sends, until "stop"."""
    import torch  # noqa: PLC0415 (each spawned process imports its own)

    from tetherfed import build_model, load_task, tether  # noqa: PLC0415

    torch.set_num_threads(1)
    try:
        task = load_task("random-classification", seed=0)
        x, y = task.train.tensors
        batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(x) - 31, 32)]
        shift = index * len(batches) // 8  # each worker its own place in the data
        batches = batches[shift:] + batches[:shift]
        model = tether(build_model("mlp", task, seed=0), "static", seed=0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        conn.send(("ready", index))
        while (command := conn.recv())[0] != "stop":
            _, fed_name, steps = command
            result = _run_block(index, url, fed_name, steps, model, opt, batches, conn, barrier)
            conn.send(("result", index, result))
    except Exception as error:  # the parent raises it, naming the worker
        with contextlib.suppress(OSError):
            conn.send(("error", index, f"{type(error).__name__}: {error}"))
        raise
    # Skip the interpreter's teardown (with torch loaded it took 10-20 s a process at load
    # average 14): nothing is left to flush, every Federation is closed.
    conn.close()
    sys.stderr.flush()
    os._exit(0)


def _run_block(
    index: int,
    url: str,
    fed_name: str | None,
    steps: int,
    model: Any,
    opt: Any,
    batches: list[Any],
    conn: Connection,
    barrier: Any,
) -> dict[str, Any]:
    """One block of `steps` training steps, federated in `fed_name` (None: independent),
    started with the other workers (the barrier); its times and the Federation's counts."""
    from torch import nn  # noqa: PLC0415

    from tetherfed import Federation  # noqa: PLC0415

    fed = trace = None
    if fed_name is not None:
        fed = Federation(url, fed_name, model, name=f"w{index}")
        if not fed.wait_registered(60):
            raise RuntimeError(f"worker {index} could not register in {fed_name}")
        trace = _Trace(fed)
    loss_fn = nn.CrossEntropyLoss()
    conn.send(("set", index))
    barrier.wait(BLOCK_TIMEOUT_S)
    start = time.monotonic()
    for step in range(1, steps + 1):
        xb, yb = batches[step % len(batches)]
        loss = loss_fn(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        if fed is not None and trace is not None:
            at = trace.rounds[step] if step % EVERY == 0 else {}
            at["call"] = time.monotonic()
            fed.step(loss=value)
            at["return"] = time.monotonic()
    end = time.monotonic()
    conn.send(("done", index))  # before closing: the parent's CPU window ends here
    result: dict[str, Any] = {"start": start, "end": end, "steps": steps}
    if fed is not None and trace is not None:
        fed.close()
        stats = fed.stats
        result |= {
            "rounds": stats.rounds,
            "rounds_timed_out": stats.rounds_timed_out,
            "round_wait_s": stats.round_wait_s,
            "merges_applied": stats.merges_applied,
            "published": stats.published,
            "trace": {k: dict(v) for k, v in trace.rounds.items()},
            "acks": trace.acks,
            "ack_requests": trace.ack_requests,
            "ack_s": trace.ack_s,
            "fetch_requests": trace.fetch_requests,
        }
    return result


class _Trace:
    """Timestamps of each synchronous round, taken by wrapping the I/O thread's calls (the
    benchmark's instrument, not the library's): when the publish was accepted, when the round's
    decisions arrived (their partner fetches begin), when its last decision was ready; and the
    I/O thread's requests: partner fetches, ack requests and the acks they carried, and its
    time acking."""

    def __init__(self, fed: Any) -> None:
        self.rounds: dict[int, dict[str, float]] = defaultdict(dict)
        self.acks, self.ack_requests, self.ack_s = 0, 0, 0.0
        self.fetch_requests = 0
        io = fed._io
        io.rounds.published = self._wrap(io.rounds.published, self._published)
        fetch_partners, prepare = io._fetch_partners, io._prepare

        def fetching(decisions: Any) -> Any:
            began = time.monotonic()
            for d in decisions:
                self.rounds[d.own_snapshot.step].setdefault("first_decision", began)
            return fetch_partners(decisions)

        def prepared(decision: Any, frames: Any) -> Any:
            out = prepare(decision, frames)
            at = self.rounds[decision.own_snapshot.step]
            at.setdefault("first_decision", time.monotonic())
            at["fetched"] = time.monotonic()
            return out

        io._fetch_partners, io._prepare = fetching, prepared
        for name in ("decision_tethers", "tether_frame"):
            setattr(io._client, name, self._counted(getattr(io._client, name)))
        ack_many = io._client.ack_many

        def acked(fed_name: str, items: Any) -> Any:
            began = time.monotonic()
            try:
                return ack_many(fed_name, items)
            finally:
                self.acks += len(items)
                self.ack_requests += 1
                self.ack_s += time.monotonic() - began

        io._client.ack_many = acked

    def _counted(self, fetch: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.fetch_requests += 1
            return fetch(*args, **kwargs)

        return call

    def _published(self, worker_id: str, step: int, version: int) -> None:
        self.rounds[step]["published"] = time.monotonic()

    @staticmethod
    def _wrap(original: Callable[..., Any], before: Callable[..., None]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            before(*args)
            return original(*args)

        return call


# -- the parent -------------------------------------------------------------------------------------


class _Workers:
    """The worker processes and their pipes; every process ends on `close` (stop, then
    terminate, then kill, by PID)."""

    def __init__(self, n: int, url: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.barrier = ctx.Barrier(n + 1)  # the workers and this process
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for i in range(n):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(i, url, theirs, self.barrier), daemon=True)
            proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)
        for i in range(n):
            self._recv(i, "ready")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _recv(self, i: int, kind: str, deadline: float | None = None) -> tuple[Any, ...]:
        """Worker i's next message, which must be `kind`; raises on its error, death or
        silence past the deadline."""
        deadline = deadline or time.monotonic() + BLOCK_TIMEOUT_S
        conn, proc = self.conns[i], self.procs[i]
        while not conn.poll(0.2):
            if not proc.is_alive():
                raise RuntimeError(f"worker {i} exited with {proc.exitcode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {i} sent no {kind!r} within {BLOCK_TIMEOUT_S} s")
        message = conn.recv()
        if message[0] == "error":
            raise RuntimeError(f"worker {i}: {message[2]}")
        if message[0] != kind:
            raise RuntimeError(f"worker {i} sent {message[0]!r}, expected {kind!r}")
        return tuple(message)

    def block(
        self, fed_name: str | None, steps: int, meter: CpuMeter
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Run one block on every worker; each worker's result and the block's CPU."""
        for conn in self.conns:
            conn.send(("block", fed_name, steps))
        deadline = time.monotonic() + BLOCK_TIMEOUT_S
        for i in range(len(self.conns)):
            self._recv(i, "set", deadline)  # every worker ready (registered)
        self.barrier.wait(60)  # ... and released together
        meter.start()
        for i in range(len(self.conns)):
            self._recv(i, "done", deadline)
        cpu = meter.stop()
        return [self._recv(i, "result", deadline)[2] for i in range(len(self.conns))], cpu

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        self.barrier.abort()  # a worker waiting at the barrier leaves it (BrokenBarrierError)
        for proc in self.procs:
            proc.join(timeout=10)
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()


def _steps_per_s(results: list[dict[str, Any]]) -> tuple[float, float]:
    """A block's aggregate steps/s (all steps over first start → last end) and the median
    worker's own steps/s."""
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    total = sum(r["steps"] for r in results) / wall
    own = statistics.median(r["steps"] / (r["end"] - r["start"]) for r in results)
    return total, own


def _round_ms(blocks: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians, over rounds and workers, of where a federated round's time went (ms)."""
    parts: dict[str, list[float]] = defaultdict(list)
    for results in blocks:
        steps = {s for r in results for s in r["trace"]}
        for step in steps:
            at = [r["trace"].get(step, {}) for r in results]
            published = [a["published"] for a in at if "published" in a]
            if len(published) < len(at):
                continue
            last = max(published)
            for a in at:
                if not {"call", "return", "first_decision", "fetched"} <= a.keys():
                    continue
                parts["publish"].append(a["published"] - a["call"])
                parts["peers"].append(last - a["published"])
                parts["decide"].append(a["first_decision"] - last)
                parts["fetch"].append(a["fetched"] - a["first_decision"])
                parts["apply"].append(a["return"] - a["fetched"])
                parts["total"].append(a["return"] - a["call"])
    out: dict[str, Any] = {k: round(1e3 * statistics.median(v), 1) for k, v in parts.items()}
    out["samples"] = len(parts["total"])

    def total(key: str) -> float:
        return float(sum(r[key] for b in blocks for r in b))

    rounds = max(len(parts["total"]), 1)
    out["fetches_per_round"] = round(total("fetch_requests") / rounds, 1)
    out["acks_per_round"] = round(total("acks") / rounds, 1)
    out["ack_requests_per_round"] = round(total("ack_requests") / rounds, 1)
    out["ack_request_ms"] = round(1e3 * total("ack_s") / max(total("ack_requests"), 1), 2)
    return out


def _cpu_ms(used: dict[str, Any], wall: float, rounds: int) -> dict[str, float]:
    """CPU milliseconds per round (10 steps of every worker) of each group of processes: the
    figures that do not depend on how many cores other tenants leave (the load does)."""
    return {k: round(1e3 * cores * wall / rounds, 1) for k, cores in used["cores_used"].items()}


def run(quick: bool = False) -> dict[str, Any]:
    """A warm-up block of each arm, then 3 pairs of federated and independent 50-step blocks,
    alternating (quick: 4 workers, one pair of 20-step blocks, no warm-up)."""
    n, block, repeats, warmup = (4, 2 * EVERY, 1, 0) if quick else (8, 5 * EVERY, 3, EVERY)
    load_before = os.getloadavg()[0]
    fed_runs: list[list[dict[str, Any]]] = []
    arms: dict[str, list[tuple[float, float]]] = {"federated": [], "independent": []}
    cpu: dict[str, tuple[dict[str, Any], float]] = {}  # arm → its last block's CPU and wall
    with coordinator() as coord:
        names = iter(f"sync-{i}" for i in range(1000))

        def federation() -> str:
            name = next(names)
            with Client(coord.url) as admin:
                admin.create_federation(name, policy=POLICY)
            return name

        workers = _Workers(n, coord.url)
        try:
            meter = CpuMeter(coord.pid, own_pids=workers.pids)
            if warmup:
                workers.block(federation(), warmup, meter)
                workers.block(None, warmup, meter)
            for r in range(repeats):
                order = ["federated", "independent"]
                for arm in order if r % 2 == 0 else reversed(order):
                    fed_name = federation() if arm == "federated" else None
                    results, used = workers.block(fed_name, block, meter)
                    arms[arm].append(_steps_per_s(results))
                    cpu[arm] = (
                        used,
                        max(r["end"] for r in results) - min(r["start"] for r in results),
                    )
                    if arm == "federated":
                        fed_runs.append(results)
        finally:
            workers.close()
    ours = statistics.median(t for t, _ in arms["federated"])
    ref = statistics.median(t for t, _ in arms["independent"])
    ratio = ours / ref
    fed_results = [r for b in fed_runs for r in b]
    fed_steps = sum(r["steps"] for r in fed_results)
    params = {
        "workers": n,
        "sync_every": EVERY,
        "block_steps": block,
        "blocks_per_arm": repeats,
        "warmup_steps": warmup,
        "order": "A B, B A, A B, ... (A federated, B independent)"
        + (", after a warm-up block of each" if warmup else ", no warm-up"),
        "figure": "aggregate steps/s of all workers over a block's wall time, median of blocks",
        "reference_arm": "the same workers and loop without a Federation",
        "model": "mlp 128-64-10, static tethers (3 layers)",
        "batch": 32,
        "optimizer": "adam",
        "torch_threads_per_worker": 1,
        "policy": "fedavg_every = sync_every = 10, every_publish, no staleness bound",
        "steps_per_s_blocks": {
            arm: [round(t, 1) for t, _ in results] for arm, results in arms.items()
        },
        "per_worker_steps_per_s": {
            arm: round(statistics.median(o for _, o in results), 1) for arm, results in arms.items()
        },
        "rounds": sum(r["rounds"] for r in fed_results),
        "rounds_per_worker": fed_steps // EVERY // n,
        "rounds_timed_out": sum(r["rounds_timed_out"] for r in fed_results),
        "round_wait_s": [round(sum(b[i]["round_wait_s"] for b in fed_runs), 2) for i in range(n)],
        "round_wait_share": round(
            sum(r["round_wait_s"] for r in fed_results)
            / sum(r["end"] - r["start"] for r in fed_results),
            3,
        ),
        "merges_per_100_steps": round(
            100 * sum(r["merges_applied"] for r in fed_results) / fed_steps, 1
        ),
        "round_ms": _round_ms(fed_runs),
        "load_average_1m": [round(load_before, 1), round(os.getloadavg()[0], 1)],  # before, after
        "cpu": cpu["federated"][0],  # over the last federated block
        "cpu_independent": cpu["independent"][0],  # over the last independent block
        "cpu_ms_per_round": {arm: _cpu_ms(*cpu[arm], block // EVERY) for arm in cpu},
    }
    return line(
        "sync-rounds",
        ours=ours,
        reference=ref,
        unit="steps/s (8 workers, aggregate)" if n == 8 else f"steps/s ({n} workers, aggregate)",
        ratio=ratio,
        target=f">= {TARGET}",
        passed=ratio >= TARGET,
        params=params,
    )


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv)))
