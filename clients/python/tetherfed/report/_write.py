"""Building and writing the report page of a run or experiment folder."""

from __future__ import annotations

from pathlib import Path

from ._data import ReportError, RunData, load_run
from ._diagnostics import diagnostics_figures
from ._experiment import ExperimentData, experiment_figures, facts, is_experiment, load_experiment
from ._page import Figure, Section, render_page
from ._run import (
    compatibility_figures,
    generations_figure,
    loss_figure,
    merge_graph_figure,
    timeline_figure,
)

REPORT_NAME = "report.html"
MAX_RUN_SECTIONS = 4  # runs whose training and federation an experiment report shows (the first)


def run_sections(run: RunData, prefix: str = "", diagnostics: bool = True) -> list[Section]:
    """The sections of one run; with a `prefix` (several runs on one page) section titles start
    with it and figure names with `run-<folder name>-`."""
    federation = [*compatibility_figures(run), timeline_figure(run), merge_graph_figure(run)]
    sections = [
        Section("Training", [loss_figure(run), generations_figure(run)]),
        Section("Federation", federation),
    ]
    if diagnostics:
        sections.append(Section("Weight diagnostics", diagnostics_figures(run)))
    for section in sections:
        section.title = f"{prefix}{section.title}"
        for fig in section.figures:
            fig.name = f"run-{run.folder.name}-{fig.name}" if prefix else fig.name
    return sections


def _run_facts(run: RunData) -> dict[str, str]:
    s = run.summary
    found = {"run": run.title, "folder": str(run.folder), "workers": str(len(run.workers))}
    if s:
        found["outcome"] = str(s.get("outcome", "?"))
        found["decisions"] = (
            ", ".join(
                f"{a} {n}" for a, n in sorted(s.get("decisions", {}).get("by_action", {}).items())
            )
            or "none"
        )
    if run.config.get("policy"):
        p = run.config["policy"]
        found["policy"] = (
            f"{p.get('measure')} merge > {p.get('merge_threshold')},"
            f" drift < {p.get('drift_threshold')}"
        )
    return found


def build_sections(folder: Path) -> tuple[str, dict[str, str], list[Section]]:
    """(title, header facts, sections) of the report of `folder` (a run or an experiment)."""
    if is_experiment(folder):
        exp: ExperimentData = load_experiment(folder)
        sections = [Section("Experiment", experiment_figures(exp))]
        for r in exp.runs[:MAX_RUN_SECTIONS]:  # diagnostics: `tetherfed report runs/<id>`
            sections += run_sections(
                r.run,
                prefix=f"run {r.run.folder.name} ({r.arm}, repeat {r.repeat}): ",
                diagnostics=False,
            )
        return f"Experiment {folder.name}", facts(exp), sections
    run = load_run(folder)
    return f"Run {run.title}", _run_facts(run), run_sections(run)


def figures(sections: list[Section]) -> list[Figure]:
    """Every figure of `sections`, in page order."""
    return [fig for section in sections for fig in section.figures]


def write_report(
    folder: str | Path, out: str | Path | None = None, png_dir: str | Path | None = None
) -> Path:
    """Write the report of a run or experiment folder to `out` (default `folder/report.html`),
    and a PNG per drawn figure into `png_dir` when given; returns the report's path.

    Raises `ReportError` when `folder` is neither a run nor an experiment folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder} is not a folder")
    title, header, sections = build_sections(folder)
    path = Path(out) if out is not None else folder / REPORT_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render_page(title, header, sections), encoding="utf-8")
    tmp.replace(path)
    if png_dir is not None:
        from ._png import write_pngs  # noqa: PLC0415 (matplotlib only for --png)

        write_pngs(figures(sections), Path(png_dir))
    return path
