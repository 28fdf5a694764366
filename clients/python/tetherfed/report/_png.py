"""Static PNGs of the report's figures with matplotlib (`tetherfed report DIR --png OUT`), for
papers. Each plotly spec is redrawn from its data: lines and markers, heat maps, 3-D scatters and
surfaces, boxes; tables and parallel coordinates have no static form here and are skipped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt
import numpy as np

from ._page import Figure, decode

SKIPPED = {"table", "parcoords"}


def _arr(values: Any) -> np.ndarray:
    return decode(values) if values is not None else np.zeros(0)


def _draw_2d(ax: Any, trace: dict[str, Any]) -> None:
    kind = trace.get("type", "scatter")
    if kind == "heatmap":
        z = decode(trace["z"]).astype(float)
        ax.imshow(z, aspect="auto", origin="lower", cmap="viridis")
    elif kind == "box":
        ax.scatter(range(len(trace.get("y", []))), _arr(trace.get("y")), label=trace.get("name"))
    elif kind == "scatter" and trace.get("x") is not None and trace.get("y") is not None:
        lines = "lines" in trace.get("mode", "lines")
        style = "-" if lines else "o"
        ax.plot(_arr(trace["x"]), _arr(trace["y"]), style, label=trace.get("name"), markersize=3)


def _draw_3d(ax: Any, trace: dict[str, Any]) -> None:
    if trace.get("type") == "surface":
        z = decode(trace["z"]).astype(float)
        x, y = np.meshgrid(np.arange(z.shape[1]), np.arange(z.shape[0]))
        ax.plot_surface(x, y, z, cmap="viridis")
    else:
        ax.scatter(
            _arr(trace["x"]), _arr(trace["y"]), _arr(trace["z"]), s=4, label=trace.get("name")
        )


def render_png(fig: Figure, path: Path) -> bool:
    """Draw one figure to `path`; False when it has no static form (or no data)."""
    if fig.figure is None:
        return False
    spec = fig.spec()
    traces = [t for t in spec.get("data", []) if t.get("visible", True) is not False]
    if not traces or any(t.get("type") in SKIPPED for t in traces):
        return False
    three_d = any(t.get("type") in ("scatter3d", "surface") for t in traces)
    figure = plt.figure(figsize=(8, 5))
    ax = figure.add_subplot(projection="3d" if three_d else None)
    for trace in traces:
        (_draw_3d if three_d else _draw_2d)(ax, trace)
    ax.set_title(fig.title, fontsize=10)
    if 1 < len(traces) <= 12:
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_pngs(figures: list[Figure], out: Path) -> list[Path]:
    """A PNG per drawable figure, named after it; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    return [out / f"{f.name}.png" for f in figures if render_png(f, out / f"{f.name}.png")]
