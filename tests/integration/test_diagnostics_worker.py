"""`tetherfed worker --diagnostics` as a real process against a real coordinator."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open
from test_worker_process import finish, worker

from tether_protocol.telemetry import METRICS
from tetherfed import Client
from tetherfed.diagnostics import summarize

pytestmark = pytest.mark.integration

ARRAYS = {"singular_values", "weight_histogram", "update_fft", "update_wavelet", "tracked_weights"}
SCALARS = set(METRICS) - ARRAYS - {"singular_values"}


def test_worker_writes_every_metric_and_the_coordinator_serves_them(
    coordinator_process: Callable[..., Any], tmp_path: Path
) -> None:
    coordinator = coordinator_process()
    with Client(coordinator.url) as api:
        api.create_federation("diag")
    out = tmp_path / "w0"
    # sin: 157 steps an epoch; runs every 80 steps and the final one at step 200.
    proc = worker(
        coordinator.url,
        "diag",
        0,
        out,
        "--task",
        "sin",
        "--steps",
        "200",
        "--diagnostics",
        "every=80,budget=1",
    )
    summary = finish(proc)

    records = [json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()]
    runs = [r for r in records if r["event"] == "diagnostics"]
    with safe_open(out / "diagnostics.safetensors", "numpy") as arrays:
        keys = set(arrays.keys())
        tracked = arrays.get_tensor("tracked_weights/model")
        histograms = arrays.get_tensor("weight_histogram/all")
    assert [(r["step"], r["epoch"]) for r in runs] == [(80, 0), (160, 1), (200, 1)]
    assert set(runs[-1]["metrics"]) >= SCALARS, runs[-1]["metrics"].keys()
    assert {k.split("/")[0] for k in keys} == set(METRICS)
    assert tracked.shape == (200, 4) and list(tracked[:3, 0]) == [1, 2, 3]
    assert (histograms.sum(axis=1) == histograms[0].sum()).all(), "every run counts every weight"
    assert runs[-1]["jacobian_kind"] == "spectral_radius"  # sin: 1 input, 1 output
    assert summarize(out)["jacobian_radius"] == runs[-1]["metrics"]["jacobian_radius"]["model"]

    with Client(coordinator.url) as api:
        listing = api.telemetry("diag", summary["worker_id"])
        radius = api.telemetry("diag", summary["worker_id"], "jacobian_radius")
        fft = api.telemetry("diag", summary["worker_id"], "update_fft", "fc2", after=80)
    assert {m.metric for m in listing.data} == set(METRICS)  # type: ignore[union-attr]
    assert [p.step for p in radius.data] == [80, 160, 200]  # type: ignore[union-attr]
    assert [p.value for p in radius.data][-1] == pytest.approx(  # type: ignore[union-attr]
        runs[-1]["metrics"]["jacobian_radius"]["model"]
    )
    assert [p.step for p in fft.data] == [160, 200]  # type: ignore[union-attr]
