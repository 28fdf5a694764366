"""/metrics through prometheus_client: histograms of publish handling, scoring rounds and
publish → decision latency, counted where the scoring runs (a thread, or scoring processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from coord_helpers import EVERY_PUBLISH, frame, tensors, worker_body
from prometheus_client.parser import text_string_to_metric_families

from tetherfed_coordinator.metrics import DIR_PREFIX, remove_orphaned_dirs

F = "/v1/federations"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) → value, parsed by prometheus_client's own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def publish_pair(http: Any, base: str) -> None:
    assert http.post(f"{base}{F}", json={"name": "f", "policy": EVERY_PUBLISH}).status_code == 201
    same = tensors(1)
    for name in "ab":
        wid = http.post(f"{base}{F}/f/workers", json=worker_body(name)).json()["worker_id"]
        assert (
            http.put(
                f"{base}{F}/f/workers/{wid}/tethers", content=frame(wid, data=same)
            ).status_code
            == 202
        )


def scored(got: dict[Any, float]) -> bool:
    return got.get(("tetherfed_publish_to_decision_seconds_count", ()), 0) >= 2


def drained(got: dict[Any, float]) -> bool:
    """Both publishes scored and the scoring stream empty. A scrape reads the backlog before
    the histograms while scoring goes on beside it, so one scrape can show both scored and a
    backlog of 1: the stream is checked to drain, not to be empty in that scrape."""
    return scored(got) and got.get(("tetherfed_scoring_backlog", ()), 1) == 0


@pytest.mark.anyio
async def test_histograms_with_scoring_on_a_thread(app_client: httpx.AsyncClient) -> None:
    c = app_client
    assert (await c.post(F, json={"name": "f", "policy": EVERY_PUBLISH})).status_code == 201
    same = tensors(1)
    for name in "ab":
        wid = (await c.post(f"{F}/f/workers", json=worker_body(name))).json()["worker_id"]
        await c.put(f"{F}/f/workers/{wid}/tethers", content=frame(wid, data=same))
    with anyio.fail_after(15):
        while not drained(got := samples((await c.get("/metrics")).text)):
            await anyio.sleep(0.05)
    assert got[("tetherfed_publish_seconds_count", (("kind", "full"),))] == 2
    assert got[("tetherfed_publishes_total", ())] == 2
    assert got[("tetherfed_scoring_round_seconds_count", ())] >= 1
    assert got[("tetherfed_scoring_rounds_total", ())] == 2
    assert got[("tetherfed_decisions_total", (("action", "merge"),))] >= 1
    assert got[("tetherfed_requests_total", (("method", "PUT"), ("status", "202")))] == 2
    assert got[("tetherfed_scoring_backlog", ())] == 0
    # Buckets are cumulative and end at +Inf with the count.
    inf = got[("tetherfed_publish_to_decision_seconds_bucket", (("le", "+Inf"),))]
    assert inf == got[("tetherfed_publish_to_decision_seconds_count", ())]


@pytest.mark.integration
def test_scoring_processes_metrics_reach_the_api_process(
    coordinator_process: Callable[..., Any],
) -> None:
    coordinator = coordinator_process(TETHER_SCORER_PROCESSES="2")
    with httpx.Client(timeout=10) as http:
        publish_pair(http, coordinator.url)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not scored(
            got := samples(http.get(f"{coordinator.url}/metrics").text)
        ):
            time.sleep(0.1)
    assert scored(got), "the scoring processes' latency histogram never reached /metrics"
    assert got[("tetherfed_scoring_rounds_total", ())] == 2
    assert got[("tetherfed_scoring_round_seconds_count", ())] >= 1
    assert got[("tetherfed_decisions_total", (("action", "merge"),))] >= 1
    assert got[("tetherfed_publish_seconds_count", (("kind", "full"),))] == 2


def test_a_killed_coordinators_metrics_directory_is_removed_by_the_next(tmp_path: Any) -> None:
    """kill -9 skips the shutdown that removes the directory; the next start removes it (and
    leaves the directories of coordinators that still run, and anything else, alone)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f"{DIR_PREFIX}{dead.pid}-x1"
    running = tmp_path / f"{DIR_PREFIX}{os.getpid()}-x2"
    other = tmp_path / "tetherfed-metrics-notapid"
    for d in (orphan, running, other):
        d.mkdir()
        (d / "counter_1.db").write_bytes(b"x")
    assert remove_orphaned_dirs(str(tmp_path)) == [str(orphan)]
    assert not orphan.exists() and running.exists() and other.exists()
