"""`tetherfed worker` as real processes against a real coordinator."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from events import MANY_STEPS, applied, finish_workers, started, wait_for

from tetherfed import Client

pytestmark = pytest.mark.integration


def worker(url: str, fed: str, seed: int, out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [
        sys.executable,
        "-m",
        "tetherfed.cli",
        "worker",
        "--coordinator",
        url,
        "--federation",
        fed,
        "--seed",
        str(seed),
        "--name",
        f"w{seed}",
        "--device",
        "cpu",
        "--checkpoint-dir",
        str(out),
        "--log-every",
        "50",
        "--eval-every",
        "50",
        *extra,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert lines and lines[-1]["event"] == "done", out[-2000:]
    return lines[-1]  # type: ignore[no-any-return]


@pytest.mark.timeout(600)  # the wait below is bounded by EVENT_TIMEOUT_S, generous for load
def test_two_processes_under_the_seed_preset_merge_the_middle_layer_only(
    coordinator_process: Callable[..., Any], tmp_path: Path
) -> None:
    coordinator = coordinator_process()
    with Client(coordinator.url) as api:
        api.create_federation("seed", policy="seed")
    # Both train until one has applied a merge, then end as finished runs: a fixed step budget
    # ends before the first plateau round on a fast machine. Few stdout lines (nobody reads the
    # pipes meanwhile): a step line and an evaluation at the end only.
    quiet = ["--log-every", MANY_STEPS, "--eval-every", MANY_STEPS]
    args = ["--steps", MANY_STEPS, "--publish-every", "1", *quiet]
    procs = [worker(coordinator.url, "seed", s, tmp_path / f"w{s}", *args) for s in (1, 2)]
    dirs = [tmp_path / f"w{s}" for s in (1, 2)]
    wait_for(
        "a merge applied by one of two running workers",
        lambda: all(started(d) for d in dirs) and any(applied(d) for d in dirs),
        procs=procs,
    )
    finish_workers(p.pid for p in procs)
    summaries = [finish(p) for p in procs]
    with Client(coordinator.url) as api:
        decisions = api.decisions("seed", limit=1000).data
    merges = [d for d in decisions if d.action == "merge"]
    assert merges, "the seed preset (raw dot > 50 on a 64×64 tether) should merge"
    assert {d.layer for d in decisions} == {"fc2"}, "the seed preset scores the middle layer only"
    assert all(d.measure == "dot" and d.operator == "average" for d in merges)
    assert sum(s["merge"] for s in summaries) >= 1, "no worker applied a merge"
    per_epoch = collections.Counter((d.worker_id, d.epoch) for d in merges)
    assert max(per_epoch.values()) <= 5, f"more than 5 merges an epoch: {per_epoch}"


# three worker processes one after another: CPU-starved on a loaded machine (over 100 s at a load
# average of 9 on two cores), so a generous bound
@pytest.mark.timeout(600)
def test_resume_from_a_checkpoint_keeps_id_generation_and_applied_ids(
    coordinator_process: Callable[..., Any], tmp_path: Path
) -> None:
    coordinator = coordinator_process()
    policy = {"trigger": "every_publish", "merge_threshold": 0.0, "cooldown_steps": 0}
    with Client(coordinator.url) as api:
        api.create_federation("resume", policy=policy)  # type: ignore[arg-type]
    first = [
        worker(
            coordinator.url,
            "resume",
            s,
            tmp_path / f"w{s}",
            "--steps",
            "150",
            "--publish-every",
            "2",
        )
        for s in (1, 2)
    ]
    done = [finish(p) for p in first]
    saved = torch.load(tmp_path / "w1" / "latest.pt", weights_only=False)
    state = saved["federation"]
    assert state["worker_id"] == done[0]["worker_id"] and saved["step"] == 150
    resumed = worker(
        coordinator.url,
        "resume",
        1,
        tmp_path / "w1",
        "--steps",
        "200",
        "--publish-every",
        "2",
        "--resume",
    )
    summary = finish(resumed)
    assert summary["worker_id"] == state["worker_id"], "resume registered a new worker"
    again = torch.load(tmp_path / "w1" / "latest.pt", weights_only=False)["federation"]
    assert set(state["applied_ids"]) <= set(again["applied_ids"]), "applied ids were lost"
    for layer, generation in state["generations"].items():
        assert again["generations"][layer] >= generation, "a generation went backwards"
    lines = (tmp_path / "w1" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    first_done = next(i for i, m in enumerate(metrics) if m["event"] == "done")
    resumed_steps = [m["step"] for m in metrics[first_done + 1 :] if m["event"] == "step"]
    assert resumed_steps and min(resumed_steps) > 150, "the resumed run started over"
    assert resumed_steps[-1] == 200


def test_threads_option_sets_torch_threads(tmp_path: Path) -> None:
    """`--threads N` is what the worker's torch uses (launchers pass cores / workers)."""
    cmd = [
        sys.executable,
        "-m",
        "tetherfed.cli",
        "worker",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--checkpoint-dir",
        str(tmp_path),
    ]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=True)
    start = next(json.loads(x) for x in done.stdout.splitlines() if '"start"' in x)
    assert start["threads"] == 1
    coverage = start["coverage"]  # the default MLP: every weight tethered, biases not
    assert coverage["layers"] >= 2 and coverage["skipped"] == [] and 0.9 < coverage["share"] < 1
    refused = subprocess.run(
        [*cmd[:-4], "--threads", "0"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env,
    )
    assert refused.returncode != 0 and "threads" in refused.stderr


def test_a_sharded_clustered_worker_records_accuracy_in_its_metrics(tmp_path: Path) -> None:
    """A `tetherfed worker` process on digits-perm, cluster from its group index, a disjoint
    shard: its metrics.jsonl carries val_acc next to val_loss, in step and done events."""
    cmd = [
        sys.executable,
        "-m",
        "tetherfed.cli",
        "worker",
        "--task",
        "digits-perm",
        "--task-arg",
        "k=3",
        "--shard",
        "size=64,scheme=disjoint",
        "--worker-index",
        "4",
        "--group-index",
        "2",
        "--index-in-group",
        "1",
        "--group-size",
        "2",
        "--run-seed",
        "9",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--log-every",
        "2",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--checkpoint-dir",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [2, 4]
    for event in [*steps, events[-1]]:
        assert 0.0 <= event["val_acc"] <= 1.0 and event["val_loss"] > 0, event
    assert events[-1]["event"] == "done" and events[-1]["val_acc"] == steps[-1]["val_acc"]
    assert [e["epoch"] for e in steps] == [0, 1]  # 64 examples, batch 32: two steps an epoch
    bad = subprocess.run(
        [*cmd[:7], "k=2", *cmd[8:]], capture_output=True, text=True, timeout=120, check=False
    )
    assert bad.returncode != 0 and "not a cluster of k=2" in bad.stderr, bad.stderr[-2000:]


@pytest.mark.timeout(300)
def test_a_worker_reports_its_publish_pace_and_warns_once_when_the_budget_skips(
    coordinator_process: Callable[..., Any], tmp_path: Path
) -> None:
    """A `tetherfed worker` process publishing on every step under a tiny I/O budget: after its
    first publish the budget pauses publishing for the capped 10 s, so its steps' scheduled
    publishes are skipped; its step and done lines count publishes, skips and the merge rate,
    every scheduled publish is one or the other, and stderr warns once, naming --io-budget."""
    coordinator = coordinator_process()
    with Client(coordinator.url) as api:
        api.create_federation("pace")
    args = ["--steps", "60", "--publish-every", "1", "--io-budget", "1e-6", "--log-every", "20"]
    # --wait-peers 1: registered before the first step, so the first snapshot goes out at once
    proc = worker(coordinator.url, "pace", 1, tmp_path, *args, "--wait-peers", "1")
    try:
        _out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    done = events[-1]
    assert done["event"] == "done" and done["steps"] == 60, done
    for event in [*steps, done]:
        assert {"publishes", "publishes_skipped", "merges_per_100_steps"} <= set(event), event
    assert done["publishes"] >= 1 and done["publishes_skipped"] >= 1, done
    assert done["publishes"] + done["publishes_skipped"] == 60, done  # every step was scheduled
    assert done["merges_per_100_steps"] == 0.0  # a lone worker has no partner to merge with
    assert [e["step"] for e in steps] == [20, 40, 60]
    for key in ("publishes", "publishes_skipped"):
        counts = [e[key] for e in [*steps, done]]
        assert counts == sorted(counts), f"{key} only grows: {counts}"
    warnings = [line for line in err.splitlines() if "scheduled publish was skipped" in line]
    assert len(warnings) == 1 and "--io-budget 1e-06" in warnings[0], err[-3000:]
