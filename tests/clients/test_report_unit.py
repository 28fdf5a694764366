"""Pure parts of `tetherfed.report`: decimation, decision marks, paired statistics, the page."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

from tetherfed.report._data import (
    RunData,
    WorkerSeries,
    _counter_marks,
    decimate_index,
    decision_marks,
    read_jsonl,
)
from tetherfed.report._experiment import ExperimentData, ExperimentRun, ci95, paired_differences
from tetherfed.report._page import Figure, Section, decode, nodata, render_page


def test_decimate_keeps_short_series_and_both_ends_of_long_ones() -> None:
    assert decimate_index(5, 10).tolist() == [0, 1, 2, 3, 4]
    kept = decimate_index(100_000, 2_000)
    assert len(kept) <= 2_000 and kept[0] == 0 and kept[-1] == 99_999
    assert np.all(np.diff(kept) > 0)


def _decision(
    i: int, worker: str, action: str, step: int, ack: dict[str, str] | None
) -> dict[str, object]:
    return {
        "id": i,
        "worker_id": worker,
        "partner_id": "b",
        "action": action,
        "layer": "fc1",
        "own_snapshot": {"worker_id": worker, "version": 1, "step": step},
        "ack": ack,
    }


def test_decision_marks_take_the_workers_merges_and_drifts_with_their_ack() -> None:
    decisions = [
        _decision(1, "a", "merge", 10, {"outcome": "applied"}),
        _decision(2, "a", "hold", 11, None),
        _decision(3, "b", "merge", 12, {"outcome": "applied"}),
        _decision(4, "a", "drift", 20, {"outcome": "rejected"}),
        _decision(5, "a", "merge", 30, None),
    ]
    marks = decision_marks(decisions, "a")
    assert [(m.step, m.action, m.outcome) for m in marks] == [
        (10, "merge", "applied"),
        (20, "drift", "rejected"),
        (30, "merge", "issued"),
    ]


def test_counter_marks_follow_the_cumulative_counters() -> None:
    records = [
        {"event": "step", "step": 10, "merges": 0, "drifts": 0},
        {"event": "step", "step": 20, "merges": 2, "drifts": 0},
        {"event": "step", "step": 30, "merges": 2, "drifts": 1},
        {"event": "done", "merge": 2},
    ]
    assert [(m.step, m.action) for m in _counter_marks(records)] == [
        (20, "merge"),
        (20, "merge"),
        (30, "drift"),
    ]


def test_read_jsonl_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]


def _run(final: float, cell: str, arm: str, repeat: int) -> ExperimentRun:
    worker = WorkerSeries(
        "worker-0",
        step=np.array([1.0, 2.0]),
        loss=np.array([1.0, final]),
        val_step=np.array([1.0, 2.0]),
        val_loss=np.array([1.0, final]),
    )
    run = RunData(Path("."), {"arm": arm, "repeat": repeat}, {}, [worker], [], {}, {})
    return ExperimentRun(run, cell, arm, repeat)


def test_paired_differences_pair_each_repeat_against_its_control() -> None:
    runs = [
        _run(0.5, "c", "federated", 0),
        _run(0.7, "c", "independent", 0),
        _run(0.4, "c", "federated", 1),
        _run(0.5, "c", "independent", 1),
        _run(0.9, "c", "federated", 2),
    ]
    diffs = paired_differences(ExperimentData(Path("."), runs, [], []))
    assert diffs == {"c": pytest.approx([-0.2, -0.1])}


def test_ci95_is_the_t_interval_half_width() -> None:
    mean, half = ci95([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(
        4.302652729911275 / math.sqrt(3)
    )  # t(0.975, 2) · sem
    assert math.isnan(ci95([1.0])[1])


def test_page_inlines_plotly_once_and_a_hostile_name_cannot_close_the_script() -> None:
    fig = go.Figure(
        go.Scatter(x=np.arange(3.0), y=[1, 2, 3], name="</script><script>alert(1)</script>")
    )
    page = render_page(
        "t", {"k": "<b>"}, [Section("s", [Figure("a", "A", fig), nodata("b", "B", "why")])]
    )
    assert page.count("* plotly.js v") == 1 and page.count("<script>alert(1)") == 0
    (spec,) = re.findall(r'class="tf-figure" data-target="fig-a">(.*?)</script>', page, re.S)
    trace = json.loads(spec)["data"][0]
    # shown as text by plotly.js: the name travels with its markup written as entities
    assert trace["name"].startswith("&lt;/script&gt;") and decode(trace["x"]).tolist() == [
        0.0,
        1.0,
        2.0,
    ]
    assert '<p class="nodata" id="fig-b">no data: why</p>' in page and "&lt;b&gt;" in page
