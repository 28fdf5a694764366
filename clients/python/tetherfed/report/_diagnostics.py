"""Figures of the weight diagnostics a worker records (`--diagnostics`): effective rank, gzip
ratio, Jacobian radius, histogram surfaces, singular-value and |ΔW|-correlation heat maps, update
spectra with persistent peaks, and the prototype's 3-D scatter of two tracked weights vs loss.

Input (the worker folder, as `tetherfed.diagnostics` writes it): `diagnostics.jsonl` holds a
record per diagnostics pass (`event: diagnostics`, `step`, `epoch`, `metrics: {metric: {layer:
value}}`) whose numbers are the scalars drawn here; `diagnostics.safetensors` holds the arrays,
`metric/layer` stacked over passes with their steps in `metric/layer/step`, and the latest
`persistent_peaks/<layer>` (frequency, magnitude, phase agreement) and `tracked_weights/model`
(step, loss, w1, w2) tables; its metadata gives the histogram range. A metric nobody recorded
becomes a note, not an error.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

from ._data import RunData, decimate_index
from ._page import Figure, nodata
from ._run import color

ENABLE = "enable --diagnostics on the workers"
MAX_ROWS = 200  # diagnostics passes per heat map / surface (decimated beyond)
MAX_COLS = 512  # columns per heat map (max-pooled beyond: spectra keep their peaks)
SINGLE = ("persistent_peaks", "tracked_weights")  # tables stored whole, not stacked per pass


@dataclass
class Point:
    """One recorded value: a number or an array, of one metric and layer at one step."""

    worker: str
    metric: str
    layer: str
    step: int
    epoch: int
    value: Any


@dataclass
class Diagnostics:
    """A run's diagnostics: points by metric, and each worker's file metadata."""

    by_metric: dict[str, list[Point]] = field(default_factory=lambda: defaultdict(list))
    meta: dict[str, dict[str, str]] = field(default_factory=dict)


def _points_of(worker: str, record: dict[str, Any]) -> list[Point]:
    if record.get("event", "diagnostics") != "diagnostics":
        return []
    step, epoch = int(record.get("step") or 0), int(record.get("epoch") or 0)
    return [
        Point(worker, metric, str(layer), step, epoch, value)
        for metric, layers in (record.get("metrics") or {}).items()
        if isinstance(layers, dict)
        for layer, value in layers.items()
        if _scalar(value) is not None
    ]


def _read_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open  # noqa: PLC0415 (only with a diagnostics file)

    with contextlib.suppress(OSError, ValueError), safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    return {}, {}


def _array_points(
    worker: str, path: Path, epochs: dict[int, int]
) -> tuple[list[Point], dict[str, str]]:
    arrays, meta = _read_arrays(path)
    points = []
    for key, array in arrays.items():
        metric, _, layer = key.partition("/")
        if key.endswith("/step") or not layer:
            continue
        if metric in SINGLE:
            points.append(Point(worker, metric, layer, -1, -1, array))
        elif array.ndim == 2 and f"{key}/step" in arrays:
            steps = arrays[f"{key}/step"].astype(int)
            points += [
                Point(worker, metric, layer, int(s), epochs.get(int(s), -1), row)
                for s, row in zip(steps, array, strict=False)
            ]
    return points, meta


def collect(run: RunData) -> Diagnostics:
    """Every diagnostic of the run: scalars from the JSON lines, arrays from the safetensors."""
    found = Diagnostics()
    for worker, records in run.diagnostics.items():
        epochs = {int(r.get("step") or 0): int(r.get("epoch") or 0) for r in records}
        for record in records:
            for p in _points_of(worker, record):
                found.by_metric[p.metric].append(p)
        if worker in run.arrays:
            points, found.meta[worker] = _array_points(worker, run.arrays[worker], epochs)
            for p in points:
                found.by_metric[p.metric].append(p)
    return found


def _scalar(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _series(
    points: list[Point],
) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(worker, layer) → (steps, values, epochs) of a scalar metric, by step."""
    grouped: dict[tuple[str, str], list[tuple[int, float, int]]] = defaultdict(list)
    for p in points:
        v = _scalar(p.value)
        if v is not None:
            grouped[(p.worker, p.layer)].append((p.step, v, p.epoch))
    series = {}
    for k, rows in grouped.items():
        steps, values, epochs = zip(*sorted(rows), strict=True)
        series[k] = (np.array(steps, float), np.array(values, float), np.array(epochs, float))
    return series


def scalar_figure(
    points: list[Point], metric: str, title: str, yaxis: str, workers: list[str]
) -> Figure:
    """One line per worker and layer of a scalar metric against step."""
    series = _series(points)
    if not series:
        return nodata(metric, title, ENABLE)
    fig = go.Figure()
    for (worker, layer), (x, y, _) in sorted(series.items()):
        keep = decimate_index(len(x))
        dash = "dot" if layer in ("all", "model") else None
        fig.add_trace(
            go.Scatter(
                x=x[keep],
                y=y[keep],
                mode="lines+markers",
                name=f"{worker} {layer}",
                legendgroup=worker,
                line={
                    "color": color(workers.index(worker)) if worker in workers else None,
                    "dash": dash,
                },
            )
        )
    fig.update_layout(height=380, xaxis_title="step", yaxis_title=yaxis)
    return Figure(metric, title, fig)


def jacobian_figure(points: list[Point], workers: list[str]) -> Figure:
    """Jacobian spectral radius per worker and diagnostics pass, the line at 1, and a star at
    the first pass (its epoch in the legend) each worker went above 1."""
    fig = scalar_figure(points, "jacobian_radius", "Jacobian spectral radius", "radius", workers)
    if fig.figure is None:
        return fig
    fig.figure.add_hline(y=1.0, line_dash="dot", line_color="#d62728")
    for (worker, _layer), (x, y, epochs) in sorted(_series(points).items()):
        above = np.flatnonzero(y > 1.0)
        if above.size:
            k = int(above[0])
            fig.figure.add_trace(
                go.Scatter(
                    x=[x[k]],
                    y=[y[k]],
                    mode="markers",
                    name=f"{worker}: first > 1 at epoch {int(epochs[k])}",
                    marker={"symbol": "star", "size": 14, "color": "#d62728"},
                    meta={"kind": "first_over_1", "worker": worker, "epoch": int(epochs[k])},
                )
            )
    fig.caption = (
        "Largest |eigenvalue| of the input→output Jacobian (largest singular value when the map"
        " is not square); the star marks the first pass above 1."
    )
    return fig


def _pool(row: np.ndarray, width: int) -> np.ndarray:
    if len(row) <= width:
        return row
    edges = np.linspace(0, len(row), width + 1).astype(int)
    return np.maximum.reduceat(row, edges[:-1])


def _matrix(rows: list[Point]) -> tuple[np.ndarray, np.ndarray, int]:
    """(steps, z rows × columns as float32, the original width): passes decimated to MAX_ROWS,
    columns max-pooled to MAX_COLS."""
    rows = sorted(rows, key=lambda p: p.step)
    rows = [rows[k] for k in decimate_index(len(rows), MAX_ROWS)]
    width = max(len(np.ravel(p.value)) for p in rows)
    z = np.full((len(rows), min(width, MAX_COLS)), np.nan, dtype=np.float32)
    for i, p in enumerate(rows):
        v = _pool(np.asarray(p.value, dtype=np.float32).ravel(), MAX_COLS)
        z[i, : len(v)] = v
    return np.array([p.step for p in rows], float), z, width


def _axis(metric: str, width: int, columns: int, meta: dict[str, str]) -> np.ndarray:
    """Column coordinates: histogram bin centres, FFT frequency (cycles per step), else index."""
    if metric == "weight_histogram" and "histogram_range" in meta:
        lo, hi = json.loads(meta["histogram_range"])
        edges = np.linspace(lo, hi, width + 1)
        return np.linspace((edges[0] + edges[1]) / 2, (edges[-2] + edges[-1]) / 2, columns)
    if metric == "update_fft":
        return np.linspace(0.0, 0.5, columns)
    if metric == "delta_corr_by_distance":
        return np.arange(1, columns + 1, dtype=float)
    return np.arange(columns, dtype=float)


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


@dataclass
class ArrayView:
    """How one array metric is drawn."""

    metric: str
    title: str
    kind: str  # heatmap | surface (a surface for layer `all` only, a density heat map per layer)
    xlabel: str
    zlabel: str = ""
    caption: str = ""


def _surface(view: ArrayView, layer: str) -> bool:
    # WebGL contexts are few, and slow when software-rendered: one surface per metric (layer
    # `all`), a density heat map per layer (both views).
    return view.kind == "surface" and layer == "all"


def _trace(
    view: ArrayView, worker: str, rows: list[Point], meta: dict[str, str], surface: bool
) -> go.Heatmap | go.Surface:
    steps, z, width = _matrix(rows)
    x = _axis(view.metric, width, z.shape[1], meta)
    if view.metric == "update_fft":
        z = (20 * np.log10(np.abs(z) + 1e-12)).astype(np.float32)
    if surface:
        return go.Surface(z=z, x=x, y=steps, name=worker, showscale=False, colorscale="Viridis")
    return go.Heatmap(
        z=z, x=x, y=steps, name=worker, colorscale="Viridis", colorbar={"title": view.zlabel}
    )


def array_figures(diag: Diagnostics, view: ArrayView) -> list[Figure]:
    """Per layer, a heat map or surface of an array metric: x = bin / SV index / distance /
    frequency, y = step, colour or height = value; a dropdown picks the worker."""
    grouped: dict[tuple[str, str], list[Point]] = defaultdict(list)
    for p in diag.by_metric[view.metric]:
        if isinstance(p.value, np.ndarray) and p.step >= 0:
            grouped[(p.worker, p.layer)].append(p)
    if not grouped:
        return [nodata(view.metric, view.title, ENABLE)]
    figures = []
    for layer in sorted({layer for _, layer in grouped}):
        fig, owners = go.Figure(), []
        for (worker, name), rows in sorted(grouped.items()):
            if name == layer:
                fig.add_trace(
                    _trace(view, worker, rows, diag.meta.get(worker, {}), _surface(view, layer))
                )
                owners.append(worker)
        _worker_menu(fig, owners)
        if view.kind == "surface":
            fig.update_layout(
                scene={
                    "xaxis_title": view.xlabel,
                    "yaxis_title": "step",
                    "zaxis_title": view.zlabel,
                }
            )
        else:
            fig.update_layout(xaxis_title=view.xlabel, yaxis_title="step")
        slug = "".join(c if c.isalnum() else "-" for c in layer)
        figures.append(
            Figure(
                f"{view.metric}-{slug}",
                f"{view.title}, layer {layer}",
                fig.update_layout(height=460),
                caption=view.caption,
            )
        )
    return figures


def _mark_peaks(figures: list[Figure], diag: Diagnostics) -> None:
    """Dotted lines at each layer's persistent peaks (first worker's), phase agreement in the
    label."""
    tables = {
        (p.worker, p.layer): np.asarray(p.value).reshape(-1, 3)
        for p in diag.by_metric["persistent_peaks"]
        if isinstance(p.value, np.ndarray)
    }
    for fig in figures:
        if fig.figure is None:
            continue
        layer = fig.title.rsplit("layer ", 1)[-1]
        worker = next((w for (w, name) in sorted(tables) if name == layer), None)
        for freq, _, phase in tables.get((worker, layer), np.zeros((0, 3)))[:8] if worker else []:
            fig.figure.add_vline(
                x=float(freq),
                line_dash="dot",
                line_color="white",
                annotation_text=f"peak, phase {phase:.2f}",
                annotation_font_color="white",
            )


def trajectory_figure(run: RunData, diag: Diagnostics) -> Figure:
    """The prototype's view: two tracked weights against the loss at each step,
    coloured by epoch, with the steps where the worker applied a merge marked."""
    title = "Two tracked weights vs loss"
    tables = {
        p.worker: np.asarray(p.value, dtype=float).reshape(-1, 4)
        for p in diag.by_metric["tracked_weights"]
    }
    tables = {w: t for w, t in tables.items() if len(t)}
    if not tables:
        return nodata("trajectory", title, ENABLE)
    fig, workers = go.Figure(), {w.name: w for w in run.workers}
    for name, table in sorted(tables.items()):
        rows, w = table[decimate_index(len(table))], workers.get(name)
        epochs = (
            np.interp(rows[:, 0], w.step, w.epoch)
            if w is not None and w.step.size
            else np.zeros(len(rows))
        )
        fig.add_trace(
            go.Scatter3d(
                x=rows[:, 2],
                y=rows[:, 1],
                z=rows[:, 3],
                mode="markers",
                name=name,
                marker={
                    "size": 2,
                    "color": epochs,
                    "colorscale": "Viridis",
                    "showscale": len(fig.data) == 0,
                    "colorbar": {"title": "epoch"},
                },
            )
        )
        merges = np.array(
            sorted(
                {
                    m.step
                    for m in (w.marks if w else [])
                    if m.action == "merge" and m.outcome != "rejected"
                }
            )
        )
        hit = table[np.isin(table[:, 0].astype(int), merges)] if merges.size else table[:0]
        if len(hit):
            fig.add_trace(
                go.Scatter3d(
                    x=hit[:, 2],
                    y=hit[:, 1],
                    z=hit[:, 3],
                    mode="markers",
                    name=f"{name} merges",
                    marker={"symbol": "diamond", "size": 4, "color": "red"},
                    meta={"kind": "mark", "action": "merge", "worker": name},
                )
            )
    names = [
        *json.loads(next(iter(diag.meta.values()), {}).get("tracked", "[]") or "[]"),
        "weight 1",
        "weight 2",
    ]
    fig.update_layout(
        height=600, scene={"xaxis_title": names[0], "yaxis_title": "loss", "zaxis_title": names[1]}
    )
    return Figure("trajectory", title, fig)


VIEWS = [
    ArrayView(
        "weight_histogram",
        "Weight histogram over training",
        "surface",
        "weight value",
        "count",
    ),
    ArrayView("singular_values", "Singular values over training", "heatmap", "SV index", "σ"),
    ArrayView(
        "delta_corr_by_distance",
        "|ΔW from init| correlation vs layer distance",
        "heatmap",
        "layer distance",
        "corr",
        "QQ-aligned correlation of |ΔW| between layers, averaged by distance.",
    ),
    ArrayView(
        "update_fft",
        "Weight-update FFT magnitude",
        "heatmap",
        "frequency (cycles / step)",
        "dB",
        "Magnitude in dB, one row per diagnostics pass; dotted: persistent peaks.",
    ),
    ArrayView(
        "update_wavelet",
        "Weight-update db4 wavelet details, 5 levels",
        "heatmap",
        "coefficient",
        "value",
    ),
]


def diagnostics_figures(run: RunData) -> list[Figure]:
    """Every diagnostics figure, each a note when its metric was not recorded."""
    diag, workers = collect(run), [w.name for w in run.workers]
    m = diag.by_metric
    figures = [
        trajectory_figure(run, diag),
        scalar_figure(
            m["effective_rank"],
            "effective_rank",
            "Effective rank (Roy & Vetterli 2007)",
            "effective rank",
            workers,
        ),
        scalar_figure(
            m["gzip_ratio"],
            "gzip_ratio",
            "Gzip ratio of the weights (lower = more structure)",
            "compressed / raw",
            workers,
        ),
        jacobian_figure(m["jacobian_radius"], workers),
    ]
    for view in VIEWS:
        found = array_figures(diag, view)
        if view.metric == "update_fft":
            _mark_peaks(found, diag)
        figures += found
    return figures
