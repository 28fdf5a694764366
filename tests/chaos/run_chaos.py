"""`make chaos`: kill -9 the parts of a real ensemble at random moments, then check what held.

The ensemble: a redis-server started here on a free loopback port with AOF on (`appendonly yes`,
`appendfsync` from CHAOS_APPENDFSYNC, default `everysec` as shipped), one coordinator (`tetherfed
coordinator`: the API process, which starts its scoring process and starts it again when it
dies) and CHAOS_WORKERS `tetherfed worker` processes that checkpoint often. Every part is
killed with SIGKILL CHAOS_KILLS times (default 20 for `make chaos`; the CI test runs 2), in
rounds that kill each part once in a seeded random order; each kill comes at a random moment
(0-2 s) after the ensemble has shown it works again: every live worker has acked a decision
made after the last restart. What died is started again as a supervisor would: a worker with
`--resume` from its checkpoint folder (so under its id), the coordinator on the same port,
Redis on the same port and data folder; the scoring process is the coordinator's to restart.

Invariants, checked from Redis and from the workers' own records (`metrics.jsonl`: `start`,
`checkpoint`, `decision` and `interrupted` events), reported as violations:

- lost: an ack or a decision seen in Redis during the run is gone (or changed) at the end;
- unacked: a decision a worker applied (and kept: see below) has no ack in Redis;
- applied twice: a decision appears twice in a worker's effective history — its `decision`
  events, each incarnation's cut at the step the next one resumed from (what a resume rolled
  back was undone with the model, so applying it again is right; applying a kept one is not);
- decided twice: two decisions for one (worker, snapshot version, layer, partner);
- identity: a worker that ran under two ids, resumed without its id, registered twice in
  Redis, or did not end (SIGINT at the end: exit 130 and an `interrupted` event under its id);
- stalls: a restart after which the ensemble did not work again within CHAOS_RECOVER_S;
- strays: a process of this run (found by a marker in its environment) alive at the end.

Prints a table and the JSON of the figures (also written to <out>/chaos.json); exits 1 on any
violation. Settings (environment): CHAOS_KILLS, CHAOS_WORKERS, CHAOS_APPENDFSYNC, CHAOS_SEED,
CHAOS_RECOVER_S, CHAOS_MAX_S (a time budget for the kills: no round of four kills starts that
would likely end past it, so a loaded machine runs fewer rounds; the table says how many),
CHAOS_OUT (a folder to keep logs and records in; default a temporary one, kept when a violation
is found).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from tetherfed_coordinator.embedded import free_port, server_binary
from tetherfed_coordinator.keys import Keys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: run as a script too
from procs import child_pids, marked_pids, proc_alive, restore_sigint

TARGETS = ("worker", "coordinator", "scorer", "redis")
FEDERATION = "chaos"
MARKER_ENV = "TETHERFED_CHAOS_RUN"
EXIT_INTERRUPTED = 130  # tetherfed's exit code after Ctrl-C (SIGINT)
# Every publish is scored; cosine puts two U[0,1) tethers near 0.75, so pairs keep merging: a
# steady stream of decisions to lose, duplicate or apply twice.
POLICY = {
    "measure": "cosine",
    "merge_threshold": 0.5,
    "drift_threshold": None,
    "trigger": "every_publish",
    "max_merges_per_epoch": 1_000_000,
    "cooldown_steps": 10,
    "max_staleness_steps": None,
}


@dataclass
class Config:
    """One chaos run: kills per target, workers, Redis fsync policy, seed, timeouts, folder."""

    kills: int = 20
    workers: int = 3
    appendfsync: str = "everysec"  # what docker compose and --data-dir ship
    seed: int = 0
    recover_s: float = 300.0  # a bound for a stall, not a target: a quiet machine takes seconds
    jitter_s: float = 2.0  # a kill waits U(0, jitter_s) after the ensemble was seen working
    out: Path | None = None
    max_steps: int = 1_000_000  # a cap only: workers are ended by SIGINT once the kills are done
    max_s: float | None = None  # time budget for the kills: fewer rounds when it runs out

    @classmethod
    def from_env(cls) -> Config:
        """The settings of `make chaos` (CHAOS_* variables; defaults as above)."""
        env = os.environ
        return cls(
            kills=int(env.get("CHAOS_KILLS", "20")),
            workers=int(env.get("CHAOS_WORKERS", "3")),
            appendfsync=env.get("CHAOS_APPENDFSYNC", "everysec"),
            seed=int(env.get("CHAOS_SEED", "0")),
            recover_s=float(env.get("CHAOS_RECOVER_S", "300")),
            out=Path(env["CHAOS_OUT"]) if env.get("CHAOS_OUT") else None,
            max_s=float(env["CHAOS_MAX_S"]) if env.get("CHAOS_MAX_S") else None,
        )


@dataclass
class Result:
    """What one run measured and found."""

    config: dict[str, Any]
    kills: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TARGETS, 0))
    recovery_s: dict[str, list[float]] = field(default_factory=lambda: {t: [] for t in TARGETS})
    figures: dict[str, Any] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    runtime_s: float = 0.0
    out: str = ""

    def summary(self) -> dict[str, Any]:
        """The JSON printed and written to chaos.json."""
        recovery = {
            t: {"median_s": round(statistics.median(v), 2), "max_s": round(max(v), 2)}
            for t, v in self.recovery_s.items()
            if v
        }
        return {
            "config": self.config,
            "kills": self.kills,
            "recovery": recovery,
            "figures": self.figures,
            "violations": len(self.violations),
            "violation_list": self.violations,
            "runtime_s": round(self.runtime_s, 1),
            "out": self.out,
        }


# -- processes -------------------------------------------------------------------------------


def marked(marker: str) -> list[int]:
    """Live processes of the run with this marker (the scoring processes included)."""
    return marked_pids(MARKER_ENV, marker)


def wait_for(check: Callable[[], bool], timeout_s: float, every_s: float = 0.1) -> bool:
    """Poll `check` (errors count as not yet) until true or `timeout_s` passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(redis.RedisError, httpx.HTTPError, OSError, ValueError):
            if check():
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every_s)


def sigkill(pid: int) -> None:
    """kill -9 `pid` (gone already: nothing to do)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# -- the ensemble ----------------------------------------------------------------------------


class Ensemble:
    """Redis, the coordinator (with its scoring process) and the workers of one chaos run, each
    started, killed and started again here; every process carries this run's marker."""

    def __init__(self, cfg: Config, out: Path) -> None:
        self.cfg, self.out = cfg, out
        self.marker = uuid.uuid4().hex[:12]
        self.redis_port, self.api_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.redis: subprocess.Popen[bytes] | None = None
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes] | None] = [None] * cfg.workers
        self.exit_codes: list[list[int]] = [[] for _ in range(cfg.workers)]
        self.started: list[int] = []  # every PID started here or seen as a scoring process

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every process of the run: no inherited TETHER_*, the marker."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
        return env | {MARKER_ENV: self.marker, "OMP_NUM_THREADS": "1"} | extra

    def _spawn(self, cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with log.open("ab") as sink:
            proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        self.started.append(proc.pid)
        return proc

    # redis
    def start_redis(self) -> None:
        """redis-server on its port and data folder, AOF on; waits for PING (AOF loaded)."""
        folder = self.out / "redis"
        folder.mkdir(exist_ok=True)
        conf = folder / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    f"port {self.redis_port}",
                    "bind 127.0.0.1",
                    f"dir {folder}",
                    'save ""',
                    "appendonly yes",
                    f"appendfsync {self.cfg.appendfsync}",
                    f"logfile {folder / 'log'}",
                ]
            )
            + "\n"
        )
        binary = shutil.which("redis-server") or str(server_binary())
        self.redis = self._spawn([binary, str(conf)], folder / "stdout.log", self.env())
        client = redis.Redis(port=self.redis_port, socket_timeout=2)
        try:
            if not wait_for(lambda: bool(client.ping()), 60):
                raise RuntimeError(f"redis-server on port {self.redis_port} did not answer")
        finally:
            client.close()

    # coordinator
    def start_coordinator(self) -> None:
        """`tetherfed coordinator` on its port; waits for /readyz and its scoring process."""
        cmd = [
            sys.executable,
            "-m",
            "tetherfed.cli",
            "coordinator",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.api_port),
            "--redis-url",
            self.redis_url,
        ]
        # A short heartbeat TTL lets a resumed worker claim its id soon after the kill; a
        # short reclaim lets a live scorer take a killed one's pending entries soon.
        env = self.env(TETHER_HEARTBEAT_TTL_S="6", TETHER_RECLAIM_IDLE_MS="3000")
        self.coordinator = self._spawn(cmd, self.out / "coordinator.log", env)
        proc = self.coordinator
        ready = wait_for(
            lambda: (
                proc.poll() is None
                and httpx.get(f"{self.url}/readyz", timeout=2, trust_env=False).status_code == 200
            ),
            self.cfg.recover_s,
        )
        if not ready or not wait_for(lambda: bool(self.scorers()), self.cfg.recover_s):
            raise RuntimeError(f"the coordinator did not become ready (see {self.out})")

    def scorers(self) -> list[int]:
        """PIDs of the coordinator's scoring processes (recorded as started by this run)."""
        if self.coordinator is None or self.coordinator.poll() is not None:
            return []
        pids = child_pids(self.coordinator.pid, "tetherfed_coordinator.scorer")
        self.started.extend(p for p in pids if p not in self.started)
        return pids

    def create_federation(self) -> None:
        """The run's federation (idempotent: 200 or 201)."""
        body = {"name": FEDERATION, "policy": POLICY}
        with httpx.Client(base_url=self.url, trust_env=False, timeout=10) as client:
            client.post("/v1/federations", json=body).raise_for_status()

    # workers
    def worker_dir(self, i: int) -> Path:
        """Worker i's checkpoint folder (latest.pt, metrics.jsonl, its log)."""
        return self.out / f"worker-{i}"

    def start_worker(self, i: int) -> None:
        """`tetherfed worker --resume` (the first start finds no checkpoint and registers)."""
        folder = self.worker_dir(i)
        folder.mkdir(exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "tetherfed.cli",
            "worker",
            "--coordinator",
            self.url,
            "--federation",
            FEDERATION,
            "--name",
            f"w{i}",
            "--seed",
            str(i),
            "--steps",
            str(self.cfg.max_steps),
            "--publish-every",
            "5",
            "--eval-every",
            "20",
            "--log-every",
            "200",
            "--device",
            "cpu",
            "--checkpoint-dir",
            str(folder),
            "--resume",
        ]
        self.workers[i] = self._spawn(cmd, folder / "worker.log", self.env())

    def live_workers(self) -> list[int]:
        """Indices of the workers running now."""
        return [i for i, p in enumerate(self.workers) if p is not None and p.poll() is None]

    # kills
    def kill_worker(self, i: int) -> None:
        """kill -9 worker i and reap it."""
        proc = self.workers[i]
        assert proc is not None
        sigkill(proc.pid)
        self.exit_codes[i].append(proc.wait())

    def kill_coordinator(self) -> list[str]:
        """kill -9 the API process; its scoring processes must follow (PR_SET_PDEATHSIG)."""
        assert self.coordinator is not None
        scorers = self.scorers()
        sigkill(self.coordinator.pid)
        self.coordinator.wait()
        if wait_for(lambda: not any(proc_alive(p) for p in scorers), 30):
            return []
        for pid in scorers:
            sigkill(pid)
        return [f"scoring processes {scorers} outlived their coordinator by 30 s"]

    def kill_scorer(self) -> list[str]:
        """kill -9 one scoring process; the coordinator must start another within 30 s."""
        victims = self.scorers()
        if not victims:
            return ["no scoring process to kill"]
        sigkill(victims[0])
        if wait_for(lambda: any(p not in victims for p in self.scorers()), 30):
            return []
        return [
            "the coordinator did not start a scoring process again within 30 s of killing"
            f" {victims[0]}"
        ]

    def kill_redis(self) -> None:
        """kill -9 redis-server and reap it."""
        assert self.redis is not None
        sigkill(self.redis.pid)
        self.redis.wait()

    def interrupt_workers(self, timeout_s: float = 90.0) -> list[str]:
        """Ctrl-C every worker (SIGINT) and collect exit codes; SIGKILL after `timeout_s`. A
        worker that already exited on its own has its code collected as it is."""
        problems = []
        running = self.live_workers()
        for i in running:
            self.workers[i].send_signal(signal.SIGINT)  # type: ignore[union-attr]
        for i, proc in enumerate(self.workers):
            if proc is None:
                continue
            try:
                self.exit_codes[i].append(proc.wait(timeout=timeout_s))
            except subprocess.TimeoutExpired:
                sigkill(proc.pid)
                self.exit_codes[i].append(proc.wait())
                problems.append(f"worker {i} did not end within {timeout_s:g} s of SIGINT")
            if i not in running:
                problems.append(f"worker {i} had exited on its own (code {proc.returncode})")
        return problems

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the coordinator and Redis (SIGKILL after `timeout_s`); workers are killed."""
        for proc in [*self.workers, self.coordinator, self.redis]:
            if proc is None or proc.poll() is not None:
                continue
            if proc in self.workers:
                sigkill(proc.pid)
            else:
                proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                sigkill(proc.pid)
                proc.wait()


# -- what Redis holds ------------------------------------------------------------------------


class Observer:
    """Reads the federation's decisions and acks from Redis while the run goes on, and keeps
    every one it has seen (to check at the end that none was lost)."""

    def __init__(self, port: int) -> None:
        self.client = redis.Redis(port=port, socket_timeout=3, decode_responses=True)
        self.keys = Keys("tetherfed:")
        self.decisions: dict[int, str] = {}  # id → JSON, as first seen
        self.acks: dict[int, str] = {}

    def poll(self) -> bool:
        """Read what is new (False while Redis is unreachable)."""
        try:
            self._read_decisions()
            fields = self.client.hkeys(self.keys.acks(FEDERATION))
            new = [f for f in fields if int(f) not in self.acks]
            if new:
                values = self.client.hmget(self.keys.acks(FEDERATION), new)
                self.acks.update({int(f): v for f, v in zip(new, values, strict=True) if v})
        except (redis.RedisError, OSError):
            return False
        return True

    def _read_decisions(self) -> None:
        after = max(self.decisions, default=0)
        while True:
            rows = self.client.xrange(
                self.keys.decisions(FEDERATION), min=f"{after + 1}-0", count=1000
            )
            for sid, fields in rows:
                after = int(sid.split("-")[0])
                self.decisions.setdefault(after, fields["d"])
            if len(rows) < 1000:
                return

    def last_decision(self) -> int:
        """The highest decision id seen so far."""
        return max(self.decisions, default=0)

    def acked_after(self, watermark: int) -> set[str]:
        """Worker ids with an ack of a decision newer than `watermark`."""
        return {json.loads(v)["worker_id"] for k, v in self.acks.items() if k > watermark}

    def final(self) -> tuple[dict[int, str], dict[int, str], set[str]]:
        """(decisions, acks, worker ids) as Redis holds them now."""
        decisions: dict[int, str] = {}
        for sid, fields in self.client.xrange(self.keys.decisions(FEDERATION)):
            decisions[int(sid.split("-")[0])] = fields["d"]
        acks = {int(k): v for k, v in self.client.hgetall(self.keys.acks(FEDERATION)).items()}
        workers = set(self.client.smembers(self.keys.workers(FEDERATION)))
        return decisions, acks, workers


# -- the workers' records --------------------------------------------------------------------


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl (a line torn by a kill is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict):
                out.append(record)
    return out


def incarnations(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The records split per process run (each begins with its `start` event)."""
    runs: list[list[dict[str, Any]]] = []
    for record in records:
        if record.get("event") == "start" or not runs:
            runs.append([])
        runs[-1].append(record)
    return runs


def effective_history(runs: list[list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], int]:
    """The `decision` events the worker's final state holds: each run's cut at the step the next
    one resumed from (later ones were undone with the model); and how many were rolled back."""
    kept: list[dict[str, Any]] = []
    rolled_back = 0
    for k, run in enumerate(runs):
        events = [r for r in run if r.get("event") == "decision"]
        if k + 1 < len(runs):
            resumed_at = int(runs[k + 1][0].get("step", 0))
            rolled_back += sum(e["step"] > resumed_at for e in events)
            events = [e for e in events if e["step"] <= resumed_at]
        kept.extend(events)
    return kept, rolled_back


def identity_problems(i: int, runs: list[list[dict[str, Any]]], codes: list[int]) -> list[str]:
    """A worker must keep one id across its runs and end (SIGINT: exit 130, an `interrupted`
    event, the last of its record)."""
    problems = []
    ids = {r["worker_id"] for run in runs for r in run if r.get("worker_id")}
    if len(ids) != 1:
        problems.append(f"worker {i} ran under ids {sorted(ids)}")
    for k, run in enumerate(runs[1:], start=1):
        if run[0].get("event") == "start" and not run[0].get("worker_id"):
            problems.append(f"worker {i} run {k} started without its id (no checkpoint to resume)")
    ended = [r for r in runs[-1] if r.get("event") == "interrupted"] if runs else []
    if not ended or ended[-1].get("worker_id") not in ids:
        problems.append(f"worker {i} has no `interrupted` event under its id at the end")
    if not codes or codes[-1] != EXIT_INTERRUPTED:
        problems.append(
            f"worker {i} ended with exit codes {codes}, expected {EXIT_INTERRUPTED} last"
        )
    return problems


# -- the run ---------------------------------------------------------------------------------


class Chaos:
    """One chaos run: start, kill and restart per the plan, then check and report."""

    def __init__(self, cfg: Config, out: Path) -> None:
        self.cfg, self.out = cfg, out
        self.rng = random.Random(cfg.seed)
        self.ens = Ensemble(cfg, out)
        self.result = Result(config={**asdict(cfg), "out": str(out)}, out=str(out))
        self.obs: Observer | None = None

    def working_since(self, watermark: int, timeout_s: float) -> bool:
        """Wait until every live worker has an ack of a decision made after `watermark`."""
        assert self.obs is not None
        obs = self.obs

        def all_acked() -> bool:
            if not obs.poll():
                return False
            ids = {self.worker_id(i) for i in self.ens.live_workers()}
            return None not in ids and ids <= obs.acked_after(watermark)

        return wait_for(all_acked, timeout_s, every_s=0.25)

    def worker_id(self, i: int) -> str | None:
        """Worker i's id from its records (a checkpoint or a start event that names it)."""
        for record in reversed(read_records(self.ens.worker_dir(i) / "metrics.jsonl")):
            if record.get("event") in ("checkpoint", "start") and record.get("worker_id"):
                return str(record["worker_id"])
        return None

    def start(self) -> None:
        """Redis, coordinator, federation, workers; then wait for the first acks."""
        self.ens.start_redis()
        self.obs = Observer(self.ens.redis_port)
        self.ens.start_coordinator()
        self.ens.create_federation()
        for i in range(self.cfg.workers):
            self.ens.start_worker(i)
        if not self.working_since(0, max(self.cfg.recover_s, 180)):
            raise RuntimeError(f"the ensemble made no acked decision per worker (see {self.out})")

    def kill(self, target: str) -> list[str]:
        """Kill `target` and start it again; problems found on the way."""
        ens = self.ens
        if target == "worker":
            i = self.rng.choice([w for w in ens.live_workers() if self.worker_id(w)])
            ens.kill_worker(i)
            ens.start_worker(i)
            return []
        if target == "coordinator":
            problems = ens.kill_coordinator()
            ens.start_coordinator()
            return problems
        if target == "scorer":
            return ens.kill_scorer()
        ens.kill_redis()
        ens.start_redis()
        return []

    def run_plan(self) -> None:
        """`kills` rounds, each every target once in a seeded random order; a kill only once
        the ensemble works again after the previous one. With `max_s`, no round starts that
        would likely end past it (rounds take about as long as the ones before)."""
        started = time.monotonic()
        for r in range(self.cfg.kills):
            elapsed = time.monotonic() - started
            if self.cfg.max_s and r and elapsed + elapsed / r > self.cfg.max_s:
                print(f"chaos: time budget {self.cfg.max_s:g} s: stopping after {r} rounds")
                return
            for target in self.rng.sample(TARGETS, len(TARGETS)):
                self.kill_and_recover(target, f"round {r + 1}/{self.cfg.kills}")

    def kill_and_recover(self, target: str, label: str) -> None:
        """Wait a random moment, kill `target`, start it again, wait until all works again."""
        assert self.obs is not None
        time.sleep(self.rng.uniform(0, self.cfg.jitter_s))
        killed_at = time.monotonic()
        self.result.violations += self.kill(target)
        self.result.kills[target] += 1
        self.obs.poll()
        recovered = self.working_since(self.obs.last_decision(), self.cfg.recover_s)
        took = time.monotonic() - killed_at
        if recovered:
            self.result.recovery_s[target].append(took)
        else:
            self.result.violations.append(
                f"{label} ({target}): no acked new decision per worker within "
                f"{self.cfg.recover_s:g} s"
            )
        print(f"chaos: {label} kill {target}: working again after {took:.1f} s", flush=True)

    def finish(self) -> None:
        """End the workers (SIGINT), read Redis, stop the rest, check everything."""
        assert self.obs is not None
        self.result.violations += self.ens.interrupt_workers()
        self.obs.poll()
        decisions, acks, registered = self.obs.final()
        self.ens.stop()
        self.check_redis(decisions, acks)
        self.check_workers(decisions, acks, registered)
        if not wait_for(lambda: not marked(self.ens.marker), 15):
            strays = marked(self.ens.marker)
            self.result.violations.append(f"stray processes left: {strays}")
            for pid in strays:
                sigkill(pid)
        self.result.figures["processes_started"] = len(set(self.ens.started))

    def check_redis(self, decisions: dict[int, str], acks: dict[int, str]) -> None:
        """No decision or ack seen during the run is gone or changed; no round decided twice."""
        assert self.obs is not None
        lost = [i for i, d in self.obs.decisions.items() if decisions.get(i) != d]
        lost_acks = [i for i, a in self.obs.acks.items() if acks.get(i) != a]
        if lost:
            self.result.violations.append(f"decisions lost or changed: {lost[:20]}")
        if lost_acks:
            self.result.violations.append(f"acks lost or changed: {lost_acks[:20]}")
        rounds = Counter(
            (d["worker_id"], d["own_snapshot"]["version"], d["layer"], d["partner_id"])
            for d in map(json.loads, decisions.values())
        )
        twice = [k for k, n in rounds.items() if n > 1]
        if twice:
            self.result.violations.append(f"rounds decided twice: {twice[:10]}")
        outcomes = Counter(json.loads(a)["outcome"] for a in acks.values())
        self.result.figures |= {
            "decisions_made": len(decisions),
            "decisions_acked": len(acks),
            "acked_applied": outcomes["applied"],
            "acked_rejected": outcomes["rejected"],
            "acks_seen_during_run": len(self.obs.acks),
        }

    def check_workers(
        self, decisions: dict[int, str], acks: dict[int, str], registered: set[str]
    ) -> None:
        """Each worker's records: one id, ended; every kept decision acked, none applied twice."""
        applied = rolled_back = resumes = 0
        ids = set()
        for i in range(self.cfg.workers):
            runs = incarnations(read_records(self.ens.worker_dir(i) / "metrics.jsonl"))
            self.result.violations += identity_problems(i, runs, self.ens.exit_codes[i])
            ids |= {r["worker_id"] for run in runs for r in run if r.get("worker_id")}
            resumes += max(0, len(runs) - 1)
            kept, undone = effective_history(runs)
            rolled_back += undone
            applied += sum(e["outcome"] == "applied" for e in kept)
            self.result.violations += self.history_problems(i, kept, decisions, acks)
        if registered != ids:
            self.result.violations.append(
                f"workers registered in Redis {sorted(registered)} ≠ ids in the workers' records "
                f"{sorted(ids)}"
            )
        self.result.figures |= {
            "applied_by_workers": applied,
            "rolled_back_by_resume": rolled_back,
            "worker_resumes": resumes,
        }

    @staticmethod
    def history_problems(
        i: int, kept: list[dict[str, Any]], decisions: dict[int, str], acks: dict[int, str]
    ) -> list[str]:
        """Applied twice, unknown to Redis, addressed to someone else, or without an ack."""
        problems = []
        counts = Counter(e["decision_id"] for e in kept)
        twice = sorted(d for d, n in counts.items() if n > 1)
        if twice:
            problems.append(f"worker {i} applied decisions twice: {twice[:20]}")
        unknown = sorted(d for d in counts if d not in decisions)
        if unknown:
            problems.append(f"worker {i} applied decisions Redis does not hold: {unknown[:20]}")
        unacked = sorted(d for d in counts if d in decisions and d not in acks)
        if unacked:
            problems.append(f"worker {i} applied decisions without an ack: {unacked[:20]}")
        return problems


def run(cfg: Config) -> Result:
    """One chaos run per `cfg`; the result (violations listed, figures, runtime)."""
    out = cfg.out or Path(tempfile.mkdtemp(prefix="tetherfed-chaos-"))
    out.mkdir(parents=True, exist_ok=True)
    chaos = Chaos(cfg, out)
    started = time.monotonic()
    try:
        chaos.start()
        chaos.run_plan()
        chaos.finish()
    finally:
        chaos.ens.stop()
        for pid in marked(chaos.ens.marker):
            sigkill(pid)
        if chaos.obs is not None:
            chaos.obs.client.close()
    chaos.result.runtime_s = time.monotonic() - started
    (out / "chaos.json").write_text(json.dumps(chaos.result.summary(), indent=2) + "\n")
    if cfg.out is None and not chaos.result.violations:
        shutil.rmtree(out, ignore_errors=True)
    return chaos.result


def table(result: Result) -> Iterator[str]:
    """The figures as text lines."""
    s = result.summary()
    yield f"{'target':<12} {'kills':>6} {'recovery median s':>18} {'max s':>8}"
    for target in TARGETS:
        rec = s["recovery"].get(target, {"median_s": "-", "max_s": "-"})
        yield f"{target:<12} {s['kills'][target]:>6} {rec['median_s']:>18} {rec['max_s']:>8}"
    for name, value in s["figures"].items():
        yield f"{name:<28} {value}"
    yield f"{'violations':<28} {s['violations']}"
    yield f"{'runtime_s':<28} {s['runtime_s']}"


def main() -> int:
    """`make chaos`: run, print the table, the JSON and each violation; 1 on any violation."""
    # SIGTERM (timeout, CI) ends the run like Ctrl-C: every process of the ensemble is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    restore_sigint()  # workers are ended with SIGINT, also when `make chaos` runs in the background
    result = run(Config.from_env())
    print("\n".join(table(result)))
    print(json.dumps(result.summary()))
    for violation in result.violations:
        print(f"VIOLATION: {violation}", file=sys.stderr)
    return 1 if result.violations else 0


if __name__ == "__main__":
    sys.exit(main())
