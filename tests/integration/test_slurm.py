"""`tetherfed submit slurm`: the sbatch scripts of a dry run, and the same
coordinator job and worker array run on this machine by submitit's LocalExecutor, one worker
interrupted as Slurm does before a timeout, requeued and resumed under its worker id."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tetherfed.cli import main
from tetherfed.launch._slurm import (
    SlurmPlan,
    parse_time,
    submit,
    wait_for_coordinator,
)
from tetherfed_coordinator.embedded import free_port

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("90", 90), ("1:30", 2), ("02:15:00", 135), ("1-0", 1440), ("2-03:30", 3090), ("0:10", 1)],
)
def test_slurm_times_in_minutes(text: str, minutes: int) -> None:
    assert parse_time(text) == minutes


@pytest.mark.parametrize("text", ["", "abc", "1:2:3:4", "-5", "1-x"])
def test_bad_slurm_times_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--time"):
        parse_time(text)


def test_dry_run_prints_the_coordinator_and_array_scripts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "submit",
            "slurm",
            "--workers",
            "3",
            "--gpus-per-worker",
            "2",
            "--partition",
            "gpu",
            "--time",
            "1:30:00",
            "--account",
            "proj",
            "--redis-url",
            "redis://db.example:6379/0",
            "--folder",
            str(tmp_path),
            "--steps",
            "500",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    coordinator, workers = out.split("# ---- workers ----")
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --time=90",
        "#SBATCH --job-name=tetherfed-coordinator",
        "#SBATCH --signal=USR2@90",
    ):
        assert line in coordinator, f"expected {line!r} in the coordinator script"
    assert "--array" not in coordinator and "--gpus" not in coordinator
    for line in (
        "#SBATCH --array=0-2%3",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --job-name=tetherfed-workers",
        "#SBATCH --time=90",
        "#SBATCH --cpus-per-task=4",
    ):
        assert line in workers, f"expected {line!r} in the worker array script"
    assert "-m submitit.core._submit" in workers
    assert not (tmp_path / "submitit").exists(), "a dry run submitted something"


def test_an_unknown_redis_url_is_refused_before_submitting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "submit",
            "slurm",
            "--workers",
            "1",
            "--partition",
            "p",
            "--time",
            "5",
            "--redis-url",
            "mysql://x",
            "--folder",
            str(tmp_path),
        ]
    )
    assert code == 2 and "unknown Redis URL scheme" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("option", ["--workers", "--cpus-per-worker"])
def test_counts_below_one_are_refused_before_submitting(
    option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = {"--workers": "1", "--cpus-per-worker": "4"} | {option: "0"}
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "submit",
                "slurm",
                "--partition",
                "p",
                "--time",
                "5",
                "--dry-run",
                "--redis-url",
                "redis://127.0.0.1:6379/9",
                "--folder",
                str(tmp_path),
                *(x for kv in argv.items() for x in kv),
            ]
        )
    assert exited.value.code == 2
    assert f"{option}: must be at least 1, got 0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _signal_tasks(job: Any, signum: int) -> None:
    """Signal the processes a local job's controller runs (Slurm signals the job's tasks; the
    controller itself only forwards SIGTERM)."""
    pid = job._process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert children, "the worker job runs no task"
    for child in children:
        os.kill(int(child), signum)


def _acked(url: str, fed: str) -> bool:
    decisions = httpx.get(f"{url}/v1/federations/{fed}/decisions").json()["data"]
    return any(
        httpx.get(f"{url}/v1/federations/{fed}/decisions/{d['id']}/ack").status_code == 200
        for d in decisions
        if d["action"] != "hold"
    )


def _until(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s"
        time.sleep(0.5)


@pytest.mark.timeout(420)
def test_local_executor_runs_coordinator_and_array_and_requeues_a_worker(
    tmp_path: Path, redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if redis_url.startswith("redis+"):
        pytest.skip("the jobs share one Redis server URL")
    monkeypatch.setenv("TETHER_KEY_PREFIX", key_prefix)  # the jobs inherit the environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # three processes share this machine's cores
    steps = 4000  # on a quiet machine 400 steps end before the requeue signal lands
    plan = SlurmPlan(
        folder=tmp_path,
        redis_url=redis_url,
        workers=2,
        time_min=10,
        federation="slurm-test",
        policy="demo",
        host="127.0.0.1",
        port=free_port(),
        cpus_per_worker=1,
        worker_args=["--steps", str(steps), "--eval-every", "200", "--publish-every", "10"],
    )
    done = submit(plan, cluster="local")
    coordinator, first, second = done.jobs
    try:
        url = wait_for_coordinator(tmp_path, timeout_s=180)
        _until(lambda: _acked(url, "slurm-test"), 180, "a decision made and acknowledged")
        # a fast machine acks a decision before the first checkpoint (--eval-every 200)
        _until((tmp_path / "worker-0" / "latest.pt").exists, 180, "worker 0's first checkpoint")
        _signal_tasks(first, signal.SIGUSR2)  # as Slurm before a timeout: checkpoint, requeue
        _until(lambda: first.done() and second.done(), 180, "both worker jobs finished")
        assert first.result() == 0 and second.result() == 0
        workers = httpx.get(f"{url}/v1/federations/slurm-test/workers").json()["data"]
    finally:
        coordinator.cancel()  # SIGINT to its controller, which stops the coordinator
        coordinator._process.wait(timeout=30)
    assert sorted(w["name"] for w in workers) == ["worker-0", "worker-1"], (
        f"the requeued worker registered anew: {workers}"
    )
    wid = next(w["worker_id"] for w in workers if w["name"] == "worker-0")
    logs = "".join(p.read_text() for p in (tmp_path / "submitit").rglob(f"{first.job_id}_*log*"))
    assert "Requeued" in logs, "worker 0 was not requeued after its interruption"
    assert f"resumed as worker {wid}" in logs, "worker 0 did not resume under its id"
    for i in range(2):
        lines = (tmp_path / f"worker-{i}" / "metrics.jsonl").read_text().splitlines()
        events = [json.loads(line) for line in lines]
        assert events[-1]["event"] == "done" and events[-1]["steps"] == steps, events[-1]
    config = json.loads((tmp_path / "config.json").read_text())
    assert [w["name"] for w in config["workers"]] == ["worker-0", "worker-1"]
