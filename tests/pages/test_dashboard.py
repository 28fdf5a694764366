"""The coordinator's live dashboard (/ui/) in headless Chromium while `tetherfed up` runs: the
token is entered in the page (never in a URL), the loss plot and heat map are drawn, and merge
marks appear as merge decisions arrive — without reloading the page."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from pages_helpers import Ensemble

pytestmark = [pytest.mark.integration, pytest.mark.torch]

LIVE_TIMEOUT_MS = 120_000

DRAWN = """() => {
    const loss = document.getElementById('loss'), compat = document.getElementById('compat');
    const traces = (loss && loss.data) || [];
    const merges = traces.find(t => t.meta && t.meta.kind === 'mark' && t.meta.action === 'merge');
    return {
        points: Math.min(
            ...traces.filter(t => t.meta && t.meta.kind === 'loss').map(t => t.x.length), 1e9
        ) % 1e9,
        lossTraces: traces.filter(t => t.meta && t.meta.kind === 'loss').length,
        merges: merges ? merges.x.length : 0,
        heat: compat && compat.data && compat.data[0] && compat.data[0].z
            ? compat.data[0].z.length : 0,
        heatImage: compat ? compat.querySelectorAll('.hm image').length : 0,
        rows: document.querySelectorAll('#workers tbody tr').length,
        diag: ((document.getElementById('diag') || {}).data || []).length,
    };
}"""


def _open(page: Any, ensemble: Ensemble) -> None:
    """Open /ui/ and enter the read-only token in the page's form."""
    page.goto(f"{ensemble.url}/ui/")
    page.wait_for_selector("#token-form:not([hidden])")
    page.fill("#token", ensemble.read_token)
    page.click("#token-form button")


def test_ui_files_need_no_token_and_data_needs_one(ensemble: Ensemble) -> None:
    with httpx.Client(base_url=ensemble.url, timeout=10) as client:
        assert client.get("/ui/config.json").json() == {"auth": True, "plotly": True}
        assert client.get("/ui/plotly.min.js").text.startswith("/**\n* plotly.js v")
        assert client.get("/ui/nope.js").status_code == 404
        assert client.get("/v1/federations").status_code == 401
        read = {"Authorization": f"Bearer {ensemble.read_token}"}
        assert client.get("/v1/federations", headers=read).status_code == 200
        created = client.post("/v1/federations", json={"name": "not-allowed"}, headers=read)
        assert created.status_code == 401, "the read-only token must not create federations"


@pytest.mark.timeout(300)  # a loaded machine starts workers slowly; about 45 s on a quiet one
def test_live_dashboard_draws_merges_during_up(
    page: Any, ensemble: Ensemble, artifacts: Any
) -> None:
    _open(page, ensemble)
    ensemble.start_up()
    assert page.evaluate(DRAWN)["points"] == 0, "the page opened before the run started"
    # a point for every worker and a merge mark, drawn live: the run goes on until the ensemble
    # ends it (`Ensemble.finished`), so these come however fast the workers train; the heat map
    # is of every worker's latest snapshot
    live = f"() => ({DRAWN})().points >= 1 && ({DRAWN})().merges >= 1"
    try:
        page.wait_for_function(live, timeout=LIVE_TIMEOUT_MS)  # drawn as the run goes, no reload
    finally:
        page.screenshot(path=str(artifacts / "dashboard-live.png"), full_page=True)
    page.wait_for_function(f"() => ({DRAWN})().heatImage >= 1", timeout=LIVE_TIMEOUT_MS)
    page.wait_for_selector("#diagnostics table tbody tr", timeout=LIVE_TIMEOUT_MS)  # telemetry
    drawn = page.evaluate(DRAWN)
    page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)
    assert drawn["lossTraces"] == 2 and drawn["rows"] == 2 and drawn["heat"] >= 1, drawn
    assert drawn["diag"] >= 1, "the Jacobian radius series of at least one worker"
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1, (
        "the page reloaded"
    )
    assert page.log.errors == [], page.log.errors
    assert not [u for u in page.log.requests if ensemble.read_token in u], (
        "the token went into a URL"
    )


@pytest.mark.timeout(420)  # it waits for the run to end (`Ensemble.finished`)
def test_dashboard_opened_after_the_run_shows_what_happened(
    page: Any, ensemble: Ensemble, artifacts: Any
) -> None:
    """Once every worker has left, the page still draws each loss curve, the merge marks, the
    last compatibility matrix (`?workers=all`) and the diagnostics."""
    run = ensemble.finished()
    assert run.is_dir()
    _open(page, ensemble)
    ended = (
        f"() => ({DRAWN})().heatImage >= 1 && ({DRAWN})().merges >= 1 && ({DRAWN})().points >= 1"
    )
    try:
        page.wait_for_function(ended, timeout=LIVE_TIMEOUT_MS)
        page.wait_for_selector("#diagnostics table tbody tr", timeout=LIVE_TIMEOUT_MS)
    finally:
        page.screenshot(path=str(artifacts / "dashboard-after-run.png"), full_page=True)
    drawn = page.evaluate(DRAWN)
    assert drawn["lossTraces"] == 2 and drawn["rows"] == 2 and drawn["heat"] == 2, drawn
    assert page.log.errors == [], page.log.errors
