"""One self-contained HTML page: plotly.js inlined once, each figure's spec as inline JSON.

Every figure is a `<script type="application/json" class="tf-figure">` holding its plotly spec
(data + layout, without the shared template, which is inlined once too) next to the `<div>` it
is drawn into. One small script draws them all with `Plotly.newPlot`. Nothing is fetched at view
time: no CDN, no fonts, no MathJax, no map tiles.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

TEMPLATE = "plotly_white"
PLOT_CONFIG = {"displaylogo": False, "responsive": True, "showLink": False}


def decode(values: Any) -> np.ndarray:
    """A spec's array as numpy: plotly writes numpy data as `{dtype, bdata (base64), shape}`,
    lists stay lists (None → NaN for numbers)."""
    if isinstance(values, dict) and "bdata" in values:
        flat = np.frombuffer(base64.b64decode(values["bdata"]), dtype=np.dtype(values["dtype"]))
        shape = [int(n) for n in str(values.get("shape", len(flat))).split(",")]
        return flat.reshape(shape)
    try:
        return np.array(
            [
                [np.nan if v is None else v for v in row]
                if isinstance(row, list)
                else (np.nan if row is None else row)
                for row in values
            ],
            dtype=float,
        )
    except (TypeError, ValueError):
        return np.array(values, dtype=object)


@dataclass
class Figure:
    """A titled figure of the report, or the note saying why it has no data."""

    name: str  # stable id: the div is `fig-<name>`, tests look figures up by it
    title: str
    figure: go.Figure | None = None
    note: str = ""  # shown instead of the figure when `figure` is None
    caption: str = ""

    def spec(self) -> dict[str, Any]:
        """The plotly spec (data + layout) without the shared template, every string as plain
        text (see :func:`plain`)."""
        assert self.figure is not None
        spec: dict[str, Any] = json.loads(pio.to_json(self.figure, validate=False))
        spec.get("layout", {}).pop("template", None)
        return cast(dict[str, Any], plain(spec))


def plain(value: Any) -> Any:
    """`value` with `&`, `<` and `>` in every string written as entities, recursively.

    plotly.js renders a subset of HTML in names, hover text and category labels (`<a href>`
    among them), so a layer or worker name holding an anchor became a live external link in
    the report. The report's own strings use no markup; entities display as the characters.
    """
    if isinstance(value, str):
        return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


@dataclass
class Section:
    """A heading and its figures."""

    title: str
    figures: list[Figure] = field(default_factory=list)


def nodata(name: str, title: str, why: str) -> Figure:
    """A figure slot that says why there is nothing to draw."""
    return Figure(name=name, title=title, note=f"no data: {why}")


def _json_script(payload: Any, attrs: str) -> str:
    # `<` escaped: no name in the data can end the script element or open a comment in it.
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return f'<script type="application/json" {attrs}>{text}</script>'


def _template() -> dict[str, Any]:
    spec = json.loads(pio.to_json(go.Figure(layout={"template": TEMPLATE}), validate=False))
    return dict(spec["layout"]["template"])


def _figure_html(fig: Figure) -> str:
    head = f'<h3 id="h-{fig.name}">{html.escape(fig.title)}</h3>'
    caption = f'<p class="caption">{html.escape(fig.caption)}</p>' if fig.caption else ""
    if fig.figure is None:
        return f'{head}<p class="nodata" id="fig-{fig.name}">{html.escape(fig.note)}</p>{caption}'
    div = f'<div class="fig" id="fig-{fig.name}"></div>'
    return (
        head
        + div
        + _json_script(fig.spec(), f'class="tf-figure" data-target="fig-{fig.name}"')
        + caption
    )


RENDER = """
(function () {
  // One figure per animation frame, so the page shows (and "load" fires) before the last is drawn.
  var template = JSON.parse(document.getElementById("tf-template").textContent);
  var config = JSON.parse(document.getElementById("tf-config").textContent);
  var nodes = Array.prototype.slice.call(document.querySelectorAll("script.tf-figure"));
  function next() {
    var node = nodes.shift();
    if (!node) { document.body.dataset.rendered = "true"; return; }
    var spec = JSON.parse(node.textContent);
    spec.layout = spec.layout || {};
    spec.layout.template = template;
    spec.layout.margin = spec.layout.margin || {t: spec.layout.updatemenus ? 60 : 30};
    Plotly.newPlot(node.dataset.target, spec.data || [], spec.layout, config).then(function () {
      requestAnimationFrame(next);
    });
  }
  next();
})();
"""

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;
padding:1rem 2rem;color:#222}
h1{margin-bottom:.2rem} .meta{color:#666;margin-top:0}
h2{border-bottom:1px solid #ddd;padding-top:1rem}
.fig{width:100%} .nodata{color:#8a6d3b;background:#fcf8e3;padding:.6rem;border-radius:4px}
.caption{color:#555;font-size:.9rem} nav a{margin-right:1rem} table.kv td{padding:0 1rem 0 0}
"""


def _toc(sections: list[Section]) -> str:
    links = "".join(f'<a href="#s-{i}">{html.escape(s.title)}</a>' for i, s in enumerate(sections))
    return f"<nav>{links}</nav>"


def render_page(title: str, facts: dict[str, str], sections: list[Section]) -> str:
    """The whole HTML document."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in facts.items()
    )
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">tetherfed report, written {stamp}</p>',
        f'<table class="kv">{rows}</table>',
        _toc(sections),
    ]
    for i, section in enumerate(sections):
        body.append(f'<section id="s-{i}"><h2>{html.escape(section.title)}</h2>')
        body += [_figure_html(fig) for fig in section.figures]
        body.append("</section>")
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title><style>{STYLE}</style>",
            f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>',
            *body,
            _json_script(_template(), 'id="tf-template"'),
            _json_script(PLOT_CONFIG, 'id="tf-config"'),
            f"<script>{RENDER}</script>",
            "</body></html>",
        ]
    )
