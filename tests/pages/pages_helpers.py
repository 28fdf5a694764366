"""The shared ensemble of the page tests (see conftest.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from events import (
    MANY_STEPS,
    applied,
    diagnostics_runs,
    finish_workers,
    logged_val_loss,
    started,
    up_worker_pids,
    wait_for,
)

# The workers train until what the page tests draw has happened (`Ensemble.finished`), then end
# as finished runs: a fixed step budget can end before any decision reaches a fast worker.
UP_ARGS = [
    "--workers",
    "2",
    "--device",
    "cpu",
    "--steps",
    MANY_STEPS,
    "--publish-every",
    "5",
    "--log-every",
    "5",
    "--eval-every",
    "25",
    "--diagnostics",
    "every=40",
]
UP_TIMEOUT_S = 150.0  # from the workers' end to `up`'s (the report written)
DIAGNOSTICS_RUNS = 3  # per worker before the run ends (the trajectory needs several)

FIGURE = re.compile(
    r'<script type="application/json" class="tf-figure" data-target="fig-([^"]+)">(.*?)</script>',
    re.S,
)
NODATA = re.compile(r'<p class="nodata" id="fig-([^"]+)">(.*?)</p>', re.S)
EXTERNAL = re.compile(
    r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import""", re.I
)


def figures(html: str) -> dict[str, dict[str, Any]]:
    """Figure name → plotly spec, for every drawn figure of a report."""
    return {name: json.loads(text) for name, text in FIGURE.findall(html)}


def notes(html: str) -> dict[str, str]:
    """Figure name → its 'no data' note."""
    return dict(NODATA.findall(html))


@dataclass
class Ensemble:
    """A coordinator (admin and read-only tokens) and, once started, `tetherfed up` against it."""

    url: str
    token: str
    read_token: str
    federation: str
    out: Path
    coordinator: subprocess.Popen[bytes]
    up: subprocess.Popen[str] | None = None
    stdout: str = ""

    def start_up(self) -> None:
        """Start `tetherfed up` (once)."""
        if self.up is None:
            cmd = [
                sys.executable,
                "-m",
                "tetherfed.cli",
                "up",
                "--coordinator",
                self.url,
                "--token",
                self.token,
                "--federation",
                self.federation,
                "--out",
                str(self.out),
                *UP_ARGS,
            ]
            self.up = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )

    def finished(self) -> Path:
        """The run folder once `up` has exited 0 (started if needed): the workers are ended as
        finished runs once each has started, logged a validation loss and written
        DIAGNOSTICS_RUNS diagnostics records, and one has applied a merge."""
        self.start_up()
        assert self.up is not None
        if self.up.returncode is None:
            workers = [self.out / f"worker-{i}" for i in range(2)]
            wait_for(
                f"two workers with a validation loss and {DIAGNOSTICS_RUNS} diagnostics records "
                "each, and a merge one of them applied",
                lambda: (
                    all(
                        started(w)
                        and logged_val_loss(w)
                        and diagnostics_runs(w) >= DIAGNOSTICS_RUNS
                        for w in workers
                    )
                    and any(applied(w) for w in workers)
                ),
                procs=[self.up],
            )
            finish_workers(up_worker_pids(self.out))
            self.stdout, _ = self.up.communicate(timeout=UP_TIMEOUT_S)
        assert self.up.returncode == 0, f"tetherfed up failed:\n{self.stdout}"
        return self.out

    def stop(self) -> None:
        """Stop what is still running, by PID."""
        for proc in (self.up, self.coordinator):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        if self.up is not None and self.up.stdout is not None:
            self.up.stdout.close()
