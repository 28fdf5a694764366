"""The report hook of the launchers: `tetherfed up` and `tetherfed experiment run` end by writing
`report.html` into their folder and printing its path. A report that cannot be written (plotly not
installed, a folder with nothing to draw) is said in one line and never fails the run."""

from __future__ import annotations

from pathlib import Path


def report_line(folder: Path) -> str:
    """Write `folder/report.html`; the line to print: its path, or why there is none."""
    try:
        from .report import write_report  # noqa: PLC0415 (plotly only when reporting)

        return f"{'report:':<16} {write_report(folder).resolve()}"
    except Exception as error:
        return f"{'report:':<16} not written ({type(error).__name__}: {error})"
