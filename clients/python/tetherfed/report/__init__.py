"""`tetherfed report DIR`: one self-contained HTML report of a run or an experiment folder.

    from tetherfed.report import write_report
    path = write_report("runs/demo")          # runs/demo/report.html
    write_report("runs/sweep", png_dir="figs")  # also a PNG per figure (matplotlib)

The page inlines plotly.js once and every figure's spec as JSON, so it opens offline. A run report
draws the loss with merge and drift marks, compatibility heat maps over time, the decision timeline,
the merge graph, generations and every weight diagnostic; an experiment report the summary table,
mean ± std bands, parallel coordinates, cluster recovery and the paired federated − independent
comparison, followed by a short section per run. A figure whose data is missing says so ("no data:
…") instead of failing. Needs the `report` extra (plotly, scipy).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tetherfed._lazy import lazy_exports

if TYPE_CHECKING:
    from ._data import ReportError
    from ._page import Figure, Section
    from ._write import build_sections, figures, write_report

__all__ = [
    "Figure",
    "ReportError",
    "Section",
    "build_sections",
    "figures",
    "report_hook",
    "report_line",
    "write_report",
]

# Loaded on first use, so that `report_hook` works (and says why) without plotly installed.
_LAZY = {
    "ReportError": "._data",
    "Figure": "._page",
    "Section": "._page",
    "build_sections": "._write",
    "figures": "._write",
    "write_report": "._write",
}


__getattr__ = lazy_exports(__name__, _LAZY)


def report_line(folder: Path) -> str:
    """Write `folder/report.html`; the line to print: its path, or why there is none."""
    try:
        from ._write import write_report  # noqa: PLC0415 (plotly only when reporting)

        return f"{'report:':<16} {write_report(folder).resolve()}"
    except Exception as error:
        return f"{'report:':<16} not written ({type(error).__name__}: {error})"


def report_hook(folder: Path) -> None:
    """Write `folder/report.html` and print its path, or why there is none. `tetherfed up` and
    experiments call this at the end; a report that cannot be written never fails a run."""
    print(report_line(folder), flush=True)
