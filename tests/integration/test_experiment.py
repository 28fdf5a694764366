"""`tetherfed experiment` end to end, as a real process with real workers: a tiny sweep (2 groups
× 2 arms × 2 repeats), its results folder, --dry-run, --resume, a changed spec, and resuming a
sweep killed midway. Steps are tiny: this checks the machinery, not the science."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tetherfed.report import build_sections
from tetherfed.report import figures as report_figures

pytestmark = [pytest.mark.integration, pytest.mark.torch]

SPEC = """
init = "shared"
arms = {arms}

[experiment]
name = "tiny-test"
repeats = {repeats}
steps = {steps}
publish_every = 3
fedavg_every = 6
jobs = {jobs}
device = "cpu"

[[groups]]
name = "sin"
count = 1
task = "sin"
model = "relu-chain-888"
tether_mode = "learned"
eval_every = 10
log_every = 10

[[groups]]
name = "sinc"
count = 1
task = "sinc"
model = "relu-chain-888"
tether_mode = "learned"
eval_every = 10
log_every = 10

[policy]
trigger = "every_publish"
merge_threshold = 0.0
cooldown_steps = 0
"""


def write_spec(
    tmp_path: Path,
    repeats: int = 2,
    jobs: int = 2,
    arms: tuple[str, ...] = ("federated", "independent"),
    steps: int = 30,
) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(
        SPEC.format(repeats=repeats, jobs=jobs, arms=json.dumps(list(arms)), steps=steps)
    )
    return path


def tetherfed(*args: str, timeout: float = 170) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tetherfed.cli", "experiment", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def config(out: Path, run_id: str) -> dict[str, Any]:
    return json.loads((out / "runs" / run_id / "config.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.timeout(300)
def test_tiny_sweep_end_to_end_then_resume_dry_run_and_a_changed_spec(tmp_path: Path) -> None:
    # Prepare
    spec, out = write_spec(tmp_path), tmp_path / "out"

    # Execute
    done = tetherfed("run", str(spec), "--out", str(out))
    dry = tetherfed("run", str(spec), "--dry-run")

    # Assert: one finished row per (cell, arm, repeat), ARI present, paired seeds
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = rows(out / "results.csv")
    assert len(results) == 4 and {r["state"] for r in results} == {"finished"}, results
    assert all(r["ari"] != "" and -1.0 <= float(r["ari"]) <= 1.0 for r in results), results
    assert all(float(r["val_loss"]) > 0 for r in results)
    for repeat in ("0", "1"):
        seeds = {
            json.dumps(
                [(w["init_seed"], w["data_seed"]) for w in config(out, r["run_id"])["workers"]]
            )
            for r in results
            if r["repeat"] == repeat
        }
        assert len(seeds) == 1, f"repeat {repeat}: arms should share seeds, got {seeds}"
    groups = [w["group"] for w in config(out, results[0]["run_id"])["workers"]]
    assert groups == ["sin", "sinc"]
    summary = rows(out / "summary.csv")
    assert sorted(r["arm"] for r in summary) == ["federated", "independent"]
    assert all(r["n"] == "2" for r in summary), summary
    federated = next(r for r in summary if r["arm"] == "federated")
    assert federated["val_loss_diff_n"] == "2" and federated["val_loss_diff_mean"] != ""
    for name in ("spec.toml", "resolved.json", "coordinator.log"):
        assert (out / name).exists(), name
    resolved = json.loads((out / "resolved.json").read_text())
    assert resolved["versions"]["torch"] and len(resolved["runs"]) == 4
    run_folder = out / "runs" / results[0]["run_id"]
    for name in ("status.json", "summary.json", "decisions.jsonl", "worker-0/metrics.jsonl"):
        assert (run_folder / name).exists(), name
    assert "federated" in done.stdout and "ARI" in done.stdout, done.stdout[-2000:]
    report = out / "report.html"  # the experiment report (#14), from its figure specs
    assert (
        f"report:          {report}" in done.stdout
        and report.read_text().count("* plotly.js v") == 1
    )
    drawn = {
        f.name: f.figure for f in report_figures(build_sections(out)[2]) if f.figure is not None
    }
    assert {"summary-table", "bands", "parcoords", "cluster", "paired"} <= set(drawn), sorted(drawn)
    assert {t.meta["arm"]: t.meta["n"] for t in drawn["bands"].data if t.meta} == {
        "federated": 2,
        "independent": 2,
    }
    assert list(drawn["paired"].data[0].meta["n"]) == [2]
    assert dry.returncode == 0 and dry.stdout.strip().endswith(f"{len(results)} runs"), dry.stdout

    # Execute: resume a finished sweep; the same folder with another spec
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    again = tetherfed("run", str(spec), "--out", str(out), "--resume")
    changed = tetherfed(
        "run", str(spec), "--out", str(out), "--resume", "--set", "experiment.steps=13"
    )
    status = tetherfed("status", str(out))

    # Assert
    assert again.returncode == 0 and "4 runs, 0 to run" in again.stdout, again.stdout + again.stderr
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    assert changed.returncode == 2 and "--force" in changed.stderr, changed.stderr
    assert status.returncode == 0 and "4 finished" in status.stdout, status.stdout


@pytest.mark.timeout(300)
def test_a_sweep_killed_midway_resumes_without_rerunning_finished_runs(tmp_path: Path) -> None:
    # Prepare: three runs (one per arm, fedavg first) one at a time
    arms = ("fedavg", "federated", "independent")
    # 600 steps: on a quiet machine 30 steps end before the first scoring round, and a worker
    # that has finished applies nothing (the fedavg assertion below needs merges issued)
    spec, out = write_spec(tmp_path, repeats=1, jobs=1, arms=arms, steps=600), tmp_path / "out"
    cmd = [sys.executable, "-m", "tetherfed.cli", "experiment", "run", str(spec), "--out", str(out)]
    log = tmp_path / "experiment.log"  # kept for the failure message
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)

    # Execute: SIGTERM once the first run has finished
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and not _finished_runs(out):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    first = _finished_runs(out)
    stamps = {rid: (out / "runs" / rid / "summary.json").stat().st_mtime_ns for rid in first}
    resumed = tetherfed("run", str(spec), "--out", str(out), "--resume")

    # Assert
    assert code == 130, f"expected exit 130 after SIGTERM, got {code}: {log.read_text()[-3000:]}"
    assert first and len(first) < 3, f"expected a partial sweep, finished: {first}"
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"3 runs, {3 - len(first)} to run" in resumed.stdout, resumed.stdout
    results = {r["arm"]: r for r in rows(out / "results.csv")}
    assert {r["state"] for r in results.values()} == {"finished"}, results
    assert int(results["fedavg"]["merges"]) > 0, "the fedavg arm should average through merges"
    assert int(results["independent"]["merges"]) == 0, "the control must not merge"
    assert stamps == {
        rid: (out / "runs" / rid / "summary.json").stat().st_mtime_ns for rid in first
    }
    pids = json.loads((out / "pids.json").read_text())
    assert not _alive(pids["coordinator"]), "the experiment's coordinator outlived it"


def _finished_runs(out: Path) -> list[str]:
    found = []
    for status in out.glob("runs/*/status.json"):
        try:
            if json.loads(status.read_text())["state"] == "finished":
                found.append(status.parent.name)
        except (OSError, ValueError, KeyError):
            continue
    return sorted(found)


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


SHARDED = """
arms = ["federated", "independent"]

[experiment]
name = "sharded-test"
steps = 6
publish_every = 3
device = "cpu"
reference_arm = "independent"

[[groups]]
name = "perm"
count = 2
task = "digits-perm"
task_args = {k = 2}
shard = {size = 48, scheme = "disjoint"}
eval_every = 3
log_every = 3

[policy]
trigger = "every_publish"
merge_threshold = 0.0
"""


@pytest.mark.timeout(300)
def test_a_sharded_classification_sweep_reports_accuracy_and_its_worst_worker(
    tmp_path: Path,
) -> None:
    spec, out = tmp_path / "spec.toml", tmp_path / "out"
    spec.write_text(SHARDED)

    done = tetherfed("run", str(spec), "--out", str(out), "--jobs", "2")

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = rows(out / "results.csv")
    assert {r["state"] for r in results} == {"finished"} and len(results) == 2
    for r in results:
        assert 0 <= float(r["worst_val_acc"]) <= float(r["val_acc"]) <= 1, r
        assert float(r["worst_val_loss"]) >= float(r["val_loss"]) > 0, r
        workers = config(out, r["run_id"])["workers"]
        assert [(w["index"], w["group_index"], w["index_in_group"]) for w in workers] == [
            (0, 0, 0),
            (1, 0, 1),
        ]
        assert workers[0]["options"]["shard"] == {"size": 48, "scheme": "disjoint"}
    summary = {r["arm"]: r for r in rows(out / "summary.csv")}
    federated = summary["federated"]
    assert federated["reference_arm"] == "independent" and federated["val_acc_diff_n"] == "1"
    assert federated["val_acc_diff_mean"] != "" and federated["worst_val_acc_diff_mean"] != ""
    assert federated["val_acc_oracle_recovered"] == ""  # no oracle arm
    assert "val acc" in done.stdout, done.stdout[-2000:]
