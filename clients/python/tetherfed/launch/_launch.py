"""The one launcher: a coordinator and N worker processes for one federation, and its run folder.

`tetherfed up` and every experiment run go through here. What varies by engine is only how a
process is started and stopped: `Engine` is that seam. `LocalEngine` runs subprocesses on this
machine, each in its own session so a Ctrl-C reaches only us; `_ray.RayEngine` runs actors on a
Ray cluster. A run is described by a `RunPlan` (typed, written as `config.json`).

The run folder (the contract read by `tetherfed report` and the diagnostics):

    config.json        the resolved run: workers with group, seeds, device, options; policy; arm
    status.json        state + per-worker progress, rewritten atomically while the run goes
    summary.json       the outcome, final losses, decisions by action, acks, the merge graph
    decisions.jsonl    every decision of the federation, each with its ack (or null)
    pids.json          every PID started (nothing may outlive the launcher)
    coordinator.log    when the launcher started the coordinator (Ray: coordinator-<k>.log for
                       replicas after the first)
    worker-<i>.log     a worker's stderr
    worker-<i>/        metrics.jsonl, latest.pt / best.pt checkpoints (and diagnostics)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from tether_protocol.messages import PRESETS, Policy, policy_preset
from tetherfed._exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNREACHABLE
from tetherfed.client._errors import ConflictError, NotFoundError, TetherError
from tetherfed.client._retry import RetryPolicy
from tetherfed.client._sdk import Client
from tetherfed.worker._main import TOKEN_ENV
from tetherfed.worker._options import WorkerOptions, options_argv

GRACE_S = 10.0  # SIGTERM → SIGKILL
TICK_S = 0.25
STATUS_EVERY_S = 1.0
QUICK = RetryPolicy(tries=2, deadline_s=2.0)
# Worker meta naming a digest of the initial parameters (`tethers.INIT_DIGEST_KEY`, spelled here
# so the launcher does not import torch).
INIT_DIGEST = "init_digest"

Arm = Literal["federated", "independent", "fedavg", "oracle"]
Init = Literal["independent", "shared"]
RunState = Literal["pending", "running", "finished", "failed", "interrupted", "unreachable"]


# -- policies ------------------------------------------------------------------------------------


def demo_policy() -> Policy:
    """The demo default of `tetherfed up`: score on every publish, merge when pearson > 0.

    Distinct seeds give independent U[0,1) static tethers, pearson ≈ 0 ± 0.02, so the default
    threshold (0.5) would only ever hold. With 0 about half the first pairs merge; a merge
    averages the two tethers, which makes the pair correlated (pearson ≈ 0.7), so they keep
    merging: the demo shows the federation converging within a short CPU run.
    """
    return Policy(trigger="every_publish", merge_threshold=0.0, drift_threshold=-0.5)


class UnknownPreset(KeyError):
    """A policy preset name that is not one (a KeyError whose text reads without quotes)."""

    def __str__(self) -> str:
        return str(self.args[0])


def preset_policy(name: str) -> Policy:
    """A preset by name, 'demo' included (UnknownPreset, a KeyError, naming the known ones)."""
    if name == "demo":
        return demo_policy()
    try:
        return policy_preset(name)
    except KeyError:
        known = ", ".join(["demo", *PRESETS])
        raise UnknownPreset(f"unknown policy preset {name!r}; known: {known}") from None


def resolve_policy(spec: str) -> Policy | str:
    """A preset name ('demo', 'default', 'seed', 'cka', 'clustered') or a JSON policy file; raises KeyError
    naming every preset for an unknown name."""
    if spec == "demo":
        return demo_policy()
    path = Path(spec)
    if path.suffix == ".json" or path.exists():
        return Policy.model_validate_json(path.read_text())
    preset_policy(spec)  # raises KeyError naming every preset, demo included
    return spec


def arm_policy(policy: Policy, arm: Arm, fedavg_every: int) -> Policy:
    """The policy a run of `arm` gives its federation.

    federated: `policy` as is. independent: the same workers publish, but no round ever fires
    (plateau trigger with both epsilons 0), so no decision is made or applied: the control.
    fedavg: every `fedavg_every` steps each worker's tethers become the federation mean
    (`Policy.fedavg_every`; see `tether_protocol.policy`). oracle: the same, but within each
    worker's own group (`Policy.fedavg_within = "group"`): clustered FL told the clusters, the
    upper bound a federation that must find them is measured against (IFCA, Ghosh et al. 2020).
    Neither has a merge gate: FedAvg averages whatever the averages do to a worker's loss.
    Every arm but independent keeps the policy's `sync_every`, and every arm its `merge_scope`.
    """
    if arm == "independent":
        return policy.model_copy(
            update={
                "trigger": "plateau",
                "loss_epsilon": 0.0,
                "grad_epsilon": 0.0,
                "fedavg_every": None,
                "sync_every": None,  # no round to wait for
                "pairing_by": "layer",  # nothing is paired
            }
        )
    if arm in ("fedavg", "oracle"):  # FedAvg averages unconditionally: no merge gate
        within = "group" if arm == "oracle" else "federation"
        update = {"fedavg_every": fedavg_every, "fedavg_within": within, "gate": None}
        return policy.model_copy(update=update | {"pairing_by": "layer"})  # scores pick no one
    return policy


# -- the plan ------------------------------------------------------------------------------------


class WorkerPlan(BaseModel):
    """One worker of a run: its group (the ground truth of who should merge), seeds, device,
    and its place in the run (`index`; `group_index`, the group's among the run's groups;
    `index_in_group` of `group_size`), which its task function sees as `WorkerInfo`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    group: str = "default"
    index: int = Field(default=0, ge=0)
    group_index: int = Field(default=0, ge=0)
    index_in_group: int = Field(default=0, ge=0)
    group_size: int = Field(default=1, ge=1)
    init_seed: int
    data_seed: int
    device: str = "cpu"
    options: WorkerOptions = Field(default_factory=WorkerOptions)


class RunPlan(BaseModel):
    """One federation to run: its workers, policy and arm (written as `config.json`)."""

    model_config = ConfigDict(extra="forbid")

    federation: str
    policy: Policy
    arm: str = Field(
        default="federated",
        description="The arm's name: a built-in arm (federated, independent, fedavg, oracle) or "
        "a variant a spec's [arm.<name>] table defines over one.",
    )
    init: Init = "independent"
    seed: int = 0
    workers: list[WorkerPlan]
    run_id: str | None = None
    repeat: int | None = None
    params: dict[str, Any] = Field(default_factory=dict, description="Experiment cell values.")


def plan_workers(
    groups: Sequence[tuple[str, int, WorkerOptions]], seed: int, init: Init, devices: int
) -> list[WorkerPlan]:
    """Workers of (group, count, options) triples, in order: worker i has data seed seed+i and
    init seed seed+i (independent) or seed (shared); devices cuda:i mod n (cpu when n is 0).
    Worker k of the g-th triple has group_index g, index_in_group k and group_size its count."""
    plans, i = [], 0
    for g, (group, count, options) in enumerate(groups):
        for k in range(count):
            plans.append(
                WorkerPlan(
                    name=f"worker-{i}",
                    group=group,
                    index=i,
                    group_index=g,
                    index_in_group=k,
                    group_size=count,
                    data_seed=seed + i,
                    init_seed=seed if init == "shared" else seed + i,
                    device=f"cuda:{i % devices}" if devices else "cpu",
                    options=options,
                )
            )
            i += 1
    return plans


def worker_argv(
    plan: WorkerPlan,
    url: str,
    federation: str,
    out: Path,
    peers: int,
    *,
    run_seed: int | None = None,
    repeat: int | None = None,
) -> list[str]:
    """`tetherfed worker` arguments of one planned worker (who waits for `peers` workers), with
    its place in the run: its indices, and the run's seed and repeat when given."""
    place = [
        "--worker-index",
        str(plan.index),
        "--group-index",
        str(plan.group_index),
        "--index-in-group",
        str(plan.index_in_group),
        "--group-size",
        str(plan.group_size),
    ]
    if run_seed is not None:
        place += ["--run-seed", str(run_seed)]
    if repeat is not None:
        place += ["--repeat", str(repeat)]
    return [
        "worker",
        "--coordinator",
        url,
        "--federation",
        federation,
        "--name",
        plan.name,
        "--wait-peers",
        str(peers),
        "--group",
        plan.group,
        "--init-seed",
        str(plan.init_seed),
        "--data-seed",
        str(plan.data_seed),
        "--device",
        plan.device,
        "--checkpoint-dir",
        str(out / plan.name),
        *place,
        *options_argv(plan.options),
    ]


# -- engines -------------------------------------------------------------------------------------


class Process(Protocol):
    """What the launcher needs of a started process (a `subprocess.Popen` is one)."""

    pid: int
    returncode: int | Any
    stdout: IO[str] | None

    def poll(self) -> int | None: ...


class Engine(Protocol):
    """How processes are started and stopped (`LocalEngine`, `_ray.RayEngine`)."""

    name: str

    def device_count(self, choice: str) -> int:
        """CUDA devices to spread workers over ('cpu': 0)."""
        ...

    def start_coordinator(self, out: Path, port: int, redis_url: str | None) -> Process:
        """A coordinator on 127.0.0.1:port, logging to out/coordinator.log; a process with a
        `url` attribute when it serves elsewhere (e.g. replicas on other machines)."""
        ...

    def start_worker(self, argv: list[str], log: Path, env: Mapping[str, str]) -> Process:
        """`tetherfed <argv>` with stdout readable (JSON lines) and stderr appended to `log`;
        `env` adds to its environment (secrets travel there, never on a command line)."""
        ...

    def stop(self, procs: Iterable[Process]) -> None:
        """Stop processes (gracefully first); returns once they are gone."""
        ...


def _alive(proc: Process) -> bool:
    return proc.poll() is None


def stop_processes(procs: Iterable[subprocess.Popen[Any]], grace_s: float = GRACE_S) -> None:
    """SIGTERM each live process, wait up to `grace_s`, SIGKILL the rest; then kill what is
    left of each one's own session (e.g. the coordinator's redis-server) by its group id."""
    procs = list(procs)
    for proc in procs:
        if _alive(proc):
            proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        if _alive(proc):
            proc.kill()
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # pgid = pid: started with start_new_session


def _spawn(
    cmd: list[str],
    stdout: IO[Any] | int,
    stderr: IO[Any] | int,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd,
        stdout=stdout,
        stderr=stderr,
        env={**os.environ, **env} if env else None,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # Ctrl-C goes to the launcher only; it stops children itself
    )


@dataclass
class LocalEngine:
    """Processes on this machine (`python -m tetherfed.cli …`), each in its own session."""

    name: str = "local"
    grace_s: float = GRACE_S
    redis_url: str | None = None  # the coordinator's Redis (None: embedded, under out/redis)

    def device_count(self, choice: str) -> int:
        """CUDA devices visible here (0 for 'cpu' or without torch)."""
        if choice == "cpu":
            return 0
        try:
            import torch  # noqa: PLC0415 (only when spreading over GPUs)
        except ImportError:
            return 0
        return int(torch.cuda.device_count())

    def start_coordinator(self, out: Path, port: int, redis_url: str | None) -> Process:
        """`python -m tetherfed_coordinator`, embedded Redis under out/redis unless redis_url
        (or the engine's)."""
        cmd = [
            sys.executable,
            "-m",
            "tetherfed_coordinator",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        redis_url = redis_url or self.redis_url
        cmd += ["--redis-url", redis_url] if redis_url else ["--data-dir", str(out / "redis")]
        with (out / "coordinator.log").open("a") as log:
            return _spawn(cmd, log, subprocess.STDOUT)

    def start_worker(self, argv: list[str], log: Path, env: Mapping[str, str]) -> Process:
        """`python -m tetherfed.cli <argv>` with `env` added to its environment, stdout piped."""
        with log.open("a") as err:
            cmd = [sys.executable, "-m", "tetherfed.cli", *argv]
            return _spawn(cmd, subprocess.PIPE, err, env)

    def stop(self, procs: Iterable[Process]) -> None:
        """SIGTERM, grace period, SIGKILL, then the rest of each session."""
        stop_processes(procs, self.grace_s)  # type: ignore[arg-type]


# -- coordinator ---------------------------------------------------------------------------------


class CoordinatorUnreachable(RuntimeError):
    """The coordinator did not become ready (the message says why)."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, proc: Process | None, timeout_s: float) -> str | None:
    """None once GET /readyz answers 200; else why not (process exited, or timed out)."""
    deadline = time.monotonic() + timeout_s
    with Client(url, retry=RetryPolicy(tries=1), timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc is not None and not _alive(proc):
                return f"the coordinator exited with code {proc.returncode}"
            with contextlib.suppress(TetherError):
                client.readyz()
                return None
            time.sleep(0.1)
    return f"the coordinator at {url} was not ready within {timeout_s:g}s"


@dataclass
class Coordinator:
    """A coordinator URL, and its process when we started it."""

    url: str
    process: Process | None = None
    token: str | None = None

    def client(self) -> Client:
        """A short-retry SDK client of it."""
        return Client(self.url, token=self.token, retry=QUICK, timeout=5.0)


def start_coordinator(
    engine: Engine,
    out: Path,
    ready_timeout: float,
    redis_url: str | None = None,
    on_start: Callable[[Process], None] | None = None,
) -> Coordinator:
    """Start a coordinator and wait until it is ready (CoordinatorUnreachable otherwise; the
    process is then stopped). `on_start` sees the process first (to record its PID)."""
    port = free_port()
    proc = engine.start_coordinator(out, port, redis_url)
    if on_start is not None:
        on_start(proc)
    coordinator = Coordinator(getattr(proc, "url", None) or f"http://127.0.0.1:{port}", proc)
    problem = wait_ready(coordinator.url, proc, ready_timeout)
    if problem is not None:
        engine.stop([proc])
        raise CoordinatorUnreachable(problem)
    return coordinator


@contextlib.contextmanager
def coordinator_for(
    engine: Engine, out: Path, url: str | None, token: str | None, ready_timeout: float
) -> Iterator[Coordinator]:
    """`url` when given (checked ready), else our own coordinator, stopped on exit."""
    if url is not None:
        problem = wait_ready(url, None, ready_timeout)
        if problem is not None:
            raise CoordinatorUnreachable(problem)
        yield Coordinator(url, None, token)
        return
    coordinator = start_coordinator(engine, out, ready_timeout)
    try:
        yield coordinator
    finally:
        if coordinator.process is not None:
            engine.stop([coordinator.process])


def create_federation(client: Client, name: str, policy: Policy | str) -> None:
    """Create the federation; an existing one of that name is reused."""
    try:
        client.create_federation(name, policy)
    except ConflictError:
        client.get_federation(name)


# -- state ---------------------------------------------------------------------------------------


PACE = ("publishes", "publishes_skipped", "merges_per_100_steps")  # in step and done events


@dataclass
class WorkerRow:
    """One worker as the tables show it. `publishes`: tether publishes sent;
    `publishes_skipped`: scheduled publishes its I/O budget skipped (a later snapshot went
    instead); `merges_per_100_steps`: merges it applied per 100 steps. `waiting`: why the
    engine has not started it yet (status `pending`; Ray: the resources its actor waits for).
    `holds`: scoring rounds that decided nothing for it, by hold code (its last event's)."""

    name: str
    status: str = "starting"
    group: str | None = None
    worker_id: str | None = None
    step: int = 0
    total: int | None = None
    epoch: int | None = None
    loss: float | None = None
    val_loss: float | None = None
    generation: int = 0
    merges: int = 0
    drifts: int = 0
    rejected: int = 0
    steps_per_s: float | None = None
    publishes: int = 0
    publishes_skipped: int = 0
    merges_per_100_steps: float | None = None
    exit_code: int | None = None
    waiting: str | None = None
    holds: dict[str, int] = field(default_factory=dict)

    def update(self, event: dict[str, Any]) -> None:
        """Fold one JSON line of the worker's stdout into the row."""
        self.worker_id = event.get("worker_id") or self.worker_id
        self.holds = event.get("holds", self.holds)
        if event.get("event") == "step":
            self.status, self.waiting = "running", None
            for key in (
                "step",
                "total",
                "epoch",
                "loss",
                "val_loss",
                "generation",
                "merges",
                "drifts",
                "rejected",
                "steps_per_s",
                *PACE,
            ):
                setattr(self, key, event.get(key, getattr(self, key)))
        elif event.get("event") == "done":
            self.val_loss = event.get("val_loss", self.val_loss)
            self.merges = event.get("merge", self.merges)
            self.drifts = event.get("drift", self.drifts)
            self.rejected = event.get("rejected", self.rejected)
            for key in PACE:
                setattr(self, key, event.get(key, getattr(self, key)))


@dataclass
class Tally:
    """Decisions of a federation, read incrementally with the `after` cursor (kept in order)."""

    by_action: Counter[str] = field(default_factory=Counter)
    edges: Counter[tuple[str, str]] = field(default_factory=Counter)
    per_worker: Counter[tuple[str, str]] = field(default_factory=Counter)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    cursor: int = 0
    started: float = field(default_factory=time.monotonic)
    keep: bool = False  # keep every decision (for decisions.jsonl)

    def update(self, client: Client, fed: str) -> None:
        """Read the decisions issued since the last call."""
        while True:
            page = client.decisions(fed, after=self.cursor, limit=10_000)
            for d in page.data:
                self.by_action[d.action] += 1
                self.per_worker[(d.worker_id, d.action)] += 1
                if d.action == "merge" and d.partner_id:
                    self.edges[(d.worker_id, d.partner_id)] += 1
                if self.keep:
                    self.decisions.append(d.model_dump(mode="json"))
            self.cursor = page.last_id
            if page.count < 10_000:
                return

    @property
    def total(self) -> int:
        """Decisions counted so far."""
        return sum(self.by_action.values())

    def rate(self) -> float:
        """Decisions per second since the tally started."""
        return self.total / max(time.monotonic() - self.started, 1e-9)

    def line(self) -> str:
        """'N decisions (merge a, hold b), r/s'."""
        actions = ", ".join(f"{a} {n}" for a, n in sorted(self.by_action.items())) or "none yet"
        return f"{self.total} decisions ({actions}), {self.rate():.1f}/s"


def set_aside(out: Path) -> Path | None:
    """Move an earlier run out of `out` before a new run starts there; where it went (`out.1`,
    `out.2`, … the first free name), or None when `out` holds nothing.

    A second run into the same folder would otherwise continue the first one's embedded Redis and
    federation and append to its logs, mixing both runs in the summary and the report. Nothing is
    deleted. OSError when the folder cannot be moved (the run must not start then)."""
    if not out.is_dir() or not any(out.iterdir()):
        return None
    n = 1
    while out.with_name(f"{out.name}.{n}").exists():
        n += 1
    target = out.with_name(f"{out.name}.{n}")
    out.rename(target)
    return target


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` atomically: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _read_events(stream: IO[str], row: WorkerRow) -> None:
    for line in stream:
        with contextlib.suppress(json.JSONDecodeError, AttributeError):
            row.update(json.loads(line))


class View(Protocol):
    """What the launcher tells while it supervises (a rich live table, plain lines, nothing)."""

    def refresh(self, launcher: Launcher, force: bool = False) -> None: ...


class Interrupted(Exception):
    """The run was asked to stop (Ctrl-C, SIGTERM, or the caller's stop event)."""


# -- the launcher --------------------------------------------------------------------------------


class Launcher:
    """One run: starts its workers against a coordinator, supervises them, writes the folder."""

    def __init__(
        self,
        plan: RunPlan,
        out: Path,
        engine: Engine | None = None,
        resume: bool = False,
        runs_at_once: int = 1,
    ) -> None:
        self.plan, self.out, self.resume = plan, out, resume
        self.runs_at_once = runs_at_once
        self.engine: Engine = engine or LocalEngine()
        self.coordinator: Coordinator | None = None
        self.workers: dict[str, Process] = {}
        self.rows = {w.name: WorkerRow(w.name, group=w.group) for w in plan.workers}
        self.readers: list[threading.Thread] = []
        self.tally = Tally(keep=True)
        self.failures: list[str] = []
        self.warnings: list[str] = init_warnings(plan, {})
        self.state: RunState = "pending"
        self.started = time.monotonic()
        self._last_status = 0.0
        out.mkdir(parents=True, exist_ok=True)

    # -- folder
    def write_config(self) -> None:
        """config.json: the resolved run."""
        write_json_atomic(self.out / "config.json", self.plan.model_dump(mode="json"))

    def write_pids(self) -> None:
        """pids.json: every PID started (tests check that none outlives the launcher)."""
        proc = self.coordinator.process if self.coordinator else None
        pids = {
            "launcher": os.getpid(),
            "coordinator": proc.pid if proc else None,
            "workers": {name: p.pid for name, p in self.workers.items()},
        }
        write_json_atomic(self.out / "pids.json", pids)

    def write_status(self, force: bool = False) -> None:
        """status.json (atomic), at most once a second unless forced."""
        if not force and time.monotonic() - self._last_status < STATUS_EVERY_S:
            return
        self._last_status = time.monotonic()
        status = {
            "state": self.state,
            "run_id": self.plan.run_id,
            "updated_at": _now(),
            "elapsed_s": round(time.monotonic() - self.started, 2),
            "federation": self.plan.federation,
            "failures": self.failures,
            "warnings": self.warnings,
            "decisions": dict(self.tally.by_action),
            "workers": [asdict(r) for r in self.rows.values()],
        }
        write_json_atomic(self.out / "status.json", status)

    def write_decisions(self, client: Client) -> None:
        """decisions.jsonl: every decision with the worker's ack (null when none: holds, or a
        worker stopped before acking). Acks are read 8 at a time (one GET each)."""
        acted = [d["id"] for d in self.tally.decisions if d["action"] != "hold"]
        with ThreadPoolExecutor(max_workers=8) as pool:
            acks = dict(zip(acted, pool.map(lambda i: self._ack(client, i), acted), strict=True))
        with (self.out / "decisions.jsonl").open("w") as f:
            for d in self.tally.decisions:
                f.write(json.dumps({**d, "ack": acks.get(d["id"])}) + "\n")

    def _ack(self, client: Client, decision_id: int) -> dict[str, Any] | None:
        try:
            return client.get_ack(self.plan.federation, decision_id).model_dump(mode="json")
        except NotFoundError:
            return None

    # -- processes
    def start_workers(self, coordinator: Coordinator) -> None:
        """Start every planned worker against `coordinator`."""
        self.coordinator = coordinator
        for plan in self.plan.workers:
            peers = len(self.plan.workers)
            argv = worker_argv(
                plan,
                coordinator.url,
                self.plan.federation,
                self.out,
                peers,
                run_seed=self.plan.seed,
                repeat=self.plan.repeat,
            )
            if self.resume and (self.out / plan.name / "latest.pt").exists():
                argv.append("--resume")
            threads = self.worker_threads()
            if threads is not None:
                argv += ["--threads", str(threads)]
            # The token goes through the environment: a command line is visible to every user.
            env = {TOKEN_ENV: coordinator.token} if coordinator.token else {}
            proc = self.engine.start_worker(argv, self.out / f"{plan.name}.log", env)
            self.workers[plan.name] = proc
            if proc.stdout is not None:
                reader = threading.Thread(
                    target=_read_events, args=(proc.stdout, self.rows[plan.name]), daemon=True
                )
                reader.start()
                self.readers.append(reader)
        self.write_pids()

    def worker_threads(self) -> int | None:
        """torch threads per local worker: this machine's cores shared by every worker of the
        runs going at once (torch's default, every core per process, oversubscribes a machine
        N-fold with N workers). None where the user set OMP_NUM_THREADS or another engine places
        workers (Ray gives each actor its `num_cpus`)."""
        if self.engine.name != "local" or os.environ.get("OMP_NUM_THREADS"):
            return None
        sharing = len(self.plan.workers) * max(self.runs_at_once, 1)
        return max(1, (os.cpu_count() or 1) // sharing)

    def poll(self) -> bool:
        """Update statuses; True while any worker is still running and nothing failed."""
        for name, proc in self.workers.items():
            code, row = proc.poll(), self.rows[name]
            if code is None and row.status in ("starting", "pending"):
                row.waiting = getattr(proc, "waiting", None)  # an engine that knows why (Ray)
                row.status = "pending" if row.waiting else "starting"
            if code is None or row.exit_code is not None:
                continue
            row.exit_code = code
            row.status = "done" if code == 0 else f"failed (exit {code})"
            if code != 0:
                self.failures.append(
                    getattr(proc, "failure", None)  # an engine's reason for giving it up
                    or f"{name} exited with code {code}; see {self.out / f'{name}.log'}"
                )
        coordinator = self.coordinator.process if self.coordinator else None
        if coordinator is not None and not _alive(coordinator):
            self.failures.append(f"the coordinator exited with code {coordinator.returncode}")
        return not self.failures and any(_alive(p) for p in self.workers.values())

    def supervise(self, view: View | None, stop: threading.Event | None) -> None:
        """Refresh the view and status.json until every worker has exited or one failed;
        `Interrupted` when `stop` is set."""
        assert self.coordinator is not None
        with self.coordinator.client() as client:
            while self.poll():
                if stop is not None and stop.is_set():
                    raise Interrupted
                self._tally(client)
                self.write_status()
                if view is not None:
                    view.refresh(self)
                time.sleep(TICK_S)
            self._tally(client)

    def stop_workers(self) -> None:
        """Stop every worker still running, then let the readers drain."""
        running = [name for name, proc in self.workers.items() if _alive(proc)]
        self.engine.stop(self.workers.values())
        for reader in self.readers:
            reader.join(timeout=5)
        for name, proc in self.workers.items():
            self.rows[name].exit_code = proc.returncode
        for name in running:  # after the readers: a step event read late must not say running
            self.rows[name].status = "stopped"

    def _tally(self, client: Client) -> None:
        with contextlib.suppress(TetherError):
            self.tally.update(client, self.plan.federation)

    # -- summary
    def summary(self, outcome: str, code: int) -> dict[str, Any]:
        """Everything the summary prints, as JSON-ready data."""
        names = {r.worker_id: r.name for r in self.rows.values() if r.worker_id}
        edges = [
            {"worker": names.get(a, a), "partner": names.get(b, b), "merges": n}
            for (a, b), n in sorted(self.tally.edges.items())
        ]
        rows = list(self.rows.values())
        out = self.out
        return {
            "outcome": outcome,
            "state": self.state,
            "exit_code": code,
            "failures": self.failures,
            "run_id": self.plan.run_id,
            "arm": self.plan.arm,
            "coordinator": self.coordinator.url if self.coordinator else None,
            "federation": self.plan.federation,
            "wall_s": round(time.monotonic() - self.started, 2),
            "workers": [asdict(r) for r in rows],
            "decisions": {
                "total": self.tally.total,
                "by_action": dict(self.tally.by_action),
                "per_s": round(self.tally.rate(), 3),
            },
            "acknowledged": {
                "applied": sum(r.merges + r.drifts for r in rows),
                "rejected": sum(r.rejected for r in rows),
            },
            "merge_graph": edges,
            "paths": {
                "logs": str(out / "worker-*.log"),
                "coordinator_log": str(out / "coordinator.log"),
                "metrics": str(out / "worker-*" / "metrics.jsonl"),
                "checkpoints": str(out / "worker-*"),
                "decisions": str(out / "decisions.jsonl"),
                "summary": str(out / "summary.json"),
            },
        }

    def finish(self, outcome: str, code: int, state: RunState) -> dict[str, Any]:
        """Stop the workers, record decisions and acks, write summary.json and status.json."""
        self.stop_workers()
        if self.coordinator is not None and self.coordinator.url:
            with contextlib.suppress(TetherError), self.coordinator.client() as client:
                self._tally(client)
                self.write_decisions(client)
                digests = {
                    w.name: str(w.meta[INIT_DIGEST])
                    for w in client.list_workers(self.plan.federation).data
                    if w.meta.get(INIT_DIGEST) is not None
                }
                self.warnings.extend(init_warnings(self.plan, digests))
        self.state = state
        summary = self.summary(outcome, code)
        write_json_atomic(self.out / "summary.json", summary)
        self.write_status(force=True)
        return summary


def init_warnings(plan: RunPlan, digests: Mapping[str, str]) -> list[str]:
    """Why a run's merges may mean nothing: a `merge_scope` that averages weights (weights,
    model) across workers that did not start from one init, known from the plan (`init =
    independent`) or from the workers' registered `init_digest`s (worker name → digest) when
    more than one differs. Averaging independently initialised networks needs their units
    aligned first (Git Re-Basin, Ainsworth et al. 2023), which tetherfed does not do."""
    scope = plan.policy.merge_scope
    if scope == "tethers" or len(plan.workers) < 2:
        return []
    why = "averaging independently initialised weights means nothing without aligning them"
    if plan.init != "shared":
        return [
            f"merge_scope {scope!r} averages weights, but the workers start from independent "
            f"inits (init = {plan.init!r}): {why}; use init = 'shared' or merge_scope 'tethers'"
        ]
    by_digest: dict[str, list[str]] = {}
    for name, digest in sorted(digests.items()):
        by_digest.setdefault(digest, []).append(name)
    if len(by_digest) < 2:
        return []
    groups = "; ".join(", ".join(names) for names in by_digest.values())
    return [
        f"merge_scope {scope!r} averages weights, but the workers registered "
        f"{len(by_digest)} different initial parameters ({groups}): {why}"
    ]


# -- one run, start to end -----------------------------------------------------------------------


@dataclass
class RunResult:
    """How a run ended: its state, exit code and summary (as written to summary.json)."""

    state: RunState
    code: int
    summary: dict[str, Any]


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM acts as Ctrl-C while the run goes (only the main thread may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """Cleanup must not be cut short by a second Ctrl-C (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _boot(launcher: Launcher, url: str | None, token: str | None, timeout: float) -> Coordinator:
    if url is not None:
        problem = wait_ready(url, None, timeout)
        if problem is not None:
            raise CoordinatorUnreachable(problem)
        return Coordinator(url, None, token)

    def record(proc: Process) -> None:
        launcher.coordinator = Coordinator("", proc)
        launcher.write_pids()

    return start_coordinator(launcher.engine, launcher.out, timeout, on_start=record)


def _go(
    launcher: Launcher,
    coordinator: Coordinator | None,
    url: str | None,
    token: str | None,
    ready_timeout: float,
    view: View | None,
    stop: threading.Event | None,
) -> None:
    coordinator = coordinator or _boot(launcher, url, token, ready_timeout)
    launcher.coordinator = coordinator
    with coordinator.client() as client:
        create_federation(client, launcher.plan.federation, launcher.plan.policy)
    launcher.state = "running"
    launcher.start_workers(coordinator)
    launcher.write_status(force=True)
    launcher.supervise(view, stop)


def launch(
    plan: RunPlan,
    out: Path,
    *,
    coordinator: Coordinator | None = None,
    url: str | None = None,
    token: str | None = None,
    ready_timeout: float = 30.0,
    engine: Engine | None = None,
    view: View | None = None,
    stop: threading.Event | None = None,
    resume: bool = False,
    runs_at_once: int = 1,
) -> RunResult:
    """Run one federation to the end and write its folder under `out`.

    The coordinator is `coordinator` (shared, already running), else `url`, else one we start
    for this run (embedded Redis, stopped at the end). Ctrl-C, SIGTERM or `stop` end the run as
    interrupted; a failing worker stops the others. Never raises for those outcomes. `resume`:
    workers that left a checkpoint in the folder continue from it. `runs_at_once`: runs sharing
    this machine's cores (an experiment's `jobs`), for each worker's torch threads.
    """
    launcher = Launcher(plan, out.resolve(), engine, resume, runs_at_once)
    launcher.write_config()
    launcher.write_status(force=True)
    state, code, outcome = "finished", EXIT_OK, "finished ok"
    with sigterm_as_interrupt():
        try:
            _go(launcher, coordinator, url, token, ready_timeout, view, stop)
            if launcher.failures:
                state, code, outcome = "failed", EXIT_FAILED, "failed"
        except CoordinatorUnreachable as exc:
            launcher.failures.append(str(exc))
            state, code, outcome = "unreachable", EXIT_UNREACHABLE, "coordinator unreachable"
        except (KeyboardInterrupt, Interrupted):
            state, code, outcome = "interrupted", EXIT_INTERRUPTED, "interrupted"
        except TetherError as exc:
            launcher.failures.append(f"coordinator error: {exc}")
            state, code, outcome = "failed", EXIT_FAILED, "failed"
        with _uninterruptible():
            summary = launcher.finish(outcome, code, state)  # type: ignore[arg-type]
            _stop_own_coordinator(launcher, coordinator)
    if view is not None:
        view.refresh(launcher, force=True)
    return RunResult(state, code, summary)  # type: ignore[arg-type]


def _stop_own_coordinator(launcher: Launcher, shared: Coordinator | None) -> None:
    own = launcher.coordinator
    if shared is None and own is not None and own.process is not None:
        launcher.engine.stop([own.process])
