"""`tetherfed bench --quick` runs every benchmark and writes its valid JSON lines (one a row).

Timing is not asserted here (that is what the benchmarks report); this checks they run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

KEYS = {"name", "ours", "reference", "unit", "ratio", "target", "passed", "params"}


@pytest.mark.timeout(600)
def test_quick_bench_writes_a_json_line_per_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    cmd = [sys.executable, "-m", "tetherfed.cli", "bench", "--quick", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=580, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    names = ["scoring", "ingest", "latency", "overhead", "overhead-diagnostics", "load", "round",
             "load-1000"]  # fmt: skip
    assert [line["name"] for line in lines] == names
    for line in lines:
        assert line.keys() >= KEYS, f"{line['name']} lacks {KEYS - line.keys()}"
        assert isinstance(line["passed"], bool) and line["ours"] is not None
        if line["name"] in ("latency", "load", "round", "load-1000"):  # what limited the row
            cpu = line["params"]["cpu"]
            assert cpu["limit"] and set(cpu["cores_used"]) == {"api", "scorers", "redis", "bench"}
    assert done.stdout.count("\n") == len(lines), "stdout should carry the same JSON lines"


def test_unknown_benchmark_is_a_usage_error() -> None:
    cmd = [sys.executable, "-m", "tetherfed.cli", "bench", "nope"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "unknown benchmark" in done.stderr
