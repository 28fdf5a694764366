"""`tetherfed up` and `tetherfed status` as real processes: a CPU ensemble end to end, Ctrl-C, a
crashing worker, an unreachable coordinator. Every PID `up` started (from <out>/pids.json) must
be gone afterwards, together with anything left in its session (e.g. the embedded redis-server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from events import MANY_STEPS, applied, finish_workers, published, started, up_worker_pids, wait_for

from tetherfed import Client
from tetherfed.cli import build_parser
from tetherfed.cli._up import worker_argv

pytestmark = [pytest.mark.integration, pytest.mark.torch]

HERE = Path(__file__).resolve().parent
# Workers train until the test has seen what it waits for, then end as finished runs (SIGUSR1):
# a fixed step budget ends before any decision reaches a fast worker (see tests/events.py).
LONG = ["--steps", MANY_STEPS, "--publish-every", "5", "--log-every", "25", "--eval-every", "50"]


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...


def _live(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def leftovers(roots: list[int]) -> list[int]:
    """Live processes that are one of `roots` or sit in a session one of them leads."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields and fields[0] not in ("Z", "X") and int(fields[3]) in roots:
            found.append(int(entry.name))
    return sorted(set(found) | {pid for pid in roots if _live(pid)})


def started_pids(out: Path) -> list[int]:
    """Coordinator and worker PIDs `up` recorded."""
    pids = json.loads((out / "pids.json").read_text())
    return [p for p in [pids["coordinator"], *pids["workers"].values()] if p]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start `tetherfed up --out tmp/out --device cpu ARGS` (stdout piped); kills by PID whatever
    is left at teardown."""
    procs: list[subprocess.Popen[str]] = []
    out = tmp_path / "out"

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        cmd = [
            sys.executable,
            "-m",
            "tetherfed.cli",
            "up",
            "--out",
            str(out),
            "--device",
            "cpu",
            *args,
        ]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    if (out / "pids.json").exists():
        for pid in leftovers(started_pids(out)):
            os.kill(pid, signal.SIGKILL)


def wait_for_workers(out: Path, n: int, timeout_s: float = 90.0) -> None:
    """Until pids.json lists n workers and each has logged something (it is running)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (out / "pids.json").exists() and len(started_pids(out)) == n + 1:
            metrics = [out / f"worker-{i}" / "metrics.jsonl" for i in range(n)]
            if all(m.exists() and m.stat().st_size for m in metrics):
                return
        time.sleep(0.2)
    raise AssertionError(f"{n} workers were not running within {timeout_s}s")


def finish(proc: subprocess.Popen[str], timeout_s: float = 60.0) -> str:
    """Wait for `up` to exit; its stdout."""
    stdout, _ = proc.communicate(timeout=timeout_s)
    return stdout


def summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.timeout(420)
def test_up_three_workers_end_to_end(
    launch: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    # Prepare / Execute: three workers train until one of them has applied a merge (however fast
    # or slow they are), then each ends as a finished run
    out = tmp_path / "out"
    workers = [out / f"worker-{i}" for i in range(3)]
    proc = launch("--workers", "3", *LONG)
    wait_for(
        "three running workers that published, and a merge one of them applied",
        lambda: (
            all(started(w) and published(w) for w in workers) and any(applied(w) for w in workers)
        ),
        procs=[proc],
    )
    finish_workers(up_worker_pids(out))
    stdout = finish(proc, timeout_s=200)

    # Assert
    assert proc.returncode == 0, f"expected exit 0, got {proc.returncode}:\n{stdout}"
    s = summary(out)
    assert [w["status"] for w in s["workers"]] == ["done"] * 3, s["workers"]
    assert all(w["step"] > 0 and w["loss"] is not None for w in s["workers"]), s["workers"]
    assert s["decisions"]["total"] > 0, "expected the coordinator to have made decisions"
    assert s["decisions"]["by_action"].get("merge", 0) > 0, (
        f"demo policy should merge: {s['decisions']}"
    )
    assert s["acknowledged"]["applied"] > 0, (
        f"expected workers to ack decisions: {s['acknowledged']}"
    )
    assert s["merge_graph"], "expected a non-empty merge graph"
    # each worker's pace, from its done line: publishes sent and skipped, merges per 100 steps
    for w in s["workers"]:
        assert w["publishes"] >= 1 and w["publishes_skipped"] >= 0, w
        assert w["merges_per_100_steps"] == pytest.approx(100 * w["merges"] / w["step"], abs=1e-3)
    for text in (
        "finished ok",
        "final loss per worker",
        "decisions:",
        "merge graph",
        "checkpoints:",
        "(skipped ",
        "merges/100 steps ",
    ):
        assert text in stdout, f"summary lacks {text!r}:\n{stdout}"
    assert (out / "worker-0" / "latest.pt").exists() and (out / "worker-2.log").exists()
    assert leftovers(started_pids(out)) == [], "processes outlived `tetherfed up`"


@pytest.mark.timeout(120)
def test_up_sigint_stops_everything(
    launch: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    # Prepare
    out = tmp_path / "out"
    proc = launch("--workers", "2", "--steps", "100000", "--publish-every", "5", "--log-every", "5")
    wait_for_workers(out, 2)

    # Execute
    proc.send_signal(signal.SIGINT)
    stdout = finish(proc, timeout_s=60)

    # Assert
    assert proc.returncode == 130, (
        f"expected exit 130 after SIGINT, got {proc.returncode}:\n{stdout}"
    )
    assert "interrupted (exit code 130)" in stdout, stdout
    assert {w["status"] for w in summary(out)["workers"]} == {"stopped"}
    assert leftovers(started_pids(out)) == [], "processes outlived `tetherfed up` after SIGINT"


@pytest.mark.timeout(240)
def test_up_crashing_worker_stops_the_others(
    launch: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    # Prepare: worker-1 (seed 1) raises in its loss after a few steps; the others would run long.
    out = tmp_path / "out"
    env = {
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        "CRASH_SEED": "1",
    }

    # Execute
    proc = launch("--workers", "3", "--task", "crashing_task:task", "--steps", "100000", env=env)
    stdout = finish(proc, timeout_s=200)

    # Assert
    assert proc.returncode == 1, (
        f"expected exit 1 for a crashed worker, got {proc.returncode}:\n{stdout}"
    )
    assert "FAILED: worker-1 exited with code" in stdout, stdout
    statuses = {w["name"]: w["status"] for w in summary(out)["workers"]}
    assert statuses["worker-1"].startswith("failed"), statuses
    assert statuses["worker-0"] == statuses["worker-2"] == "stopped", statuses
    assert "deliberate crash" in (out / "worker-1.log").read_text()
    assert leftovers(started_pids(out)) == [], "processes outlived `tetherfed up` after a crash"


@pytest.mark.timeout(60)
def test_up_unreachable_coordinator_exits_3(launch: Callable[..., subprocess.Popen[str]]) -> None:
    proc = launch("--coordinator", "http://127.0.0.1:9", "--ready-timeout", "1", "--workers", "1")
    stdout = finish(proc, timeout_s=50)
    assert proc.returncode == 3, f"expected exit 3, got {proc.returncode}:\n{stdout}"
    assert "coordinator unreachable" in stdout


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--workers", "0"], "--workers: must be at least 1, got 0"),
        (["--workers", "-2"], "--workers: must be at least 1, got -2"),
        (["--policy", "nosuch"], "unknown policy preset 'nosuch'; known: demo, default, seed, cka"),
        (["--out", "{file}"], "is a file, not a folder"),
    ],
)
def test_up_refuses_bad_input_before_starting_anything(
    argv: list[str], says: str, tmp_path: Path
) -> None:
    """Usage errors exit 2 with one line naming the problem, and start nothing (no coordinator,
    no run folder)."""
    a_file = tmp_path / "results.json"
    a_file.write_text("{}")
    argv = [a.replace("{file}", str(a_file)) for a in argv]
    cmd = [sys.executable, "-m", "tetherfed.cli", "up", "--steps", "5", *argv]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False
    )
    assert done.returncode == 2, done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"], "it started a run"


def test_worker_options_pass_through_unchanged() -> None:
    parser = build_parser()
    options = ["--layer-lr", "fc1=0.5", "--tether-mode", "learned", "--io-budget", "0.25"]
    up = parser.parse_args(["up", "--steps", "7", "--lr", "0.1", *options])
    worker = parser.parse_args(["worker", *worker_argv(up)])
    assert worker.io_budget == 0.25
    keys = ("steps", "lr", "layer_lr", "tether_mode", "task", "publish_every", "model")
    for key in (*keys, "io_budget"):
        assert getattr(worker, key) == getattr(up, key), key


@pytest.mark.timeout(60)
def test_status_prints_the_worker_table(coordinator_process: Callable[..., Any]) -> None:
    # Prepare
    coordinator = coordinator_process()
    with Client(coordinator.url) as client:
        client.create_federation("statusfed")
    cmd = [sys.executable, "-m", "tetherfed.cli", "status", "--coordinator", coordinator.url]

    # Execute
    ok = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30)
    missing = subprocess.run(
        [*cmd[:-1], "http://127.0.0.1:9"], check=False, capture_output=True, text=True, timeout=30
    )

    # Assert
    assert ok.returncode == 0, ok.stderr
    assert "federation statusfed" in ok.stdout and "decisions: 0" in ok.stdout, ok.stdout
    assert missing.returncode == 3, (
        f"expected exit 3 for an unreachable coordinator: {missing.stderr}"
    )


@pytest.mark.timeout(420)
def test_up_twice_into_one_folder_keeps_the_runs_apart(
    launch: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    """Re-running a command is the most ordinary thing a user does: the second `up --out D` must
    not continue the first run's federation nor append to its logs."""
    out = tmp_path / "out"
    argv = ["--workers", "2", "--steps", "20", "--log-every", "5", "--eval-every", "10"]
    first = launch(*argv)
    first_stdout = finish(first, timeout_s=300)
    assert first.returncode == 0, first_stdout
    first_ids = _worker_ids(out)

    second = launch(*argv)
    stdout = finish(second, timeout_s=300)
    assert second.returncode == 0, stdout

    assert f"moved to {out}.1" in stdout
    assert _worker_ids(out.with_name("out.1")) == first_ids
    second_ids = _worker_ids(out)
    assert len(second_ids) == 2 and not second_ids & first_ids, (first_ids, second_ids)
    for metrics in out.glob("worker-*/metrics.jsonl"):
        starts = [r for r in _lines(metrics) if r.get("event") == "start"]
        assert len(starts) == 1, f"{metrics} holds {len(starts)} runs"


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _worker_ids(out: Path) -> set[str]:
    """Worker ids found in every worker's metrics.jsonl of a run folder."""
    return {
        record["worker_id"]
        for path in out.glob("worker-*/metrics.jsonl")
        for record in _lines(path)
        if record.get("worker_id")
    }


@pytest.mark.timeout(420)
def test_up_never_puts_the_token_on_a_command_line_or_in_a_checkpoint(
    launch: Callable[..., subprocess.Popen[str]],
    tmp_path: Path,
    coordinator_process: Callable[..., Any],
) -> None:
    """`ps` shows every user each process's command line, and the run folder is shared storage
    under Ray and Slurm: the coordinator's token goes to workers through their environment and
    is never written to a checkpoint."""
    token = "admin-s3cret-" + os.urandom(4).hex()
    coordinator = coordinator_process(TETHER_TOKEN=token)
    out = tmp_path / "out"
    proc = launch("--workers", "2", "--coordinator", coordinator.url, "--token", token, *LONG)
    wait_for(
        "two registered workers",
        lambda: all(started(out / f"worker-{i}") for i in range(2)),
        procs=[proc],
    )
    pids = up_worker_pids(out)
    command_lines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in pids]
    finish_workers(pids)
    stdout = finish(proc, timeout_s=200)

    assert proc.returncode == 0, stdout
    assert len(command_lines) == 2 and all(b"worker" in c for c in command_lines)
    assert not [c for c in command_lines if token.encode() in c], "the token is on a command line"
    for checkpoint in out.glob("worker-*/latest.pt"):
        assert token.encode() not in checkpoint.read_bytes(), f"{checkpoint} holds the token"
        assert checkpoint.stat().st_mode & 0o077 == 0, f"{checkpoint} is readable by others"
