"""Names from a run folder are text in the report, whatever they hold: a layer or worker name
with an HTML anchor must not become a live link in any figure (plotly.js renders a subset of HTML
in names, hover text and category labels)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tetherfed.report import write_report
from tetherfed.report._page import plain

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ANCHOR = '<a href="https://example.invalid/x">click</a>'


def test_plain_writes_markup_as_entities_and_leaves_the_rest() -> None:
    spec = {"data": [{"name": ANCHOR, "x": {"dtype": "f8", "bdata": "AAA="}, "mode": "lines"}]}
    out = plain(spec)
    assert out["data"][0]["name"] == ANCHOR.replace("<", "&lt;").replace(">", "&gt;")
    assert out["data"][0]["x"] == spec["data"][0]["x"] and out["data"][0]["mode"] == "lines"


def _hostile_run(folder: Path) -> Path:
    """A run folder of two workers whose layer is named with an anchor, with scored decisions."""
    for i, wid in enumerate(("w-a", "w-b")):
        (folder / f"worker-{i}").mkdir(parents=True)
        steps = [
            {"event": "step", "step": s, "loss": 1.0 / s, "worker_id": wid, "merges": s // 5}
            for s in range(1, 11)
        ]
        text = "".join(json.dumps(r) + "\n" for r in steps)
        (folder / f"worker-{i}" / "metrics.jsonl").write_text(text)
        passes = [
            {
                "event": "diagnostics",
                "step": s,
                "epoch": s // 5,
                "metrics": {
                    "effective_rank": {ANCHOR: 3.0 - s / 10},
                    "gzip_ratio": {ANCHOR: 0.5 + s / 100},
                },
            }
            for s in (5, 10)
        ]
        text = "".join(json.dumps(r) + "\n" for r in passes)
        (folder / f"worker-{i}" / "diagnostics.jsonl").write_text(text)
    decisions = [
        {
            "id": n,
            "action": "merge",
            "layer": ANCHOR,
            "worker_id": a,
            "partner_id": b,
            "score": 0.9,
            "measure": "pearson",
            "created_at": f"2026-12-07T18:00:0{n}Z",
        }
        for n, (a, b) in enumerate([("w-a", "w-b"), ("w-b", "w-a")], start=1)
    ]
    (folder / "decisions.jsonl").write_text("".join(json.dumps(d) + "\n" for d in decisions))
    return folder


def test_a_name_holding_an_anchor_is_shown_as_text(page: Any, tmp_path: Path) -> None:
    report = write_report(_hostile_run(tmp_path / "run"))

    page.goto(report.as_uri())
    page.wait_for_selector("body[data-rendered=true]", timeout=120_000)
    links = page.evaluate(
        "[...document.querySelectorAll('.fig a')].map(a => a.getAttribute('href') || "
        "a.getAttribute('xlink:href')).filter(h => h && !h.startsWith('#'))"
    )
    shown = page.evaluate(
        "document.body.innerText + [...document.querySelectorAll('.fig text')]"
        ".map(t => t.textContent).join(' ')"
    )

    assert links == [], f"names became links: {links}"
    assert "click" in shown, "the name should still be shown"
    assert page.log.errors == []
