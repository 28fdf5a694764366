"""Console rendering of a launcher's state: the per-worker table and the one-line progress that
`tetherfed up`, `tetherfed status` and experiments print (rich tables on a terminal, plain lines
elsewhere)."""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table

from ._launch import Launcher, WorkerRow


def fmt(value: float | None) -> str:
    """A loss for a table cell: four decimals, or "-" when there is none yet."""
    return "-" if value is None else f"{value:.4f}"


def worker_table(rows: Iterable[WorkerRow], title: str = "workers") -> Table:
    """The per-worker table (shared by `up`, `status` and experiments). `skipped`: scheduled
    publishes the I/O budget skipped, of those due that were sent or skipped; `merges/100`:
    merges applied per 100 steps."""
    table = Table(title=title)
    for column in (
        "worker",
        "group",
        "status",
        "step",
        "epoch",
        "loss",
        "val loss",
        "gen",
        "merges",
        "drifts",
        "skipped",
        "merges/100",
    ):
        table.add_column(column, no_wrap=column != "status")  # a pending worker says why
    for r in rows:
        step = f"{r.step}/{r.total}" if r.total else str(r.step)
        table.add_row(
            r.name,
            r.group or "-",
            status(r),
            step,
            str(r.epoch if r.epoch is not None else "-"),
            fmt(r.loss),
            fmt(r.val_loss),
            str(r.generation),
            str(r.merges),
            str(r.drifts),
            _skipped(r),
            "-" if r.merges_per_100_steps is None else f"{r.merges_per_100_steps:.2f}",
        )
    return table


def status(row: WorkerRow) -> str:
    """The status cell: `pending: <why>` while the engine cannot start the worker yet."""
    return f"{row.status}: {row.waiting}" if row.waiting else row.status


def _skipped(row: WorkerRow) -> str:
    """'skipped/due' (publishes the I/O budget skipped of those sent or skipped), "-" before
    the worker reported any (and in `status`, which reads the coordinator only)."""
    due = row.publishes + row.publishes_skipped
    return f"{row.publishes_skipped}/{due}" if due else "-"


def plain_line(launcher: Launcher, elapsed: float, label: str = "up") -> str:
    """One progress line for non-terminals (CI, tests)."""
    workers = "; ".join(
        f"{r.name} {status(r)}"
        if r.waiting
        else f"{r.name} {r.status} {r.step}/{r.total or '?'} loss {fmt(r.loss)}"
        for r in launcher.rows.values()
    )
    return f"[{label} {elapsed:5.1f}s] {launcher.tally.line()} | {workers}"
