"""Figures of an experiment folder: the summary table, mean ± std bands over repeats
per cell and arm, parallel coordinates of the grid against the final metric, cluster recovery
per cell, and the paired federated − independent difference with 95 % confidence intervals.

The folder is what `tetherfed experiment run` writes: `runs/<id>/` run folders (each with its
`config.json`: `params` = the cell's grid values, `arm`, `repeat`), `results.csv` (a row per run)
and `summary.csv` (per cell and arm). The final metric of a run is its workers' mean final
validation loss (the training loss when no validation was logged).
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from scipy import stats

from ._data import RunData, load_run, worker_folders
from ._page import Figure, nodata
from ._run import color

GRID_POINTS = 200
NO_PAIRS = "needs runs of both the federated and the independent arm with the same repeat"


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file ([] when absent)."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def cell_label(params: dict[str, Any]) -> str:
    """'a=1, b=x' for a cell's grid values ('all runs' for an experiment without a grid)."""
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "all runs"


@dataclass
class ExperimentRun:
    """One run of the experiment with where it sits in the grid."""

    run: RunData
    cell: str
    arm: str
    repeat: int

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean over workers of the validation loss (training loss when none) against step."""
        use_val = all(w.val_step.size for w in self.run.workers)
        xs = [w.val_step if use_val else w.step for w in self.run.workers if w.step.size]
        ys = [w.val_loss if use_val else w.loss for w in self.run.workers if w.step.size]
        if not xs:
            return np.zeros(0), np.zeros(0)
        grid = np.linspace(max(x[0] for x in xs), min(x[-1] for x in xs), GRID_POINTS)
        return grid, np.mean([np.interp(grid, x, y) for x, y in zip(xs, ys, strict=True)], axis=0)

    def final(self) -> float:
        """The run's final metric (see the module docstring)."""
        _, y = self.curve()
        return float(y[-1]) if y.size else math.nan


@dataclass
class ExperimentData:
    """An experiment folder, read."""

    folder: Path
    runs: list[ExperimentRun]
    results: list[dict[str, str]]
    summary: list[dict[str, str]]

    @property
    def params(self) -> list[str]:
        """The grid's parameter names."""
        return sorted({k for r in self.runs for k in r.run.config.get("params", {})})


def is_experiment(folder: Path) -> bool:
    """Whether `folder` is an experiment folder (a `runs/` of run folders, or a results.csv)."""
    return (folder / "results.csv").exists() or any(
        worker_folders(p) for p in (folder / "runs").glob("*")
    )


def load_experiment(folder: Path) -> ExperimentData:
    """Read every run folder under `folder/runs`, with the CSV tables."""
    runs = []
    for path in sorted(p for p in (folder / "runs").glob("*") if worker_folders(p)):
        run = load_run(path)
        cfg = run.config
        runs.append(
            ExperimentRun(
                run,
                cell_label(cfg.get("params") or {}),
                str(cfg.get("arm") or "federated"),
                int(cfg.get("repeat") or 0),
            )
        )
    return ExperimentData(
        folder, runs, read_csv(folder / "results.csv"), read_csv(folder / "summary.csv")
    )


SUMMARY_METRICS = ("val_loss", "train_loss", "merges", "drifts", "ari", "steps_per_s")


def _num(text: str | None) -> str:
    try:
        return f"{float(text or ''):.4g}"
    except ValueError:
        return text or "-"


def _summary_rows(exp: ExperimentData) -> tuple[list[str], list[list[str]]]:
    """summary.csv as 'mean ± std' per metric (the task metrics, e.g. val_acc, and their worst
    worker after val_loss when the runs report them), the paired difference of val_loss against
    the reference arm with its 95 % CI, and the cell's grid values (from results.csv) next to
    its number."""
    params = {r.get("cell", ""): r for r in exp.results}
    known = {
        "run_id",
        "cell",
        "arm",
        "repeat",
        "state",
        "communities",
        *SUMMARY_METRICS,
        "rejected",
        "wall_s",
    }
    columns = {k.removesuffix("_std") for s in exp.summary for k in s if k.endswith("_std")}
    tasks = sorted(m for m in columns if m.startswith("val_") and m != "val_loss")
    metrics = [SUMMARY_METRICS[0], *tasks, *(f"worst_{m}" for m in tasks), *SUMMARY_METRICS[1:]]
    reference = next((s["reference_arm"] for s in exp.summary if s.get("reference_arm")), None)
    versus = f"Δ val_loss vs {reference or 'independent'} (95 % CI)"
    header = ["cell", "arm", "n", *metrics, versus]
    rows = []
    for s in exp.summary:
        grid = ", ".join(
            f"{k}={v}"
            for k, v in params.get(s.get("cell", ""), {}).items()
            if k not in known and not k.startswith(("val_", "worst_"))
        )
        cells = [f"{s.get('cell', '')} {grid}".strip(), s.get("arm", ""), s.get("n", "")]
        cells += [f"{_num(s.get(f'{m}_mean'))} ± {_num(s.get(f'{m}_std'))}" for m in metrics]
        diff = s.get("val_loss_diff_mean")
        cells.append(f"{_num(diff)} ± {_num(s.get('val_loss_diff_ci95'))}" if diff else "-")
        rows.append(cells)
    return header, rows


def table_figure(exp: ExperimentData) -> Figure:
    """summary.csv as a table (per cell and arm: n, mean ± std, the paired difference ± CI)."""
    if not exp.summary:
        return nodata("summary-table", "Summary", "the folder has no summary.csv")
    header, rows = _summary_rows(exp)
    fig = go.Figure(
        go.Table(
            header={"values": header, "fill_color": "#e8eef7", "align": "left"},
            cells={"values": [list(col) for col in zip(*rows, strict=True)], "align": "left"},
        )
    )
    fig.update_layout(
        height=min(130 + 44 * len(rows), 900), margin={"l": 10, "r": 10, "t": 10, "b": 10}
    )
    return Figure("summary-table", "Summary per cell and arm (mean ± std over repeats)", fig)


def bands_figure(exp: ExperimentData) -> Figure:
    """Per cell and arm, the mean over repeats of the run curve (mean over workers), ± one std."""
    groups: dict[tuple[str, str], list[ExperimentRun]] = defaultdict(list)
    for r in exp.runs:
        groups[(r.cell, r.arm)].append(r)
    if not groups:
        return nodata("bands", "Loss over repeats", "no run folder under runs/")
    fig = go.Figure()
    for k, ((cell, arm), runs) in enumerate(sorted(groups.items())):
        curves = [r.curve() for r in runs if r.curve()[0].size]
        if not curves:
            continue
        grid = np.linspace(max(c[0][0] for c in curves), min(c[0][-1] for c in curves), GRID_POINTS)
        ys = np.array([np.interp(grid, x, y) for x, y in curves])
        mean, std = ys.mean(axis=0), ys.std(axis=0)
        name, c = f"{cell} · {arm} (n={len(curves)})", color(k)
        fig.add_trace(
            go.Scatter(
                x=np.concatenate([grid, grid[::-1]]),
                y=np.concatenate([mean + std, (mean - std)[::-1]]),
                fill="toself",
                fillcolor=c,
                opacity=0.2,
                line={"width": 0},
                legendgroup=name,
                showlegend=False,
                hoverinfo="skip",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=grid,
                y=mean,
                mode="lines",
                name=name,
                legendgroup=name,
                line={"color": c},
                meta={"kind": "band", "cell": cell, "arm": arm, "n": len(curves)},
            )
        )
    fig.update_layout(
        height=480, xaxis_title="step", yaxis_title="validation loss (mean over workers)"
    )
    return Figure("bands", "Validation loss, mean ± std over repeats, per cell and arm", fig)


def _dimension(label: str, values: list[Any]) -> dict[str, Any]:
    try:
        return {"label": label, "values": [float(v) for v in values]}
    except (TypeError, ValueError):
        levels = sorted({str(v) for v in values})
        return {
            "label": label,
            "values": [levels.index(str(v)) for v in values],
            "tickvals": list(range(len(levels))),
            "ticktext": levels,
        }


def parcoords_figure(exp: ExperimentData) -> Figure:
    """A line per run across the grid parameters, the arm and the final metric."""
    runs = [r for r in exp.runs if math.isfinite(r.final())]
    if not runs:
        return nodata("parcoords", "Parameters vs final loss", "no run has a final loss")
    dims = [
        _dimension(p, [r.run.config.get("params", {}).get(p) for r in runs]) for p in exp.params
    ]
    dims.append(_dimension("arm", [r.arm for r in runs]))
    final = [r.final() for r in runs]
    dims.append({"label": "final val loss", "values": final})
    fig = go.Figure(
        go.Parcoords(
            dimensions=dims, line={"color": final, "colorscale": "Viridis", "showscale": True}
        )
    )
    fig.update_layout(height=420)
    return Figure("parcoords", "Grid parameters and arm against the final validation loss", fig)


def _ari(exp: ExperimentData) -> dict[str, float]:
    """run id → cluster-recovery ARI from results.csv (a column named like `ari`)."""
    found = {}
    for row in exp.results:
        col = next(
            (c for c in row if c.lower() in ("ari", "cluster_ari", "cluster_recovery_ari")), None
        )
        if col and row.get(col) not in (None, "", "nan"):
            found[row.get("run_id") or row.get("id") or ""] = float(row[col])
    return found


def cluster_figure(exp: ExperimentData) -> Figure:
    """Adjusted Rand index of the merge-graph communities against the groups, per cell and arm
    (one dot per repeat)."""
    ari = _ari(exp)
    points = [
        (r.cell, r.arm, ari[r.run.config.get("run_id", "")])
        for r in exp.runs
        if r.run.config.get("run_id", "") in ari
    ]
    if not points:
        return nodata(
            "cluster", "Cluster recovery", "results.csv has no ARI column (cluster recovery)"
        )
    fig = go.Figure()
    for k, arm in enumerate(sorted({a for _, a, _ in points})):
        mine = [(c, v) for c, a, v in points if a == arm]
        fig.add_trace(
            go.Box(
                x=[c for c, _ in mine],
                y=[v for _, v in mine],
                name=arm,
                boxpoints="all",
                marker_color=color(k),
            )
        )
    fig.update_layout(
        height=420,
        boxmode="group",
        yaxis_title="ARI (1 = merges follow the groups)",
        yaxis_range=[-0.55, 1.05],
    )
    return Figure("cluster", "Cluster recovery per cell (adjusted Rand index)", fig)


def paired_differences(exp: ExperimentData) -> dict[str, list[float]]:
    """Per cell, federated − independent final loss for each repeat run in both arms."""
    finals: dict[tuple[str, str, int], float] = {
        (r.cell, r.arm, r.repeat): r.final() for r in exp.runs
    }
    diffs: dict[str, list[float]] = defaultdict(list)
    for (cell, arm, repeat), value in sorted(finals.items()):
        control = finals.get((cell, "independent", repeat))
        if arm == "federated" and control is not None and math.isfinite(value - control):
            diffs[cell].append(value - control)
    return diffs


def ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t confidence interval (NaN half-width for n < 2)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, math.nan
    return mean, float(stats.t.ppf(0.975, len(values) - 1) * stats.sem(values))


def paired_figure(exp: ExperimentData) -> Figure:
    """Per cell: mean of the paired differences with its 95 % CI; below 0 the federation helped."""
    diffs = paired_differences(exp)
    if not diffs:
        return nodata("paired", "Federated − independent", NO_PAIRS)
    cells = sorted(diffs)
    stats_ = [ci95(diffs[c]) for c in cells]
    fig = go.Figure(
        go.Scatter(
            x=[m for m, _ in stats_],
            y=cells,
            mode="markers",
            marker={"size": 12},
            error_x={
                "type": "data",
                "array": [0 if math.isnan(h) else h for _, h in stats_],
                "visible": True,
            },
            hovertext=[
                f"n={len(diffs[c])}, mean {m:.4g} ± {h:.3g}"
                for c, (m, h) in zip(cells, stats_, strict=True)
            ],
            meta={"kind": "paired", "n": [len(diffs[c]) for c in cells]},
        )
    )
    fig.add_vline(x=0, line_dash="dot")
    fig.update_layout(
        height=max(240, 60 * len(cells) + 120),
        xaxis_title="final val loss: federated − independent",
    )
    return Figure(
        "paired",
        "Paired difference federated − independent (mean, 95 % CI over repeats)",
        fig,
        caption="Left of 0: the federation lowered the final validation loss.",
    )


def experiment_figures(exp: ExperimentData) -> list[Figure]:
    """Every experiment-level figure."""
    return [
        table_figure(exp),
        bands_figure(exp),
        parcoords_figure(exp),
        cluster_figure(exp),
        paired_figure(exp),
    ]


def facts(exp: ExperimentData) -> dict[str, str]:
    """Header facts of the experiment report."""
    resolved = {}
    if (exp.folder / "resolved.json").exists():
        try:
            resolved = json.loads((exp.folder / "resolved.json").read_text())
        except json.JSONDecodeError:
            resolved = {}
    name = resolved.get("name") if isinstance(resolved, dict) else None
    return {
        "experiment": str(name or exp.folder.name),
        "folder": str(exp.folder),
        "runs": str(len(exp.runs)),
        "cells": str(len({r.cell for r in exp.runs})),
        "arms": ", ".join(sorted({r.arm for r in exp.runs})),
    }
