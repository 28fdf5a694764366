"""`tetherfed bench --quick` runs every benchmark and writes its valid JSON lines (one a row).

Timing is not asserted here (that is what the benchmarks report); this checks they run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration

KEYS = {"name", "ours", "reference", "unit", "ratio", "target", "passed", "params"}


@pytest.mark.timeout(1200)  # every row in quick mode, on a loaded CI machine
def test_quick_bench_writes_a_json_line_per_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    cmd = [sys.executable, "-m", "tetherfed.cli", "bench", "--quick", "--json", str(out)]
    # Without Flower (`make bench-peers` may have installed it here): the round row's peer is
    # then reported as not measured (test_bench_peers.py runs Flower itself).
    env = os.environ | {"TETHERFED_PEERS_VENV": str(tmp_path / "no-peers")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1180, check=False, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    names = [
        "scoring",
        "ingest",
        "latency",
        "overhead",
        "overhead-diagnostics",
        "load",
        "round",
        "load-1000",
        "models",
        "sync-rounds",
    ]
    assert [line["name"] for line in lines] == names
    for line in lines:
        assert line.keys() >= KEYS, f"{line['name']} lacks {KEYS - line.keys()}"
        assert isinstance(line["passed"], bool) and line["ours"] is not None
        assert line["params"]["quick"] is True  # a quick row says it is one
        if line["name"] in ("latency", "load", "round", "load-1000"):  # what limited the row
            cpu = line["params"]["cpu"]
            assert cpu["limit"] and set(cpu["cores_used"]) == {"api", "scorers", "redis", "bench"}
        if line["name"] == "round":  # no quoted figure stands in for a peer that did not run
            assert line["params"]["peer"] == {
                "name": "flower",
                "measured": False,
                "how": "make bench-peers",
            }
            assert line["reference"] is None and line["ratio"] is None
            rest = {**line, "params": {k: v for k, v in line["params"].items() if k != "peer"}}
            assert "flower" not in json.dumps(rest).lower(), rest
        if line["name"] == "models":  # each architecture's costs, every arm timed
            for figures in line["params"]["models"].values():
                assert figures["step_s"].keys() == {"untethered", "tethered", "federated"}
                assert figures["frame_mb"] > 0 and figures["memory_mb"]["tethers"] > 0
        if line["name"] == "sync-rounds":  # federated vs independent, every round counted
            params = line["params"]
            assert line["ratio"] == pytest.approx(line["ours"] / line["reference"], rel=1e-3)
            assert params["rounds"] == params["workers"] * params["rounds_per_worker"] > 0
            assert params["rounds_timed_out"] == 0 and params["merges_per_100_steps"] > 0
            assert len(params["round_wait_s"]) == params["workers"]
            assert params["round_ms"]["samples"] == params["rounds"]
    assert done.stdout.count("\n") == len(lines), "stdout should carry the same JSON lines"


def test_an_unwritable_json_path_is_refused_before_any_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "missing-folder" / "bench.jsonl"
    cmd = [sys.executable, "-m", "tetherfed.cli", "bench", "scoring", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "cannot write --json" in done.stderr, done.stderr
    assert "# scoring" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_unknown_benchmark_is_a_usage_error() -> None:
    cmd = [sys.executable, "-m", "tetherfed.cli", "bench", "nope"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "unknown benchmark" in done.stderr


def test_cpu_meter_counts_the_coordinators_children_as_the_coordinators() -> None:
    """The coordinator is the benchmark's child and its scorer its grandchild: the scorer's CPU
    belongs to the scorers' group, not to the benchmark's own, and a busy scorer is the limit."""
    from bench.common import CpuMeter

    burn = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass\n"
    # A stand-in coordinator that starts a stand-in scoring process (known by its command line,
    # as the real one is) and waits for it.
    parent = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {burn!r}, 'scorer'])\n"
    coordinator = subprocess.Popen([sys.executable, "-c", parent])
    try:
        deadline = time.monotonic() + 20
        while not psutil.Process(coordinator.pid).children() and time.monotonic() < deadline:
            time.sleep(0.01)
        (scorer,) = psutil.Process(coordinator.pid).children()
        meter = CpuMeter(coordinator.pid)
        before, began = sum(scorer.cpu_times()[:2]), time.perf_counter()
        meter.start()
        time.sleep(1.5)
        cpu = meter.stop()
        # what the stand-in scorer really got: a whole core on a quiet machine, less on a busy one
        got = (sum(scorer.cpu_times()[:2]) - before) / (time.perf_counter() - began)
    finally:
        for proc in psutil.Process(coordinator.pid).children(recursive=True):
            proc.kill()
        coordinator.kill()
        coordinator.wait(timeout=10)
    assert cpu["cores_used"]["scorers"] == pytest.approx(got, abs=0.15), (got, cpu)
    assert cpu["cores_used"]["bench"] < 0.3, cpu
    if got >= CpuMeter.SATURATED + 0.05:  # the scorer held a core: it is the limit
        assert "scorers" in cpu["limit"], (got, cpu)
    else:  # other processes kept it from a core (a loaded machine): never blamed on the bench
        assert "benchmark's own" not in cpu["limit"], (got, cpu)
        assert "scorers" in cpu["limit"] or "machine CPU" in cpu["limit"], (got, cpu)
