"""Each local worker's torch threads: the machine's cores shared by every worker running."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether_protocol.messages import Policy
from tetherfed.launch._launch import Launcher, LocalEngine, RunPlan, plan_workers
from tetherfed.worker._options import WorkerOptions


def launcher(
    tmp_path: Path, workers: int, runs_at_once: int = 1, engine_name: str = "local"
) -> Launcher:
    plans = plan_workers([("g", workers, WorkerOptions())], seed=0, init="independent", devices=0)
    plan = RunPlan(federation="f", policy=Policy(), workers=plans)
    return Launcher(plan, tmp_path, LocalEngine(name=engine_name), runs_at_once=runs_at_once)


@pytest.mark.parametrize(
    ("cores", "workers", "runs", "threads"),
    [(16, 4, 1, 4), (16, 4, 2, 2), (16, 3, 1, 5), (2, 4, 1, 1), (2, 1, 1, 2)],
)
def test_cores_are_shared_by_the_workers_of_the_runs_at_once(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    cores: int,
    workers: int,
    runs: int,
    threads: int,
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert launcher(tmp_path, workers, runs).worker_threads() == threads


def test_the_users_thread_setting_and_other_engines_are_left_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launcher(tmp_path, 2).worker_threads() is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert launcher(tmp_path, 2, engine_name="ray").worker_threads() is None
