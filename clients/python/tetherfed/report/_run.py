"""Figures of one run: loss with decision marks, compatibility over time, decision timeline,
merge graph and generations."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from ._data import MAX_POINTS, Mark, RunData, WorkerSeries, decimate_index
from ._page import Figure, nodata

COLORS = qualitative.Plotly
ACTION_COLORS = {"merge": "#2ca02c", "drift": "#d62728", "hold": "#9e9e9e"}
MARK_SYMBOLS = {
    ("merge", "applied"): "triangle-up",
    ("drift", "applied"): "triangle-down",
    ("merge", "issued"): "triangle-up-open",
    ("drift", "issued"): "triangle-down-open",
}
HEATMAP_FRAMES = 12
# measures in [-1, 1]: one colour scale for every frame
BOUNDED = ("pearson", "cosine", "cka", "update_cosine")
MAX_LAYERS = 8
NO_DECISIONS = "the run folder has no decisions.jsonl with scored decisions"


def color(i: int) -> str:
    """The i-th worker's colour."""
    return str(COLORS[i % len(COLORS)])


def _line(x: np.ndarray, y: np.ndarray, **kwargs: Any) -> go.Scatter:
    keep = decimate_index(len(x))
    return go.Scatter(x=x[keep], y=y[keep], mode="lines", **kwargs)


def _mark_trace(
    w: WorkerSeries, i: int, action: str, outcome: str, marks: list[Mark]
) -> go.Scatter:
    steps = np.array([m.step for m in marks], dtype=float)
    keep = decimate_index(len(steps), MAX_POINTS // 4)
    text = [
        f"{w.name} {m.action} {m.outcome} (layer {m.layer or '?'}, partner {m.partner or '?'})"
        for m in marks
    ]
    symbol = MARK_SYMBOLS.get((action, outcome), "x")
    return go.Scatter(
        x=steps[keep],
        y=[w.loss_at(s) for s in steps[keep]],
        mode="markers",
        name=f"{w.name} {action} ({outcome})",
        legendgroup=w.name,
        hovertext=[text[k] for k in keep],
        marker={
            "symbol": symbol,
            "size": 9,
            "color": ACTION_COLORS[action],
            "line": {"color": color(i), "width": 1},
        },
        meta={
            "kind": "mark",
            "action": action,
            "outcome": outcome,
            "worker": w.name,
            "count": len(marks),
        },
    )


def loss_figure(run: RunData) -> Figure:
    """Training loss (lines) and validation loss (dashed) per worker against step, with a marker
    for every merge (▲) and drift (▼) the worker applied (open: issued, no ack known;
    ×: rejected)."""
    if not any(w.step.size for w in run.workers):
        return nodata("loss", "Loss", "no worker logged a step")
    fig = go.Figure()
    for i, w in enumerate(run.workers):
        fig.add_trace(
            _line(
                w.step, w.loss, name=f"{w.name} loss", legendgroup=w.name, line={"color": color(i)}
            )
        )
        if w.val_step.size:
            fig.add_trace(
                _line(
                    w.val_step,
                    w.val_loss,
                    name=f"{w.name} val loss",
                    legendgroup=w.name,
                    line={"color": color(i), "dash": "dash"},
                )
            )
        by_kind: dict[tuple[str, str], list[Mark]] = defaultdict(list)
        for m in w.marks:
            by_kind[(m.action, m.outcome)].append(m)
        for (action, outcome), marks in sorted(by_kind.items()):
            fig.add_trace(_mark_trace(w, i, action, outcome, marks))
    scales = [
        {"label": scale, "method": "relayout", "args": [{"yaxis.type": scale}]}
        for scale in ("linear", "log")
    ]
    fig.update_layout(
        xaxis_title="step",
        yaxis_title="loss",
        hovermode="closest",
        height=480,
        updatemenus=[
            {
                "buttons": scales,
                "type": "buttons",
                "direction": "right",
                "x": 0,
                "y": 1.12,
                "xanchor": "left",
            }
        ],
    )
    return Figure("loss", "Loss and validation loss, with merge (▲) and drift (▼) marks", fig)


def _pair_scores(run: RunData, layer: str) -> list[tuple[int, str, str, float]]:
    return [
        (int(d.get("id") or 0), d["worker_id"], d["partner_id"], float(d["score"]))
        for d in run.decisions
        if d.get("layer") == layer and d.get("score") is not None and d.get("partner_id")
    ]


def _frames(
    run: RunData, layer: str, order: list[str]
) -> list[tuple[str, list[list[float | None]]]]:
    """(label, matrix) snapshots: the latest score of each pair, after each slice of decisions."""
    scores = _pair_scores(run, layer)
    index, m = {wid: k for k, wid in enumerate(order)}, len(order)
    matrix: list[list[float | None]] = [[None] * m for _ in range(m)]
    steps = {d.get("id"): (d.get("own_snapshot") or {}).get("step", 0) for d in run.decisions}
    cuts = np.unique(np.linspace(0, len(scores), HEATMAP_FRAMES + 1).round().astype(int))[1:]
    frames, start = [], 0
    for stop in cuts:
        for _, a, b, score in scores[start:stop]:
            if a in index and b in index:
                matrix[index[a]][index[b]] = matrix[index[b]][index[a]] = round(score, 4)
        frames.append((f"step {steps.get(scores[stop - 1][0], '?')}", [row[:] for row in matrix]))
        start = stop
    return frames


def _layers(run: RunData) -> list[str]:
    counts = Counter(d.get("layer") for d in run.decisions if d.get("score") is not None)
    return [layer for layer, _ in counts.most_common(MAX_LAYERS) if layer]


def compatibility_figure(run: RunData, layer: str) -> Figure:
    """The layer's compatibility matrix (the latest scored pair) over time, one slider position per
    slice of the decision log; colour = the policy's measure."""
    order = [w.worker_id for w in run.workers if w.worker_id]
    frames = _frames(run, layer, order)
    names = [run.names[wid] for wid in order]
    measure = next((d.get("measure") for d in run.decisions if d.get("layer") == layer), "score")
    bounded = {"zmin": -1.0, "zmax": 1.0} if measure in BOUNDED else {"zmid": 0}
    heat = go.Heatmap(
        z=frames[-1][1],
        x=names,
        y=names,
        colorscale="RdBu",
        **bounded,
        colorbar={"title": measure},
        hoverongaps=False,
    )
    steps = [
        {"label": label, "method": "restyle", "args": [{"z": [z]}, [0]]} for label, z in frames
    ]
    fig = go.Figure(heat)
    fig.update_layout(
        height=460,
        yaxis={"autorange": "reversed"},
        sliders=[{"active": len(steps) - 1, "steps": steps, "currentvalue": {"prefix": "after "}}],
    )
    name = "compat-" + "".join(c if c.isalnum() else "-" for c in layer)
    return Figure(
        name,
        f"Compatibility over time, layer {layer} ({measure})",
        fig,
        caption="Slide to see the matrix after each slice of the decision log.",
    )


def compatibility_figures(run: RunData) -> list[Figure]:
    """One heat map per scored layer (at most MAX_LAYERS, the most scored)."""
    layers = _layers(run)
    if not layers:
        return [nodata("compat", "Compatibility over time", NO_DECISIONS)]
    return [compatibility_figure(run, layer) for layer in layers]


def timeline_figure(run: RunData) -> Figure:
    """Every decision at its time, one row per worker, coloured by action (holds decimated)."""
    if not run.decisions:
        return nodata("timeline", "Decision timeline", NO_DECISIONS)
    fig = go.Figure()
    for action in ("hold", "drift", "merge"):
        ds = [d for d in run.decisions if d.get("action") == action]
        keep = decimate_index(len(ds), MAX_POINTS)
        ds = [ds[k] for k in keep]
        if not ds:
            continue
        fig.add_trace(
            go.Scatter(
                x=[d.get("created_at") for d in ds],
                y=[run.names.get(str(d.get("worker_id")), d.get("worker_id")) for d in ds],
                mode="markers",
                name=action,
                marker={"color": ACTION_COLORS[action], "size": 7, "opacity": 0.7},
                hovertext=[
                    f"#{d.get('id')} {action} {d.get('layer')} score {d.get('score')}" for d in ds
                ],
            )
        )
    fig.update_layout(height=360, xaxis_title="time", yaxis_title="worker")
    return Figure("timeline", "Decision timeline by action", fig)


def _edges(run: RunData) -> Counter[tuple[str, str]]:
    edges: Counter[tuple[str, str]] = Counter()
    for w in run.workers:
        for m in w.marks:
            if m.action == "merge" and m.outcome != "rejected" and m.partner:
                a, b = sorted((w.name, run.names.get(m.partner, m.partner)))
                edges[(a, b)] += 1
    if not edges:  # no decision log: the launcher's summary has the graph
        for e in run.summary.get("merge_graph", []):
            a, b = sorted((e["worker"], e["partner"]))
            edges[(a, b)] += int(e.get("merges", 0))
    return edges


def merge_graph_figure(run: RunData) -> Figure:
    """Who merged with whom: workers on a circle (coloured by group), an edge per pair, its width
    and label the merges applied between them (both directions)."""
    edges = _edges(run)
    if not edges:
        return nodata("merge-graph", "Merge graph", "no merge was applied in this run")
    n = len(run.workers)
    pos = {
        w.name: (math.cos(2 * math.pi * k / n), math.sin(2 * math.pi * k / n))
        for k, w in enumerate(run.workers)
    }
    top, fig = max(edges.values()), go.Figure()
    for (a, b), count in edges.items():
        if a in pos and b in pos:
            (x0, y0), (x1, y1) = pos[a], pos[b]
            fig.add_trace(
                go.Scatter(
                    x=[x0, x1],
                    y=[y0, y1],
                    mode="lines",
                    showlegend=False,
                    hoverinfo="skip",
                    line={"width": 1 + 9 * count / top, "color": "#7f7f7f"},
                )
            )
            fig.add_annotation(
                x=(x0 + x1) / 2, y=(y0 + y1) / 2, text=str(count), showarrow=False, bgcolor="white"
            )
    groups = sorted({w.group for w in run.workers})
    for g, group in enumerate(groups):
        ws = [w for w in run.workers if w.group == group]
        fig.add_trace(
            go.Scatter(
                x=[pos[w.name][0] for w in ws],
                y=[pos[w.name][1] for w in ws],
                mode="markers+text",
                text=[w.name for w in ws],
                textposition="top center",
                name=f"group {group}",
                marker={"size": 22, "color": color(g)},
            )
        )
    axis = {"visible": False, "range": [-1.4, 1.4]}
    fig.update_layout(height=460, xaxis=axis, yaxis={**axis, "scaleanchor": "x"})
    return Figure("merge-graph", "Merge graph (merges applied per pair)", fig)


def generations_figure(run: RunData) -> Figure:
    """Generations (decisions applied, summed over layers) of each worker's tethers over steps."""
    if not any(w.generation.size for w in run.workers):
        return nodata("generations", "Generations", "no worker logged a step")
    fig = go.Figure()
    for i, w in enumerate(run.workers):
        fig.add_trace(
            _line(w.step, w.generation, name=w.name, line={"color": color(i), "shape": "hv"})
        )
    fig.update_layout(height=360, xaxis_title="step", yaxis_title="generation (sum over layers)")
    return Figure("generations", "Tether generations", fig)
