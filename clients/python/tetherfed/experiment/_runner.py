"""Scripted experiments: a spec expanded into runs, run through the launcher, results
collected into one folder.

    import tetherfed.experiment
    rows = tetherfed.experiment.run("examples/cluster-recovery.toml")   # or a built-in name
    rows[0]["val_loss"], rows[0]["ari"]

The results folder (`[experiment] out`, default `runs/<name>`):

    spec.toml         the spec as given (after --set overrides)
    resolved.json     every run (id, cell, arm, repeat, its full RunPlan), versions, git commit
    pids.json         the experiment's coordinator (runs/<id>/pids.json has the workers)
    coordinator.log   that coordinator's log; redis/ its embedded Redis
    runs/<id>/        one run folder per run (the launcher's layout, see `tetherfed.launch`)
    results.csv       one row per run (`tetherfed.experiment._results.COLUMNS`)
    summary.csv       per cell and arm: n, mean/std/95 % CI, paired differences against the
                      reference arm (`experiment.reference_arm`), the oracle's gain recovered
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tetherfed.launch._console import plain_line, worker_table
from tetherfed.launch._launch import (
    Coordinator,
    Engine,
    Launcher,
    LocalEngine,
    RunResult,
    coordinator_for,
    launch,
    sigterm_as_interrupt,
    write_json_atomic,
)
from tetherfed.report import report_hook

from ._results import (
    COLUMNS,
    CONTROL,
    ColumnProvider,
    RunRecord,
    build_row,
    summarize,
    write_csv,
)
from ._results import preload as preload_results
from ._spec import (
    PlannedRun,
    Spec,
    SpecError,
    expand,
    parse_override,
    read_toml,
    set_dotted,
    validate,
)

PLAIN_EVERY_S = 5.0


class ExperimentError(RuntimeError):
    """The experiment cannot run as asked (folder conflicts, a changed spec without force)."""


# -- sources -------------------------------------------------------------------------------------


def examples() -> dict[str, Path]:
    """Built-in example specs by name (shipped inside the package)."""
    folder = resources.files("tetherfed.experiment") / "examples"
    return {
        p.name.removesuffix(".toml"): Path(str(p))
        for p in folder.iterdir()
        if p.name.endswith(".toml")
    }


def _source(spec: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The raw spec and its TOML text (None for a mapping)."""
    if isinstance(spec, Mapping):
        return json.loads(json.dumps(spec)), None
    path = Path(spec)
    # A folder is never a spec: `run NAME` beside a results folder called NAME (its --out)
    # still means the built-in example.
    if not path.is_file() and str(spec) in examples():
        path = examples()[str(spec)]
    if path.is_dir():
        raise SpecError(f"{spec}: a folder, not a spec file (a TOML file or a built-in example)")
    if not path.exists():
        known = ", ".join(sorted(examples()))
        raise SpecError(f"{spec}: no such file, nor a built-in example ({known})")
    return read_toml(path), path.read_text()


def plan(
    spec: str | Path | Mapping[str, Any],
    overrides: Sequence[str] = (),
    engine: Engine | None = None,
) -> tuple[Spec, list[PlannedRun], str]:
    """Validate and expand a spec (a path, a built-in example name, or a mapping), with `--set`
    style KEY=VALUE overrides; devices are counted by `engine`. Returns (spec, runs, the spec's
    TOML text). Raises SpecError."""
    raw, text = _source(spec)
    for item in overrides:
        set_dotted(raw, *parse_override(item))
    if overrides or text is None:
        import tomli_w  # noqa: PLC0415 (worker extra)

        text = tomli_w.dumps(raw)
    devices = (engine or LocalEngine()).device_count(validate(raw).experiment.device)
    parsed, runs = expand(raw, devices)
    return parsed, runs, text


# -- the folder ----------------------------------------------------------------------------------


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        if done.returncode == 0:
            return done.stdout.strip()
    return None


def _versions() -> dict[str, str | None]:
    from tetherfed import __version__  # noqa: PLC0415

    torch_version = None
    with contextlib.suppress(ImportError):
        import torch  # noqa: PLC0415

        torch_version = torch.__version__
    return {"tetherfed": __version__, "torch": torch_version, "python": platform.python_version()}


def _resolved(spec: Spec, runs: Sequence[PlannedRun]) -> dict[str, Any]:
    return {
        "name": spec.experiment.name,
        "reference_arm": spec.experiment.reference_arm,
        "versions": _versions(),
        "git_commit": _git_commit(),
        "runs": [
            {
                "run_id": r.run_id,
                "cell": r.cell,
                "arm": r.arm,
                "repeat": r.repeat,
                "params": r.params,
                "plan": r.plan.model_dump(mode="json"),
            }
            for r in runs
        ],
    }


def prepare_folder(
    out: Path, resolved: dict[str, Any], text: str, resume: bool, force: bool
) -> None:
    """Check an existing folder against the new runs, then write spec.toml and resolved.json.

    A folder from another spec (different run ids) is refused unless `force`; an existing folder
    of the same spec needs `resume` (continue) or `force` (run everything again)."""
    previous = out / "resolved.json"
    if previous.exists():
        old = {r["run_id"] for r in json.loads(previous.read_text())["runs"]}
        new = {r["run_id"] for r in resolved["runs"]}
        if old != new and not force:
            raise ExperimentError(
                f"{out} holds a different experiment ({len(old - new)} runs gone, {len(new - old)} new); "
                "use --force to run this spec there, or another --out"
            )
        if not resume and not force:
            raise ExperimentError(f"{out} exists: --resume continues it, --force runs it again")
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.toml").write_text(text)
    write_json_atomic(previous, resolved)


def _state(folder: Path) -> str:
    try:
        return str(json.loads((folder / "status.json").read_text())["state"])
    except (OSError, json.JSONDecodeError, KeyError):
        return "pending"


# -- progress ------------------------------------------------------------------------------------


class SweepView:
    """A progress bar over runs with the current runs' worker tables (terminal), or plain lines."""

    def __init__(self, console: Console, total: int, done: int) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("runs"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.task = self.progress.add_task("runs", total=total, completed=done)
        self.current: dict[str, Launcher] = {}
        self.lock = threading.Lock()
        self.last_plain: dict[str, float] = {}
        self.live = Live(console=console, refresh_per_second=2) if console.is_terminal else None

    def __enter__(self) -> SweepView:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.update(self.progress)
            self.live.__exit__(None, None, None)

    def refresh(self, launcher: Launcher, force: bool = False) -> None:
        """Called by each run's launcher while it supervises."""

        rid = launcher.plan.run_id or "?"
        with self.lock:
            self.current[rid] = launcher
            if self.live is not None:
                tables = [
                    worker_table(x.rows.values(), title=f"run {k} ({x.plan.arm})")
                    for k, x in self.current.items()
                ]
                self.live.update(Group(self.progress, *tables))
            elif force or time.monotonic() - self.last_plain.get(rid, 0) >= PLAIN_EVERY_S:
                self.last_plain[rid] = time.monotonic()
                print(
                    plain_line(launcher, time.monotonic() - launcher.started, f"run {rid}"),
                    flush=True,
                )

    def finished(self, planned: PlannedRun, result: RunResult, done: int, total: int) -> None:
        """A run ended: advance the bar and say so."""
        with self.lock:
            self.current.pop(planned.run_id, None)
            self.progress.update(self.task, completed=done)
            line = f"[{done}/{total}] run {planned.run_id} {planned.arm} repeat {planned.repeat} cell {planned.cell}: {result.state} in {result.summary.get('wall_s')}s"
            lines = [line, *(f"  WARNING: {w}" for w in result.summary.get("warnings", []))]
            for text in lines:
                if self.live is not None:
                    self.console.print(text, markup=False)
                else:
                    print(text, flush=True)


# -- running -------------------------------------------------------------------------------------


ReportHook = Callable[[Path], None]


@dataclass
class Sweep:
    """One experiment in progress: the runs, where they go, and how they ended."""

    out: Path
    runs: list[PlannedRun]
    resume: bool
    fail_fast: bool
    providers: Sequence[ColumnProvider] = field(default_factory=lambda: COLUMNS)
    stop: threading.Event = field(default_factory=threading.Event)
    results: dict[str, RunResult] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    engine: Engine | None = None  # None: LocalEngine
    jobs: int = 1  # runs at once (their workers share this machine's cores)
    reference: str = CONTROL  # the arm summary.csv pairs the others against

    def folder(self, r: PlannedRun) -> Path:
        """runs/<id>/."""
        return self.out / "runs" / r.run_id

    def todo(self) -> list[PlannedRun]:
        """Runs not finished yet (all of them unless resuming)."""
        if not self.resume:
            return list(self.runs)
        return [r for r in self.runs if _state(self.folder(r)) != "finished"]

    def run_one(self, r: PlannedRun, coordinator: Coordinator, view: SweepView) -> RunResult:
        """One run; a resumed one continues from its workers' checkpoints when it has them."""
        folder = self.folder(r)
        if not self.resume and folder.exists():
            shutil.rmtree(folder)
        result = launch(
            r.plan,
            folder,
            coordinator=coordinator,
            view=view,
            stop=self.stop,
            resume=self.resume,
            engine=self.engine,
            runs_at_once=self.jobs,
        )
        if result.state == "failed" and self.fail_fast:
            self.stop.set()
        return result

    def rows(self) -> list[dict[str, Any]]:
        """results.csv rows of every planned run (pending ones with their identity only)."""
        return [
            build_row(
                RunRecord(r.run_id, r.cell, r.arm, r.repeat, r.params, self.folder(r)),
                self.providers,
            )
            for r in self.runs
        ]

    def write_results(self) -> list[dict[str, Any]]:
        """Rewrite results.csv and summary.csv from the run folders."""
        with self.lock:
            rows = self.rows()
            write_csv(self.out / "results.csv", rows)
            write_csv(self.out / "summary.csv", summarize(rows, self.reference))
            return rows


def _execute(
    sweep: Sweep, todo: list[PlannedRun], coordinator: Coordinator, view: SweepView, jobs: int
) -> None:
    total = len(sweep.runs)
    done = total - len(todo)
    pending = iter(todo)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running: dict[Future[RunResult], PlannedRun] = {}

        def submit() -> None:
            while len(running) < jobs and not sweep.stop.is_set():
                r = next(pending, None)
                if r is None:
                    return
                running[pool.submit(sweep.run_one, r, coordinator, view)] = r

        try:
            submit()
            while running:
                finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in finished:
                    r = running.pop(future)
                    sweep.results[r.run_id] = future.result()
                    done += 1
                    view.finished(r, sweep.results[r.run_id], done, total)
                    sweep.write_results()
                submit()
        except KeyboardInterrupt:
            sweep.stop.set()  # the running launchers stop their workers and mark the run
            for future in list(running):
                with contextlib.suppress(Exception):
                    sweep.results[running[future].run_id] = future.result()
            raise


def run(
    spec: str | Path | Mapping[str, Any],
    *,
    out: Path | None = None,
    resume: bool = False,
    force: bool = False,
    coordinator: str | None = None,
    token: str | None = None,
    overrides: Sequence[str] = (),
    jobs: int | None = None,
    console: Console | None = None,
    providers: Sequence[ColumnProvider] = COLUMNS,
    report: ReportHook | None = report_hook,
    engine: Engine | None = None,
) -> list[dict[str, Any]]:
    """Run an experiment and return its results.csv rows (one dict per run).

    `spec`: a TOML path, a built-in example name (`examples()`), or the spec as a mapping.
    `resume` skips finished runs and continues the others; `force` accepts a folder holding a
    different spec. `coordinator`: a URL to use instead of starting one. `engine`: where the
    coordinator and workers run (default `LocalEngine()`; `_ray.RayEngine` for a Ray cluster,
    connected by the caller, who also closes it). Ctrl-C stops the
    current runs cleanly (marked interrupted) and re-raises KeyboardInterrupt.
    Raises SpecError (invalid spec), ExperimentError (folder conflicts), or CoordinatorUnreachable.
    """
    console = console or Console()
    engine = engine or LocalEngine()
    parsed, runs, text = plan(spec, overrides, engine)
    jobs = jobs or parsed.experiment.jobs
    check = getattr(engine, "check_sweep", None)  # Ray: refuse what its cluster cannot hold
    if check is not None:
        check([len(r.plan.workers) for r in runs], jobs)
    folder = (out or parsed.experiment.out or Path("runs") / parsed.experiment.name).resolve()
    prepare_folder(folder, _resolved(parsed, runs), text, resume, force)
    sweep = Sweep(
        folder,
        runs,
        resume,
        parsed.experiment.fail_fast,
        providers,
        engine=engine,
        jobs=jobs,
        reference=parsed.experiment.reference_arm,
    )
    todo = sweep.todo()
    preload_results()  # an interrupt must not land in a first import (see `preload`)
    console.print(
        f"experiment {parsed.experiment.name}: {len(runs)} runs, {len(todo)} to run, results in {folder}"
    )
    try:
        if todo:
            with (
                sigterm_as_interrupt(),
                coordinator_for(engine, folder, coordinator, token, 30.0) as coord,
                SweepView(console, len(runs), len(runs) - len(todo)) as view,
            ):
                _record_coordinator(folder, coord)
                _execute(sweep, todo, coord, view, jobs)
    finally:
        rows = sweep.write_results()
        if report is not None:
            report(folder)
    return rows


def _record_coordinator(folder: Path, coord: Coordinator) -> None:
    pid = coord.process.pid if coord.process is not None else None
    write_json_atomic(
        folder / "pids.json", {"experiment": os.getpid(), "coordinator": pid, "url": coord.url}
    )


# -- reading a folder ----------------------------------------------------------------------------


def status(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(results rows, summary rows) of an experiment folder, recomputed from its run folders."""
    resolved_path = folder / "resolved.json"
    if not resolved_path.exists():
        raise ExperimentError(f"{folder} is not an experiment folder (no resolved.json)")
    resolved = json.loads(resolved_path.read_text())
    records = [
        RunRecord(
            r["run_id"],
            r["cell"],
            r["arm"],
            r["repeat"],
            r["params"],
            folder / "runs" / r["run_id"],
        )
        for r in resolved["runs"]
    ]
    rows = [build_row(record) for record in records]
    return rows, summarize(rows, resolved.get("reference_arm", CONTROL))


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _pm(row: Mapping[str, Any], metric: str) -> str:
    mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
    return _cell(mean) if std is None else f"{_cell(mean)} ± {_cell(std, 2)}"


def reference_arm(spec: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> str:
    """The reference arm of a spec (a path, example name or mapping) with its overrides."""
    raw, _text = _source(spec)
    for item in overrides:
        set_dotted(raw, *parse_override(item))
    return validate(raw).experiment.reference_arm


def summary_table(rows: Sequence[Mapping[str, Any]], summary: Sequence[Mapping[str, Any]]) -> Table:
    """The end-of-sweep table: per cell and arm, mean ± std over repeats (a task metric's
    column, e.g. val acc, when the runs report one), the paired difference of the validation
    loss against the reference arm."""
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    title = "experiment: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    table = Table(title=title)
    params = [k for k in (summary[0] if summary else {}) if "." in k]
    tasks = [
        m
        for m in dict.fromkeys(
            k.removesuffix("_std") for s in summary for k in s if k.endswith("_std")
        )
        if m.startswith("val_") and m != "val_loss"
    ]
    reference = next((s["reference_arm"] for s in summary if s.get("reference_arm")), CONTROL)
    for column in [
        "cell",
        *params,
        "arm",
        "n",
        "val loss",
        *(m.replace("_", " ") for m in tasks),
        *(f"worst {m.replace('_', ' ')}" for m in tasks),
        f"Δ val vs {reference} (95% CI)",
        "merges",
        "drifts",
        "ARI",
        "steps/s",
    ]:
        table.add_column(column, no_wrap=True)
    for s in summary:
        diff = (
            "-"
            if s.get("val_loss_diff_mean") is None
            else f"{_cell(s['val_loss_diff_mean'])} ± {_cell(s.get('val_loss_diff_ci95'), 2)}"
        )
        table.add_row(
            str(s["cell"]),
            *[_cell(s.get(p)) for p in params],
            s["arm"],
            str(s["n"]),
            _pm(s, "val_loss"),
            *(_pm(s, m) for m in tasks),
            *(_pm(s, f"worst_{m}") for m in tasks),
            diff,
            _pm(s, "merges"),
            _pm(s, "drifts"),
            _pm(s, "ari"),
            _pm(s, "steps_per_s"),
        )
    return table


def print_dry_run(runs: Sequence[PlannedRun], console: Console) -> None:
    """The expanded table of a --dry-run and the count."""
    table = Table(title="runs")
    params = sorted({k for r in runs for k in r.params})
    for column in ["run id", "cell", *params, "arm", "repeat", "seed", "workers"]:
        table.add_column(column, no_wrap=True)
    for r in runs:
        groups = ", ".join(f"{w.group}" for w in r.plan.workers)
        table.add_row(
            r.run_id,
            str(r.cell),
            *[_cell(r.params.get(p)) for p in params],
            r.arm,
            str(r.repeat),
            str(r.plan.seed),
            groups,
        )
    console.print(table)
    print(f"{len(runs)} runs", flush=True)
