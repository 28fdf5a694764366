"""Waiting for what a federation did, never for a number of steps or a pace.

A worker that runs a fixed number of steps may finish before any decision reaches it: the
coordinator's pace is the wall clock (publishes within an I/O budget, scoring rounds, long polls),
the worker's is the CPU. So tests run workers with far more steps than needed, wait here for the
event they assert on (a decision applied, diagnostics written) with a generous bound, then end
the workers as finished runs: SIGUSR1 makes `tetherfed worker` stop at its next step boundary
exactly as if its step budget ended there (final evaluation, checkpoint, acks, leave; exit 0).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

EVENT_TIMEOUT_S = 180.0  # generous: a loaded CI machine starts and trains workers slowly
MANY_STEPS = "1000000"  # a step budget no test waits out: workers are ended by `finish_workers`


def wait_for(
    what: str,
    condition: Callable[[], bool],
    timeout_s: float = EVENT_TIMEOUT_S,
    procs: Iterable[subprocess.Popen[Any]] = (),
    interval_s: float = 0.1,
) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout_s`, or as soon as one of
    `procs` (whose running the event needs) has exited."""
    procs = list(procs)
    deadline = time.monotonic() + timeout_s
    while not condition():
        ended = [p for p in procs if p.poll() is not None]
        if ended:
            codes = ", ".join(f"pid {p.pid} exit {p.returncode}" for p in ended)
            raise AssertionError(f"never saw {what}: a process it needs exited ({codes})")
        if time.monotonic() > deadline:
            raise AssertionError(f"never saw {what} within {timeout_s:.0f} s")
        time.sleep(interval_s)


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of a file being written (none if it does not exist yet; a line
    still being written is skipped)."""
    try:
        text = path.read_text()
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            found.append(json.loads(line))
    return found


def started(worker_dir: Path) -> bool:
    """Whether the worker whose folder (checkpoint dir) this is has logged its start: from then
    on it ends on SIGUSR1 as a finished run."""
    return any(e.get("event") == "start" for e in json_lines(worker_dir / "metrics.jsonl"))


def published(worker_dir: Path) -> bool:
    """Whether the worker has logged a step after its first publish went out (a worker finished
    before it registered publishes nothing, however long its peers ran)."""
    return any(
        e.get("event") == "step" and (e.get("publishes") or 0) >= 1
        for e in json_lines(worker_dir / "metrics.jsonl")
    )


def applied(worker_dir: Path, action: str = "merge") -> list[dict[str, Any]]:
    """Decisions of `action` the worker applied (its `decision` events, outcome applied)."""
    return [
        e
        for e in json_lines(worker_dir / "metrics.jsonl")
        if e.get("event") == "decision" and e.get("action") == action
        if e.get("outcome") == "applied"
    ]


def diagnostics_runs(worker_dir: Path) -> int:
    """Diagnostics records the worker wrote (skipped runs not counted)."""
    lines = json_lines(worker_dir / "diagnostics.jsonl")
    return sum(e.get("event") == "diagnostics" for e in lines)


def logged_val_loss(worker_dir: Path) -> bool:
    """Whether a step line of the worker carries a validation loss (an evaluation ran)."""
    lines = json_lines(worker_dir / "metrics.jsonl")
    return any(e.get("event") == "step" and e.get("val_loss") is not None for e in lines)


def finish_workers(pids: Iterable[int]) -> None:
    """Ask each live worker (by PID) to end as a finished run (SIGUSR1). Call it only once each
    has logged its start (`started`): before that SIGUSR1 would kill it."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)


def up_worker_pids(out: Path) -> list[int]:
    """The worker PIDs `tetherfed up` recorded in <out>/pids.json (none before it wrote it)."""
    try:
        pids = json.loads((out / "pids.json").read_text())
    except (OSError, ValueError):
        return []
    return [p for p in pids.get("workers", {}).values() if p]
