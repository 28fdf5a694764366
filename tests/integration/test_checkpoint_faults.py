"""A worker's checkpoints under faults, with real processes and real files: a write that fails
(the disk full) is a clear error naming the file, leaves nothing half-written and a true record;
a damaged or foreign checkpoint is refused at resume with what is wrong with it."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.torch, pytest.mark.timeout(300)]

LIMIT = 64 * 1024  # bytes a file may grow to: a few metrics lines fit, a checkpoint (~170 KB) not


def worker(
    folder: Path, *args: str, file_limit: int | None = None
) -> subprocess.CompletedProcess[str]:
    """`tetherfed worker` on digits without a coordinator, checkpointing into `folder`."""

    def limit_files() -> None:  # in the child: writes past the limit fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    cmd = [sys.executable, "-m", "tetherfed.cli", "worker", "--task", "digits", "--device", "cpu"]
    cmd += ["--eval-every", "20", "--log-every", "10", "--checkpoint-dir", str(folder), *args]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        preexec_fn=limit_files if file_limit else None,
    )


def events(folder: Path) -> list[dict[str, Any]]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_a_checkpoint_that_cannot_be_written_is_a_clear_error_and_a_true_record(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "w"
    done = worker(folder, "--steps", "60", file_limit=LIMIT)

    assert done.returncode == 1, done.stderr[-3000:]
    assert f"cannot write checkpoint {folder / 'latest.pt'}" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, "a disk problem is one line, not a traceback"
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.jsonl"], "nothing half-written"
    last = events(folder)[-1]
    assert last["event"] == "failed" and last["steps"] == 20, last
    assert "cannot write checkpoint" in last["error"], last


def test_a_damaged_checkpoint_is_refused_at_resume_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "w"
    assert worker(folder, "--steps", "20").returncode == 0
    latest = folder / "latest.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # torn by a crash

    done = worker(folder, "--steps", "40", "--resume")

    assert done.returncode == 1, done.stderr[-3000:]
    assert f"cannot read checkpoint {latest}" in done.stderr and "damaged" in done.stderr


def test_a_checkpoint_of_another_model_is_refused_naming_what_changed(tmp_path: Path) -> None:
    folder = tmp_path / "w"
    assert worker(folder, "--steps", "20", "--model", "digits-cnn").returncode == 0

    done = worker(folder, "--steps", "40", "--resume", "--model", "digits-mlp")

    assert done.returncode == 1, done.stderr[-3000:]
    assert f"checkpoint {folder / 'latest.pt'} does not fit this worker's model" in done.stderr
    assert "settings changed since: model" in done.stderr, done.stderr[-3000:]
