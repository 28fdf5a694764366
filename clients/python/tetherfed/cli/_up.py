"""`tetherfed up` (a local ensemble: coordinator + N identical workers) and `tetherfed status`.

A thin user of the launcher (`_launch`): it turns options into a `RunPlan`, shows the live table
and prints the summary. The run folder under --out is the launcher's (see `_launch`). With
`--engine ray` the workers and coordinator replicas are actors on a Ray cluster (`_ray`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tether_protocol.messages import Policy
from tetherfed._exits import EXIT_OK, EXIT_UNREACHABLE, CliError
from tetherfed.client._errors import TransportError
from tetherfed.client._sdk import Client
from tetherfed.launch._console import fmt, plain_line, worker_table
from tetherfed.launch._launch import (
    QUICK,
    Engine,
    Launcher,
    RunPlan,
    Tally,
    WorkerRow,
    launch,
    plan_workers,
    preset_policy,
    resolve_policy,
    set_aside,
)
from tetherfed.launch._ray import (
    add_engine_args,
    close_engine,
    engine_from_args,
)
from tetherfed.report import report_hook
from tetherfed.worker._main import TOKEN_ENV
from tetherfed.worker._options import add_worker_args, at_least_one, options_argv, options_from_args

PLAIN_EVERY_S = 2.0


# -- arguments -----------------------------------------------------------------------------------


def add_up_parsers(sub: Any) -> None:
    """Add the `up` and `status` subcommands to cli.py's subparsers."""
    up = sub.add_parser("up", help="run an ensemble: coordinator + N workers (here, or on Ray)")
    up.add_argument("--workers", type=at_least_one, default=2, help="number of worker processes")
    up.add_argument("--coordinator", default=None, help="coordinator URL (none: start our own)")
    up.add_argument("--token", default=None, help="bearer token of that coordinator")
    up.add_argument("--federation", default="local")
    up.add_argument(
        "--policy", default="demo", help="preset (demo, default, seed, cka, clustered) or JSON file"
    )
    up.add_argument("--out", type=Path, default=None, help="results folder (default runs/<time>)")
    up.add_argument(
        "--device",
        choices=["auto", "cpu"],
        default="auto",
        help="auto: one CUDA device per worker, round-robin, when any exist",
    )
    up.add_argument("--seed", type=int, default=0, help="worker i gets data seed seed+i")
    up.add_argument(
        "--init",
        choices=["independent", "shared"],
        default="independent",
        help="shared: every worker starts from the init of --seed",
    )
    up.add_argument("--ready-timeout", type=float, default=30.0, help="seconds to wait for /readyz")
    add_engine_args(up)
    add_worker_args(up)
    up.set_defaults(handler=run_up)

    status = sub.add_parser("status", help="worker table and decisions of a running coordinator")
    status.add_argument("--coordinator", default="http://127.0.0.1:8420")
    status.add_argument("--token", default=None, help=f"bearer token (default: ${TOKEN_ENV})")
    status.add_argument("--federation", default=None, help="one federation (default: all)")
    status.set_defaults(handler=run_status)


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The `tetherfed worker` training options of parsed `up` arguments, as argv."""
    return options_argv(options_from_args(args))


# -- rendering -----------------------------------------------------------------------------------


class LiveView:
    """A rich Live table with a progress bar on a terminal; plain lines every few seconds
    otherwise. Use as a context manager around `launch(view=...)`."""

    def __init__(self, console: Console, label: str = "up") -> None:
        self.console, self.label = console, label
        self.started = self.last_plain = time.monotonic()
        # M/N shows "0/?" until every worker has reported its total (it read "0/None")
        self.progress = Progress(
            TextColumn("steps"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        )
        self.task = self.progress.add_task("steps", total=None)
        self.live = Live(console=console, refresh_per_second=4) if console.is_terminal else None

    def __enter__(self) -> LiveView:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def refresh(self, launcher: Launcher, force: bool = False) -> None:
        """Redraw (terminal) or print a line every few seconds (otherwise)."""
        rows = list(launcher.rows.values())
        totals = [r.total for r in rows]
        total = sum(t for t in totals if t) if all(totals) else None
        self.progress.update(self.task, completed=sum(r.step for r in rows), total=total)
        if self.live is not None:
            footer = f"federation {launcher.plan.federation}: {launcher.tally.line()}"
            self.live.update(Group(worker_table(rows), footer, self.progress))
        elif force or time.monotonic() - self.last_plain >= PLAIN_EVERY_S:
            self.last_plain = time.monotonic()
            print(plain_line(launcher, self.last_plain - self.started, self.label), flush=True)


def summary_lines(s: dict[str, Any]) -> Iterator[str]:
    """The plain-text summary of one run."""
    yield f"tetherfed up: {s['outcome']} (exit code {s['exit_code']})"
    for failure in s["failures"]:
        yield f"  FAILED: {failure}"
    for warning in s.get("warnings", []):
        yield f"  WARNING: {warning}"
    yield "final loss per worker:"
    for w in s["workers"]:
        yield (
            f"  {w['name']:<10} {w['status']:<16} step {w['step']}/{w['total']}"
            f"  loss {fmt(w['loss'])}"
            f"  val_loss {fmt(w['val_loss'])}  merges {w['merges']}  drifts {w['drifts']}"
            f"  publishes {w.get('publishes', 0)} (skipped {w.get('publishes_skipped', 0)})"
            f"  merges/100 steps {_rate(w.get('merges_per_100_steps'))}"
        )
    d, ack = s["decisions"], s["acknowledged"]
    actions = ", ".join(f"{a} {n}" for a, n in sorted(d["by_action"].items())) or "none"
    yield f"decisions: {d['total']} ({actions}), {d['per_s']}/s"
    yield f"acknowledged by workers: {ack['applied']} applied, {ack['rejected']} rejected"
    yield "merge graph (worker -> partner: merges):"
    for e in s["merge_graph"] or [{"worker": "(none)", "partner": "-", "merges": 0}]:
        yield f"  {e['worker']} -> {e['partner']}: {e['merges']}"
    for label, path in s["paths"].items():
        yield f"{label + ':':<16} {path}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# -- up ------------------------------------------------------------------------------------------


def up_plan(args: argparse.Namespace, policy: Policy | str, engine: Engine) -> RunPlan:
    """The RunPlan of `tetherfed up` options: N workers of one group."""
    options = options_from_args(args)
    devices = engine.device_count(args.device)
    resolved = policy if isinstance(policy, Policy) else preset_policy(policy)
    workers = plan_workers([("default", args.workers, options)], args.seed, args.init, devices)
    return RunPlan(
        federation=args.federation, policy=resolved, init=args.init, seed=args.seed, workers=workers
    )


def run_up(args: argparse.Namespace) -> int:
    """`tetherfed up`: coordinator (unless --coordinator) + N workers, live view, summary."""
    try:
        policy = resolve_policy(args.policy)
    except (KeyError, OSError, ValueError) as exc:
        raise CliError(f"bad --policy: {exc}") from exc
    out = args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file, not a folder")
    engine = engine_from_args(args, workers=args.workers)
    try:
        earlier = set_aside(out)
    except OSError as exc:
        close_engine(engine)
        raise CliError(f"cannot move the earlier run out of {out}: {exc}") from exc
    if earlier is not None:
        print(f"{out} held an earlier run: moved to {earlier}", flush=True)
    try:
        with LiveView(Console()) as view:
            result = launch(
                up_plan(args, policy, engine),
                out,
                url=args.coordinator,
                token=args.token,
                ready_timeout=args.ready_timeout,
                view=view,
                engine=engine,
            )
    finally:
        close_engine(engine)
    print("\n".join(summary_lines(result.summary)), flush=True)
    report_hook(out)
    return result.code


# -- status --------------------------------------------------------------------------------------


def _rows_from_rest(client: Client, fed: str, tally: Tally) -> list[WorkerRow]:
    rows = []
    for w in client.list_workers(fed).data:
        group = w.meta.get("group")
        rows.append(
            WorkerRow(
                name=w.name,
                status=w.status,
                worker_id=w.worker_id,
                step=w.step or 0,
                epoch=w.epoch,
                loss=w.loss,
                generation=w.generation,
                group=str(group) if group is not None else None,
                merges=tally.per_worker[(w.worker_id, "merge")],
                drifts=tally.per_worker[(w.worker_id, "drift")],
            )
        )
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
        token = args.token or os.environ.get(TOKEN_ENV) or None
        with Client(args.coordinator, token=token, retry=QUICK, timeout=5.0) as client:
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
        raise CliError(f"cannot reach {args.coordinator}: {exc}", EXIT_UNREACHABLE) from exc
    return EXIT_OK
