"""`tetherfed report`: the report `tetherfed up` writes at its end, checked from its figure specs
(not pixels), and the same report in headless Chromium."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pages_helpers import EXTERNAL, Ensemble, figures, notes

from tetherfed.cli import main
from tetherfed.report import build_sections
from tetherfed.report import figures as report_figures
from tetherfed.report._page import decode
from tetherfed.report._png import write_pngs

# the first test also waits for the shared ensemble's run (`Ensemble.finished`)
pytestmark = [pytest.mark.integration, pytest.mark.torch, pytest.mark.timeout(420)]


def _traces(spec: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [t for t in spec["data"] if (t.get("meta") or {}).get("kind") == kind]


@pytest.fixture(scope="module")
def run_dir(ensemble: Ensemble) -> Path:
    """The finished run folder of the shared ensemble."""
    return ensemble.finished()


def test_up_prints_the_report_path_and_it_is_self_contained(
    ensemble: Ensemble, run_dir: Path
) -> None:
    report = run_dir / "report.html"
    assert f"report:          {report}" in ensemble.stdout, ensemble.stdout[-2000:]
    html = report.read_text()
    assert html.count("* plotly.js v") == 1, "plotly.js must be inlined exactly once"
    assert "<script src" not in html and not EXTERNAL.search(html.replace(_plotly_js(html), "")), (
        "no external resource"
    )


def _plotly_js(html: str) -> str:
    start = html.index('<script type="text/javascript">')
    return html[start : html.index("</script>", start)]


def test_run_report_has_every_figure(run_dir: Path) -> None:
    html = (run_dir / "report.html").read_text()
    specs, missing = figures(html), notes(html)
    loss = specs["loss"]
    lines = [t for t in loss["data"] if t.get("mode") == "lines"]
    assert {t["name"] for t in lines} >= {"worker-0 loss", "worker-1 loss", "worker-0 val loss"}
    merges = [t for t in _traces(loss, "mark") if t["meta"]["action"] == "merge"]
    assert merges and sum(len(decode(t["x"])) for t in merges) >= 1, (
        "the demo policy merges: marks expected"
    )
    compat = [name for name in specs if name.startswith("compat-")]
    assert compat, f"a compatibility heat map per scored layer; notes: {missing}"
    heat = specs[compat[0]]
    assert heat["data"][0]["type"] == "heatmap" and heat["layout"]["sliders"][0]["steps"]
    assert {t["name"] for t in specs["timeline"]["data"]} >= {"merge"}
    assert specs["merge-graph"]["data"] and specs["generations"]["data"]
    for metric in ("trajectory", "effective_rank", "gzip_ratio", "jacobian_radius"):
        assert metric in specs, f"{metric}: {missing.get(metric)}"
    assert specs["trajectory"]["data"][0]["type"] == "scatter3d"
    for metric in ("weight_histogram", "singular_values", "update_fft", "update_wavelet"):
        assert any(name.startswith(f"{metric}-") for name in specs), f"no {metric} figure"
    assert specs["weight_histogram-all"]["data"][0]["type"] == "surface"


def test_report_command_and_pngs(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.stat().st_size > 1_000_000
    _, _, sections = build_sections(run_dir)
    some = {"loss", "merge-graph", "trajectory", "weight_histogram-all", "singular_values-fc1"}
    written = write_pngs([f for f in report_figures(sections) if f.name in some], tmp_path / "png")
    assert {p.stem for p in written} == some and all(p.stat().st_size > 10_000 for p in written)
    assert main(["report", str(tmp_path / "png")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_report_opens_offline_in_chromium(page: Any, run_dir: Path, artifacts: Path) -> None:
    page.goto((run_dir / "report.html").as_uri())
    page.wait_for_selector("body[data-rendered=true]", timeout=120_000)
    assert page.evaluate(
        "[...document.querySelectorAll('.fig')].every(d => d.classList.contains('js-plotly-plot'))"
    )
    drawn = page.evaluate("""() => {
        const loss = document.getElementById('fig-loss');
        const heat = document.querySelector('[id^=fig-compat-]');
        return {lines: loss.querySelectorAll('.scatterlayer path.js-line').length,
                marks: loss.querySelectorAll('.scatterlayer path.point').length,
                heat: heat ? heat.querySelectorAll('.hm image').length : 0};
    }""")
    assert drawn["lines"] >= 2 and drawn["marks"] >= 1 and drawn["heat"] == 1, drawn
    page.screenshot(path=str(artifacts / "report.png"), full_page=True)
    assert page.log.errors == []
    assert [u for u in page.log.requests if not u.startswith("file:")] == [], (
        "the report fetched something"
    )
