"""A worker's publish pace (publishes, skipped publishes, merges per 100 steps) from its metrics
lines into the launcher's row, the live table and the summary lines of `tetherfed up`."""

from __future__ import annotations

from dataclasses import asdict

from rich.console import Console

from tetherfed.cli._up import summary_lines
from tetherfed.launch._console import worker_table
from tetherfed.launch._launch import WorkerRow


def test_the_pace_goes_from_the_metrics_lines_to_the_table_and_the_summary() -> None:
    row, silent = WorkerRow("worker-0"), WorkerRow("worker-1")
    row.update({"event": "step", "step": 100, "total": 150, "publishes": 11})
    row.update({"event": "step", "step": 150, "publishes_skipped": 19})
    row.update({"event": "done", "publishes": 12, "publishes_skipped": 18, "merge": 3})
    row.update({"event": "done", "merges_per_100_steps": 2.0})
    assert (row.publishes, row.publishes_skipped, row.merges_per_100_steps) == (12, 18, 2.0)

    console = Console(width=200, record=True)
    console.print(worker_table([row, silent]))
    table = console.export_text()
    assert "skipped" in table and "merges/100" in table
    assert "18/30" in table and "2.00" in table  # skipped of the 30 due; merge rate
    assert next(line for line in table.splitlines() if "worker-1" in line).count("-") >= 2

    summary = {
        "outcome": "finished ok",
        "exit_code": 0,
        "failures": [],
        "workers": [asdict(row), asdict(silent)],
        "decisions": {"total": 0, "by_action": {}, "per_s": 0.0},
        "acknowledged": {"applied": 0, "rejected": 0},
        "merge_graph": [],
        "paths": {},
    }
    lines = list(summary_lines(summary))
    assert "publishes 12 (skipped 18)  merges/100 steps 2.00" in lines[2]
    assert "publishes 0 (skipped 0)  merges/100 steps -" in lines[3]
