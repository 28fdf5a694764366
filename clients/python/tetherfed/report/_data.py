"""Read a run folder (the contract of `tetherfed up --out` and of each experiment run).

Everything here is optional except at least one `worker-*/metrics.jsonl`: a folder written before
the diagnostics or the decision log existed still loads, with those parts empty, and each figure
then says what is missing instead of failing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAX_POINTS = 2_000  # per line: long series are decimated to about this many points


class ReportError(Exception):
    """The folder is not a run or an experiment folder (message says what was looked for)."""


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; a torn last line (a run still writing) is skipped."""
    if not path.exists():
        return
    with path.open() as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object, or {} when the file is absent or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def decimate_index(n: int, max_points: int = MAX_POINTS) -> np.ndarray:
    """Indices keeping at most `max_points` of `n` evenly spaced, first and last always kept."""
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_points).round().astype(int))


@dataclass
class Mark:
    """A decision applied (or rejected) by a worker at one of its steps."""

    step: int
    action: str  # merge | drift
    outcome: str  # applied | rejected | issued (no ack known)
    layer: str = ""
    partner: str = ""
    decision_id: int | None = None


@dataclass
class WorkerSeries:
    """One worker's metrics: arrays of equal length per field (steps ascending)."""

    name: str
    worker_id: str | None = None
    group: str = "default"
    step: np.ndarray = field(default_factory=lambda: np.zeros(0))
    loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    epoch: np.ndarray = field(default_factory=lambda: np.zeros(0))
    generation: np.ndarray = field(default_factory=lambda: np.zeros(0))
    val_step: np.ndarray = field(default_factory=lambda: np.zeros(0))
    val_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    marks: list[Mark] = field(default_factory=list)

    def loss_at(self, step: float) -> float:
        """Training loss at `step`, interpolated between logged steps (NaN with no data)."""
        if self.step.size == 0:
            return float("nan")
        return float(np.interp(step, self.step, self.loss))

    def final_val_loss(self) -> float:
        """The last validation loss (NaN when none was logged)."""
        return float(self.val_loss[-1]) if self.val_loss.size else float("nan")


@dataclass
class RunData:
    """Everything a run report draws."""

    folder: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    workers: list[WorkerSeries]
    decisions: list[dict[str, Any]]
    diagnostics: dict[str, list[dict[str, Any]]]  # worker name → records of diagnostics.jsonl
    arrays: dict[str, Path]  # worker name → diagnostics.safetensors

    @property
    def names(self) -> dict[str, str]:
        """worker id → worker name."""
        return {w.worker_id: w.name for w in self.workers if w.worker_id}

    @property
    def title(self) -> str:
        """`federation (arm)` from config/summary, else the folder name."""
        fed = self.config.get("federation") or self.summary.get("federation") or self.folder.name
        arm = self.config.get("arm")
        return f"{fed} ({arm})" if arm else str(fed)


def _worker_index(path: Path) -> tuple[int, str]:
    found = re.search(r"(\d+)$", path.name)
    return (int(found.group(1)) if found else 1 << 30, path.name)


def worker_folders(folder: Path) -> list[Path]:
    """`worker-*` folders holding a metrics.jsonl, in worker order."""
    found = [p.parent for p in folder.glob("worker-*/metrics.jsonl")]
    return sorted(found, key=_worker_index)


def _series(name: str, records: list[dict[str, Any]]) -> WorkerSeries:
    steps = [r for r in records if r.get("event") == "step" and r.get("loss") is not None]
    vals = [r for r in steps if r.get("val_loss") is not None]
    ids = [r["worker_id"] for r in records if r.get("worker_id")]
    return WorkerSeries(
        name=name,
        worker_id=ids[-1] if ids else None,
        step=np.array([r["step"] for r in steps], dtype=float),
        loss=np.array([r["loss"] for r in steps], dtype=float),
        epoch=np.array([r.get("epoch") or 0 for r in steps], dtype=float),
        generation=np.array([r.get("generation") or 0 for r in steps], dtype=float),
        val_step=np.array([r["step"] for r in vals], dtype=float),
        val_loss=np.array([r["val_loss"] for r in vals], dtype=float),
    )


def _counter_marks(records: list[dict[str, Any]]) -> list[Mark]:
    """Marks from the worker's cumulative merge/drift counters (no decision log): one per log
    line whose counter grew, at that line's step."""
    marks, last = [], {"merges": 0, "drifts": 0}
    for r in records:
        if r.get("event") != "step":
            continue
        for key, action in (("merges", "merge"), ("drifts", "drift")):
            grew = int(r.get(key) or 0) - last[key]
            marks += [Mark(step=int(r["step"]), action=action, outcome="applied")] * max(grew, 0)
            last[key] = int(r.get(key) or 0)
    return marks


def decision_marks(decisions: list[dict[str, Any]], worker_id: str | None) -> list[Mark]:
    """The merge/drift decisions addressed to `worker_id`, at the step of its snapshot."""
    marks = []
    for d in decisions:
        if d.get("worker_id") != worker_id or d.get("action") not in ("merge", "drift"):
            continue
        ack = d.get("ack") if "ack" in d else None
        outcome = (ack or {}).get("outcome") or "issued"
        step = (d.get("own_snapshot") or {}).get("step", 0)
        marks.append(
            Mark(
                step=int(step),
                action=d["action"],
                outcome=outcome,
                layer=d.get("layer", ""),
                partner=d.get("partner_id") or "",
                decision_id=d.get("id"),
            )
        )
    return marks


def _groups(config: dict[str, Any]) -> dict[str, str]:
    return {w.get("name", ""): w.get("group", "default") for w in config.get("workers", [])}


def load_run(folder: Path) -> RunData:
    """Read a run folder; `ReportError` when it holds no worker metrics."""
    folders = worker_folders(folder)
    if not folders:
        raise ReportError(f"{folder} holds no worker-*/metrics.jsonl: not a run folder")
    config, decisions = (
        read_json(folder / "config.json"),
        list(read_jsonl(folder / "decisions.jsonl")),
    )
    groups, workers, diagnostics, arrays = _groups(config), [], {}, {}
    for path in folders:
        records = list(read_jsonl(path / "metrics.jsonl"))
        series = _series(path.name, records)
        series.group = groups.get(path.name, "default")
        has_log = (folder / "decisions.jsonl").exists()
        series.marks = (
            decision_marks(decisions, series.worker_id) if has_log else _counter_marks(records)
        )
        workers.append(series)
        diagnostics[path.name] = list(read_jsonl(path / "diagnostics.jsonl"))
        if (path / "diagnostics.safetensors").exists():
            arrays[path.name] = path / "diagnostics.safetensors"
    summary = read_json(folder / "summary.json")
    return RunData(folder, config, summary, workers, decisions, diagnostics, arrays)
