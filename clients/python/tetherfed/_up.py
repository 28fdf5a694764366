"""`tetherfed up` (a local ensemble: coordinator + N workers as processes) and `tetherfed status`.

`up` starts every process in its own session, so a Ctrl-C reaches only us; we then stop what we
started, by PID (SIGTERM, a grace period, SIGKILL), and print a summary. It writes, under --out:
`pids.json` (every PID it started), `coordinator.log`, `worker-i.log` (stderr), `worker-i/`
(checkpoints and `metrics.jsonl`) and `summary.json`.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tether_protocol.messages import Policy, policy_preset

from ._errors import ConflictError, NotFoundError, TetherError, TransportError
from ._pictures import report_line
from ._retry import RetryPolicy
from ._sdk import Client

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
GRACE_S = 10.0  # SIGTERM → SIGKILL
TICK_S = 0.25
PLAIN_EVERY_S = 2.0
QUICK = RetryPolicy(tries=2, deadline_s=2.0)


def demo_policy() -> Policy:
    """The demo default of `tetherfed up`: score on every publish, merge when pearson > 0.

    Distinct seeds give independent U[0,1) static tethers, pearson ≈ 0 ± 0.02, so the default
    threshold (0.5) would only ever hold. With 0 about half the first pairs merge; a merge
    averages the two tethers, which makes the pair correlated (pearson ≈ 0.7), so they keep
    merging: the demo shows the federation converging within a short CPU run.
    """
    return Policy(trigger="every_publish", merge_threshold=0.0, drift_threshold=-0.5)


def resolve_policy(spec: str) -> Policy | str:
    """A preset name ('demo', 'default', 'seed') or a JSON policy file."""
    if spec == "demo":
        return demo_policy()
    path = Path(spec)
    if path.suffix == ".json" or path.exists():
        return Policy.model_validate_json(path.read_text())
    policy_preset(spec)  # raises KeyError naming the known presets
    return spec


# -- arguments -----------------------------------------------------------------------------------


def add_up_parsers(sub: Any) -> None:
    """Add the `up` and `status` subcommands to cli.py's subparsers."""
    from .cli import add_worker_args  # noqa: PLC0415 (cli imports this module)

    up = sub.add_parser("up", help="run a local ensemble: coordinator + N workers")
    up.add_argument("--workers", type=int, default=2, help="number of worker processes")
    up.add_argument("--coordinator", default=None, help="coordinator URL (none: start our own)")
    up.add_argument("--token", default=None, help="bearer token of that coordinator")
    up.add_argument("--federation", default="local")
    up.add_argument("--policy", default="demo", help="preset (demo, default, seed) or JSON file")
    up.add_argument("--out", type=Path, default=None, help="results folder (default runs/<time>)")
    up.add_argument("--device", choices=["auto", "cpu"], default="auto",
                    help="auto: one CUDA device per worker, round-robin, when any exist")  # fmt: skip
    up.add_argument("--seed", type=int, default=0, help="worker i gets seed+i")
    up.add_argument("--ready-timeout", type=float, default=30.0, help="seconds to wait for /readyz")
    add_worker_args(up)
    up.set_defaults(handler=run_up)

    status = sub.add_parser("status", help="worker table and decisions of a running coordinator")
    status.add_argument("--coordinator", default="http://127.0.0.1:8420")
    status.add_argument("--token", default=None)
    status.add_argument("--federation", default=None, help="one federation (default: all)")
    status.set_defaults(handler=run_status)


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The `tetherfed worker` options of `args` (those add_worker_args defines), as argv."""
    from .cli import add_worker_args  # noqa: PLC0415 (cli imports this module)

    spec = argparse.ArgumentParser(add_help=False)
    add_worker_args(spec)
    argv: list[str] = []
    for action in spec._actions:
        value = getattr(args, action.dest, None)
        flag = action.option_strings[0]
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        else:
            for item in value if isinstance(value, list) else [value]:
                argv += [flag, str(item)]
    return argv


# -- state ---------------------------------------------------------------------------------------


@dataclass
class WorkerRow:
    """One worker as the table shows it."""

    name: str
    status: str = "starting"
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
    exit_code: int | None = None

    def update(self, event: dict[str, Any]) -> None:
        """Fold one JSON line of the worker's stdout into the row."""
        self.worker_id = event.get("worker_id") or self.worker_id
        if event.get("event") == "step":
            self.status = "running"
            for key in ("step", "total", "epoch", "loss", "val_loss", "generation", "merges", "drifts", "rejected"):  # fmt: skip
                setattr(self, key, event.get(key, getattr(self, key)))
        elif event.get("event") == "done":
            self.val_loss = event.get("val_loss", self.val_loss)
            self.merges, self.drifts = (
                event.get("merge", self.merges),
                event.get("drift", self.drifts),
            )
            self.rejected = event.get("rejected", self.rejected)


@dataclass
class Tally:
    """Decisions of a federation, read incrementally with the `after` cursor."""

    by_action: Counter[str] = field(default_factory=Counter)
    edges: Counter[tuple[str, str]] = field(default_factory=Counter)
    per_worker: Counter[tuple[str, str]] = field(default_factory=Counter)
    cursor: int = 0
    started: float = field(default_factory=time.monotonic)

    def update(self, client: Client, fed: str) -> None:
        """Read the decisions issued since the last call."""
        while True:
            page = client.decisions(fed, after=self.cursor, limit=10_000)
            for d in page.data:
                self.by_action[d.action] += 1
                self.per_worker[(d.worker_id, d.action)] += 1
                if d.action == "merge" and d.partner_id:
                    self.edges[(d.worker_id, d.partner_id)] += 1
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


# -- processes -----------------------------------------------------------------------------------


def _alive(proc: subprocess.Popen[Any]) -> bool:
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


def _spawn(cmd: list[str], stdout: IO[Any] | int, stderr: IO[Any] | int,
           env: dict[str, str] | None = None) -> subprocess.Popen[str]:  # fmt: skip
    return subprocess.Popen(
        cmd, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env, text=True,
        start_new_session=True,  # Ctrl-C goes to `up` only; we stop children ourselves
    )  # fmt: skip


def start_coordinator(out: Path, port: int) -> subprocess.Popen[str]:
    """`python -m tetherfed_coordinator` on 127.0.0.1:port with its embedded Redis under out."""
    cmd = [sys.executable, "-m", "tetherfed_coordinator", "--host", "127.0.0.1",
           "--port", str(port), "--data-dir", str(out / "redis")]  # fmt: skip
    with (out / "coordinator.log").open("a") as log:
        return _spawn(cmd, log, subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen[str] | None, timeout_s: float) -> str | None:
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


def cuda_devices(choice: str) -> int:
    """CUDA devices to spread workers over (0: CPU)."""
    if choice == "cpu":
        return 0
    try:
        import torch  # noqa: PLC0415 (only when spreading over GPUs)
    except ImportError:
        return 0
    return int(torch.cuda.device_count())


def _read_events(stream: IO[str], row: WorkerRow) -> None:
    for line in stream:
        with contextlib.suppress(json.JSONDecodeError, AttributeError):
            row.update(json.loads(line))


# -- the launcher --------------------------------------------------------------------------------


class Ensemble:
    """The processes `up` started and what their output said."""

    def __init__(self, args: argparse.Namespace, out: Path, url: str) -> None:
        self.args, self.out, self.url = args, out, url
        self.coordinator: subprocess.Popen[str] | None = None
        self.workers: dict[str, subprocess.Popen[str]] = {}
        self.rows: dict[str, WorkerRow] = {}
        self.readers: list[threading.Thread] = []
        self.tally = Tally()
        self.failures: list[str] = []

    def write_pids(self) -> None:
        """Record every PID started (tests check that none outlives `up`)."""
        pids = {"up": os.getpid(), "coordinator": self.coordinator.pid if self.coordinator else None,
                "workers": {name: p.pid for name, p in self.workers.items()}}  # fmt: skip
        (self.out / "pids.json").write_text(json.dumps(pids, indent=2))

    def start_workers(self, n: int) -> None:
        """Start N workers: distinct seeds, one CUDA device each round-robin when any exist."""
        ngpu = cuda_devices(self.args.device)
        for i in range(n):
            name = f"worker-{i}"
            device = f"cuda:{i % ngpu}" if ngpu else "cpu"
            cmd = [sys.executable, "-m", "tetherfed.cli", "worker", "--coordinator", self.url,
                   "--federation", self.args.federation, "--name", name,
                   "--seed", str(self.args.seed + i), "--device", device,
                   "--checkpoint-dir", str(self.out / name), *worker_argv(self.args)]  # fmt: skip
            if self.args.token:
                cmd += ["--token", self.args.token]
            with (self.out / f"{name}.log").open("a") as log:
                proc = _spawn(cmd, subprocess.PIPE, log)
            self.workers[name], self.rows[name] = proc, WorkerRow(name)
            reader = threading.Thread(target=_read_events, args=(proc.stdout, self.rows[name]), daemon=True)  # fmt: skip
            reader.start()
            self.readers.append(reader)
        self.write_pids()

    def poll(self) -> bool:
        """Update statuses; True while every worker is still running and nothing failed."""
        for name, proc in self.workers.items():
            code, row = proc.poll(), self.rows[name]
            if code is None or row.exit_code is not None:
                continue
            row.exit_code = code
            row.status = "done" if code == 0 else f"failed (exit {code})"
            if code != 0:
                self.failures.append(
                    f"{name} exited with code {code}; see {self.out / f'{name}.log'}"
                )
        if self.coordinator is not None and not _alive(self.coordinator):
            self.failures.append(f"the coordinator exited with code {self.coordinator.returncode}")
        return not self.failures and any(_alive(p) for p in self.workers.values())

    def stop_workers(self) -> None:
        """Stop every worker still running, then let the readers drain."""
        for name, proc in self.workers.items():
            if _alive(proc):
                self.rows[name].status = "stopped"
        stop_processes(self.workers.values())
        for reader in self.readers:
            reader.join(timeout=5)
        for name, proc in self.workers.items():
            self.rows[name].exit_code = proc.returncode

    def stop_coordinator(self) -> None:
        """Stop our coordinator (it stops its embedded Redis)."""
        if self.coordinator is not None:
            stop_processes([self.coordinator])


# -- rendering -----------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def worker_table(rows: Iterable[WorkerRow], title: str = "workers") -> Table:
    """The per-worker table (shared by `up` and `status`)."""
    table = Table(title=title)
    for column in (
        "worker",
        "status",
        "step",
        "epoch",
        "loss",
        "val loss",
        "gen",
        "merges",
        "drifts",
    ):
        table.add_column(column, no_wrap=True)
    for r in rows:
        step = f"{r.step}/{r.total}" if r.total else str(r.step)
        table.add_row(r.name, r.status, step, str(r.epoch if r.epoch is not None else "-"),
                      _fmt(r.loss), _fmt(r.val_loss), str(r.generation), str(r.merges), str(r.drifts))  # fmt: skip
    return table


def plain_line(ens: Ensemble, elapsed: float) -> str:
    """One progress line for non-terminals (CI, tests)."""
    workers = "; ".join(f"{r.name} {r.status} {r.step}/{r.total or '?'} loss {_fmt(r.loss)}" for r in ens.rows.values())  # fmt: skip
    return f"[up {elapsed:5.1f}s] {ens.tally.line()} | {workers}"


class View:
    """A rich Live table with a progress bar on a terminal; plain lines otherwise."""

    def __init__(self, ens: Ensemble, console: Console) -> None:
        self.ens, self.console = ens, console
        self.started = self.last_plain = time.monotonic()
        self.progress = Progress(TextColumn("steps"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())  # fmt: skip
        self.task = self.progress.add_task("steps", total=None)
        self.live = Live(console=console, refresh_per_second=4) if console.is_terminal else None

    def __enter__(self) -> View:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.refresh(force=True)
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def refresh(self, force: bool = False) -> None:
        """Redraw (terminal) or print a line every few seconds (otherwise)."""
        rows = list(self.ens.rows.values())
        totals = [r.total for r in rows]
        total = sum(t for t in totals if t) if all(totals) else None
        self.progress.update(self.task, completed=sum(r.step for r in rows), total=total)
        if self.live is not None:
            footer = f"federation {self.ens.args.federation}: {self.ens.tally.line()}"
            self.live.update(Group(worker_table(rows), footer, self.progress))
        elif force or time.monotonic() - self.last_plain >= PLAIN_EVERY_S:
            self.last_plain = time.monotonic()
            print(plain_line(self.ens, self.last_plain - self.started), flush=True)


# -- summary -------------------------------------------------------------------------------------


def _names(ens: Ensemble) -> dict[str, str]:
    return {r.worker_id: r.name for r in ens.rows.values() if r.worker_id}


def build_summary(ens: Ensemble, outcome: str, code: int) -> dict[str, Any]:
    """Everything the summary prints, as JSON-ready data."""
    names = _names(ens)
    edges = [{"worker": names.get(a, a), "partner": names.get(b, b), "merges": n}
             for (a, b), n in sorted(ens.tally.edges.items())]  # fmt: skip
    rows = list(ens.rows.values())
    return {
        "outcome": outcome, "exit_code": code, "failures": ens.failures,
        "coordinator": ens.url, "federation": ens.args.federation,
        "workers": [asdict(r) for r in rows],
        "decisions": {"total": ens.tally.total, "by_action": dict(ens.tally.by_action),
                      "per_s": round(ens.tally.rate(), 3)},
        "acknowledged": {"applied": sum(r.merges + r.drifts for r in rows),
                         "rejected": sum(r.rejected for r in rows)},
        "merge_graph": edges,
        "paths": {"logs": str(ens.out / "worker-*.log"), "coordinator_log": str(ens.out / "coordinator.log"),
                  "metrics": str(ens.out / "worker-*" / "metrics.jsonl"),
                  "checkpoints": str(ens.out / "worker-*"), "summary": str(ens.out / "summary.json")},
    }  # fmt: skip


def summary_lines(s: dict[str, Any]) -> Iterator[str]:
    """The plain-text summary."""
    yield f"tetherfed up: {s['outcome']} (exit code {s['exit_code']})"
    for failure in s["failures"]:
        yield f"  FAILED: {failure}"
    yield "final loss per worker:"
    for w in s["workers"]:
        yield (f"  {w['name']:<10} {w['status']:<16} step {w['step']}/{w['total']}  loss {_fmt(w['loss'])}"
               f"  val_loss {_fmt(w['val_loss'])}  merges {w['merges']}  drifts {w['drifts']}")  # fmt: skip
    d, ack = s["decisions"], s["acknowledged"]
    actions = ", ".join(f"{a} {n}" for a, n in sorted(d["by_action"].items())) or "none"
    yield f"decisions: {d['total']} ({actions}), {d['per_s']}/s"
    yield f"acknowledged by workers: {ack['applied']} applied, {ack['rejected']} rejected"
    yield "merge graph (worker -> partner: merges):"
    for e in s["merge_graph"] or [{"worker": "(none)", "partner": "-", "merges": 0}]:
        yield f"  {e['worker']} -> {e['partner']}: {e['merges']}"
    for label, path in s["paths"].items():
        yield f"{label + ':':<16} {path}"


# -- up ------------------------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _tally(ens: Ensemble, client: Client) -> None:
    with contextlib.suppress(TetherError):
        ens.tally.update(client, ens.args.federation)


def supervise(ens: Ensemble, client: Client, console: Console) -> None:
    """Refresh the view until every worker has exited or one failed."""
    with View(ens, console) as view:
        while ens.poll():
            _tally(ens, client)
            view.refresh()
            time.sleep(TICK_S)
        _tally(ens, client)


def create_federation(client: Client, name: str, policy: Policy | str) -> None:
    """Create the federation; an existing one of that name is reused."""
    try:
        client.create_federation(name, policy)
    except ConflictError:
        client.get_federation(name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _finish(ens: Ensemble, client: Client, outcome: str, code: int) -> int:
    ens.stop_workers()
    _tally(ens, client)
    ens.stop_coordinator()
    summary = build_summary(ens, outcome, code)
    (ens.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(summary_lines(summary)), flush=True)
    print(report_line(ens.out), flush=True)
    return code


def run_up(args: argparse.Namespace) -> int:
    """`tetherfed up`: coordinator (unless --coordinator) + N workers, live view, summary."""
    try:
        policy = resolve_policy(args.policy)
    except (KeyError, OSError, ValueError) as exc:
        print(f"tetherfed up: bad --policy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    port = None if args.coordinator else _free_port()
    ens = Ensemble(args, out.resolve(), args.coordinator or f"http://127.0.0.1:{port}")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    client = client_for(ens)
    try:
        return _run(ens, client, policy)
    finally:
        client.close()
        signal.signal(signal.SIGTERM, previous)


def _run(ens: Ensemble, client: Client, policy: Policy | str) -> int:
    outcome, code = "finished ok", EXIT_OK
    try:
        problem = _boot_at(ens, policy)
        if problem is not None:
            ens.failures.append(problem)
            outcome, code = "coordinator unreachable", EXIT_UNREACHABLE
        else:
            ens.start_workers(ens.args.workers)
            supervise(ens, client, Console())
            if ens.failures:
                outcome, code = "failed", EXIT_FAILED
    except KeyboardInterrupt:
        outcome, code = "interrupted", EXIT_INTERRUPTED
    except TetherError as exc:
        ens.failures.append(f"coordinator error: {exc}")
        outcome, code = "failed", EXIT_FAILED
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # cleanup must not be cut short
    try:
        return _finish(ens, client, outcome, code)
    finally:
        signal.signal(signal.SIGINT, previous)


def _boot_at(ens: Ensemble, policy: Policy | str) -> str | None:
    """Start our coordinator if needed, wait for it, create the federation; why not, on failure."""
    if ens.args.coordinator is None:
        port = int(ens.url.rsplit(":", 1)[1])
        ens.coordinator = start_coordinator(ens.out, port)
        ens.write_pids()
    problem = wait_ready(ens.url, ens.coordinator, ens.args.ready_timeout)
    if problem is None:
        with client_for(ens) as client:
            create_federation(client, ens.args.federation, policy)
    return problem


def client_for(ens: Ensemble) -> Client:
    """A short-retry SDK client of the ensemble's coordinator."""
    return Client(ens.url, token=ens.args.token, retry=QUICK, timeout=5.0)


# -- status --------------------------------------------------------------------------------------


def _rows_from_rest(client: Client, fed: str, tally: Tally) -> list[WorkerRow]:
    rows = []
    for w in client.list_workers(fed).data:
        rows.append(WorkerRow(name=w.name, status=w.status, worker_id=w.worker_id, step=w.step or 0,
                              epoch=w.epoch, loss=w.loss, generation=w.generation,
                              merges=tally.per_worker[(w.worker_id, "merge")],
                              drifts=tally.per_worker[(w.worker_id, "drift")]))  # fmt: skip
    return rows


def show_federation(client: Client, fed: str, console: Console) -> None:
    """Print one federation's worker table and decision totals."""
    tally = Tally()
    tally.update(client, fed)
    console.print(worker_table(_rows_from_rest(client, fed, tally), title=f"federation {fed}"))
    actions = ", ".join(f"{a} {n}" for a, n in sorted(tally.by_action.items())) or "none"
    console.print(f"decisions: {tally.total} ({actions})")


def run_status(args: argparse.Namespace) -> int:
    """`tetherfed status`: the worker table of every federation (or one) of a coordinator."""
    console = Console(width=None if sys.stdout.isatty() else 120)
    try:
        with Client(args.coordinator, token=args.token, retry=QUICK, timeout=5.0) as client:
            feds = (
                [args.federation]
                if args.federation
                else [f.name for f in client.list_federations().data]
            )
            for fed in feds:
                show_federation(client, fed, console)
            if not feds:
                console.print("no federations")
    except TransportError as exc:
        print(f"tetherfed status: cannot reach {args.coordinator}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except NotFoundError as exc:
        print(f"tetherfed status: {exc.detail}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
