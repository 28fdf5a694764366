"""Figures of the §8 weight diagnostics a worker records (`--diagnostics`): effective rank, gzip
ratio, Jacobian radius, histogram surfaces, singular-value and |ΔW|-correlation heat maps, update
spectra with persistent peaks, and the prototype's 3-D scatter of two tracked weights vs loss.

Input: each worker's `diagnostics.jsonl` (scalars; a record per diagnostics pass with `step`,
`epoch` and `metrics: {metric: {layer: value}}`, or one point per line with `metric`, `layer`,
`step`, `epoch`, `value`) and `diagnostics.safetensors` (arrays, keyed `metric/layer/step`).
A metric nobody recorded becomes a note, not an error.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

from ._data import RunData, decimate_index
from ._page import Figure, nodata
from ._run import color

ENABLE = "enable --diagnostics on the workers"
MAX_ROWS = 200  # checkpoints per heat map / surface (decimated beyond)


@dataclass
class Point:
    """One recorded value: a number or an array, of one metric and layer at one step."""

    worker: str
    metric: str
    layer: str
    step: int
    epoch: int
    value: Any


def _points_of(worker: str, record: dict[str, Any]) -> list[Point]:
    step, epoch = int(record.get("step") or 0), int(record.get("epoch") or 0)
    if "metric" in record:
        return [
            Point(
                worker,
                record["metric"],
                str(record.get("layer", "model")),
                step,
                epoch,
                record.get("value"),
            )
        ]
    nested = record.get("metrics") or {}
    return [Point(worker, metric, str(layer), step, epoch, value)
            for metric, layers in nested.items() if isinstance(layers, dict)
            for layer, value in layers.items()]  # fmt: skip


def _array_points(worker: str, path: Path) -> list[Point]:
    from safetensors.numpy import load_file  # noqa: PLC0415 (only with a diagnostics file)

    points = []
    with contextlib.suppress(OSError, ValueError):
        for key, array in load_file(str(path)).items():
            parts = key.split("/")
            if len(parts) >= 3 and parts[-1].isdigit():
                points.append(
                    Point(worker, parts[0], "/".join(parts[1:-1]), int(parts[-1]), -1, array)
                )
    return points


def collect(run: RunData) -> dict[str, list[Point]]:
    """Every diagnostic point of the run, by metric (arrays from the safetensors files included)."""
    by_metric: dict[str, list[Point]] = defaultdict(list)
    for worker, records in run.diagnostics.items():
        for record in records:
            for p in _points_of(worker, record):
                by_metric[p.metric].append(p)
    for worker, path in run.arrays.items():
        for p in _array_points(worker, path):
            by_metric[p.metric].append(p)
    return by_metric


def _scalar(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _series(points: list[Point]) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    grouped: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for p in points:
        v = _scalar(p.value)
        if v is not None:
            grouped[(p.worker, p.layer)].append((p.step, v))
    return {k: (np.array([s for s, _ in sorted(v)], float), np.array([y for _, y in sorted(v)], float))
            for k, v in grouped.items()}  # fmt: skip


def scalar_figure(
    points: list[Point], metric: str, title: str, yaxis: str, workers: list[str]
) -> Figure:
    """One line per worker and layer of a scalar metric against step."""
    series = _series(points)
    if not series:
        return nodata(metric, title, ENABLE)
    fig = go.Figure()
    for (worker, layer), (x, y) in sorted(series.items()):
        keep = decimate_index(len(x))
        fig.add_trace(go.Scatter(x=x[keep], y=y[keep], mode="lines+markers", name=f"{worker} {layer}",
                                 legendgroup=worker, line={"color": color(workers.index(worker)) if worker in workers else None}))  # fmt: skip
    fig.update_layout(height=380, xaxis_title="step", yaxis_title=yaxis)
    return Figure(metric, title, fig)


def jacobian_figure(points: list[Point], workers: list[str]) -> Figure:
    """Jacobian spectral radius per worker and epoch, the line at 1, and a star at the first
    epoch each worker went above 1 (seed 004)."""
    fig = scalar_figure(
        points, "jacobian_radius", "Jacobian spectral radius (seed 004)", "radius", workers
    )
    if fig.figure is None:
        return fig
    fig.figure.add_hline(y=1.0, line_dash="dot", line_color="#d62728")
    for (worker, layer), (x, y) in sorted(_series(points).items()):
        above = np.flatnonzero(y > 1.0)
        if above.size:
            k = int(above[0])
            fig.figure.add_trace(go.Scatter(x=[x[k]], y=[y[k]], mode="markers", name=f"{worker} first > 1",
                                            marker={"symbol": "star", "size": 14, "color": "#d62728"},
                                            meta={"kind": "first_over_1", "worker": worker, "layer": layer}))  # fmt: skip
    fig.caption = "The star marks the first diagnostics pass whose radius exceeded 1."
    return fig


def _arrays(points: list[Point]) -> dict[tuple[str, str], list[tuple[int, np.ndarray]]]:
    grouped: dict[tuple[str, str], list[tuple[int, np.ndarray]]] = defaultdict(list)
    for p in points:
        if isinstance(p.value, list | np.ndarray):
            with contextlib.suppress(ValueError, TypeError):
                grouped[(p.worker, p.layer)].append(
                    (p.step, np.asarray(p.value, dtype=float).ravel())
                )
    return grouped


def _matrix(rows: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    rows = sorted(rows, key=lambda r: r[0])
    rows = [rows[k] for k in decimate_index(len(rows), MAX_ROWS)]
    width = max(len(v) for _, v in rows)
    z = np.full((len(rows), width), np.nan)
    for i, (_, v) in enumerate(rows):
        z[i, : len(v)] = v
    return np.array([s for s, _ in rows], float), z


def _worker_menu(fig: go.Figure, owners: list[str]) -> None:
    """A dropdown showing one worker's traces at a time (the first worker's at start)."""
    workers = list(dict.fromkeys(owners))
    for trace, owner in zip(fig.data, owners, strict=True):
        trace.visible = owner == workers[0]
    if len(workers) > 1:
        buttons = [
            {"label": w, "method": "restyle", "args": [{"visible": [o == w for o in owners]}]}
            for w in workers
        ]
        fig.update_layout(updatemenus=[{"buttons": buttons, "x": 0, "y": 1.15, "xanchor": "left"}])


def array_figures(
    points: list[Point], metric: str, title: str, kind: str, xlabel: str
) -> list[Figure]:
    """Per layer, a heat map or surface of an array metric: x = index (bin, SV, distance,
    frequency), y = step, colour/z = value; a dropdown picks the worker."""
    grouped = _arrays(points)
    if not grouped:
        return [nodata(metric, title, ENABLE)]
    figures = []
    for layer in sorted({layer for _, layer in grouped}):
        fig, owners = go.Figure(), []
        for (worker, name), rows in sorted(grouped.items()):
            if name != layer:
                continue
            steps, z = _matrix(rows)
            trace = go.Surface(z=z, y=steps, name=worker, showscale=False) if kind == "surface" else \
                go.Heatmap(z=z, y=steps, name=worker, colorscale="Viridis")  # fmt: skip
            fig.add_trace(trace)
            owners.append(worker)
        _worker_menu(fig, owners)
        if kind == "surface":
            fig.update_layout(
                scene={"xaxis_title": xlabel, "yaxis_title": "step", "zaxis_title": "count"}
            )
        else:
            fig.update_layout(xaxis_title=xlabel, yaxis_title="step")
        slug = "".join(c if c.isalnum() else "-" for c in layer)
        figures.append(
            Figure(f"{metric}-{slug}", f"{title}, layer {layer}", fig.update_layout(height=460))
        )
    return figures


def spectrum_figures(points: list[Point], peaks: list[Point]) -> list[Figure]:
    """Update FFT magnitude spectra per layer (a line per pass, dB), persistent peaks marked."""
    figures = array_figures(
        points, "update_fft", "Weight-update FFT magnitude (seed 000)", "heatmap", "frequency bin"
    )
    peak_bins = {(p.worker, p.layer): p.value for p in peaks if isinstance(p.value, list)}
    for fig in figures:
        if fig.figure is None:
            continue
        for trace in fig.figure.data:
            trace.z = 20 * np.log10(np.abs(np.asarray(trace.z, float)) + 1e-12)
        layer = fig.title.rsplit("layer ", 1)[-1]
        for (worker, name), bins in peak_bins.items():
            for b in (b for b in bins if name == layer and isinstance(b, int | float)):
                fig.figure.add_vline(
                    x=b, line_dash="dot", line_color="white", annotation_text=f"{worker} peak"
                )
        fig.caption = (
            "Colour: magnitude in dB, one row per diagnostics pass; dotted: persistent peaks."
        )
    return figures


def trajectory_figure(run: RunData, points: list[Point]) -> Figure:
    """The prototype's view (seed 001): two tracked weights against loss, coloured by epoch, with
    the steps where the worker applied a merge marked."""
    title = "Two tracked weights vs loss (seed 001)"
    rows = [
        (p.worker, p.step, p.epoch, p.value)
        for p in points
        if isinstance(p.value, list) and len(p.value) >= 2
    ]
    if not rows:
        return nodata("trajectory", title, ENABLE)
    fig = go.Figure()
    workers = {w.name: w for w in run.workers}
    for name in sorted({r[0] for r in rows}):
        mine = sorted((r for r in rows if r[0] == name), key=lambda r: r[1])
        mine = [mine[k] for k in decimate_index(len(mine))]
        w = workers.get(name)
        loss = [w.loss_at(s) if w else None for _, s, _, _ in mine]
        fig.add_trace(go.Scatter3d(x=[float(v[0]) for *_, v in mine], y=loss, z=[float(v[1]) for *_, v in mine],
                                   mode="markers", name=name, marker={"size": 3, "color": [e for _, _, e, _ in mine],
                                   "colorscale": "Viridis", "showscale": True, "colorbar": {"title": "epoch"}}))  # fmt: skip
        merges = {
            m.step
            for m in (w.marks if w else [])
            if m.action == "merge" and m.outcome != "rejected"
        }
        hit = [r for r, ls in zip(mine, loss, strict=True) if r[1] in merges and ls is not None]
        if hit:
            fig.add_trace(go.Scatter3d(x=[float(v[0]) for *_, v in hit], y=[w.loss_at(s) for _, s, _, _ in hit] if w else [],
                                       z=[float(v[1]) for *_, v in hit], mode="markers", name=f"{name} merges",
                                       marker={"symbol": "diamond", "size": 6, "color": "red"}))  # fmt: skip
    fig.update_layout(
        height=560,
        scene={"xaxis_title": "weight 1", "yaxis_title": "loss", "zaxis_title": "weight 2"},
    )
    return Figure("trajectory", title, fig)


def diagnostics_figures(run: RunData) -> list[Figure]:
    """Every §8 figure, each a note when its metric was not recorded."""
    m = collect(run)
    workers = [w.name for w in run.workers]
    return [
        trajectory_figure(run, m["tracked_weights"]),
        scalar_figure(m["effective_rank"], "effective_rank", "Effective rank (Roy & Vetterli 2007)", "effective rank", workers),
        scalar_figure(m["gzip_ratio"], "gzip_ratio", "Gzip ratio of the weights (seed 002; lower = more structure)", "compressed / raw", workers),
        jacobian_figure(m["jacobian_radius"], workers),
        *array_figures(m["weight_histogram"], "weight_histogram", "Weight histogram over training (seed 002)", "surface", "bin"),
        *array_figures(m["singular_values"], "singular_values", "Singular values over training (seed 002)", "heatmap", "SV index"),
        *array_figures(m["delta_corr_by_distance"], "delta_corr_by_distance", "|ΔW| correlation vs layer distance (seed 002)", "heatmap", "layer distance"),
        *spectrum_figures(m["update_fft"], m["persistent_peaks"]),
        *array_figures(m["update_wavelet"], "update_wavelet", "Weight-update db4 wavelet details (seed 000)", "heatmap", "coefficient"),
    ]  # fmt: skip
