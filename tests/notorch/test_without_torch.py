"""The package without its worker extra: `import tetherfed`, the REST SDK and the commands that
need no model (`--help`, `coordinator`, `federation create`, `status`, `report`) work where
torch is not installed. `make notorch` runs this file in a fresh venv that has no torch; in the
main environment (torch installed) it is skipped."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tetherfed_coordinator.embedded import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("torch") is not None,
        reason="torch is installed: `make notorch` runs this in a venv without it",
    ),
]

TIMEOUT_S = 120.0


def tetherfed(*argv: str) -> subprocess.CompletedProcess[str]:
    """`tetherfed <argv>` in a fresh interpreter of this environment."""
    cmd = [sys.executable, "-m", "tetherfed.cli", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[str]:
    """`tetherfed coordinator` on embedded Redis, on a free loopback port; its URL once ready."""
    port = free_port()
    log = (tmp_path / "coordinator.log").open("w")
    argv = ["--host", "127.0.0.1", "--port", str(port), "--data-dir", str(tmp_path / "redis")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tetherfed.cli", "coordinator", *argv],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, tmp_path / "coordinator.log")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the coordinator exited: {log.read_text()[-2000:]}"
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the coordinator was not ready in {TIMEOUT_S:.0f} s")


def test_import_tetherfed_and_the_sdk_load_no_torch() -> None:
    code = (
        "import sys, tetherfed\n"
        "from tetherfed import Client, AsyncClient, RetryPolicy, TetherError\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_a_name_that_needs_torch_says_so() -> None:
    import tetherfed

    with pytest.raises(ImportError, match="torch"):
        _ = tetherfed.tether


@pytest.mark.parametrize("argv", [["--help"], ["status", "--help"], ["worker", "--help"]])
def test_help_works_without_torch(argv: list[str]) -> None:
    done = tetherfed(*argv)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: tetherfed" in done.stdout


def test_coordinator_federation_create_and_status_without_torch(coordinator: str) -> None:
    created = tetherfed("federation", "create", "plain", "--coordinator", coordinator)
    assert created.returncode == 0, created.stderr[-2000:]
    assert json.loads(created.stdout)["name"] == "plain"
    status = tetherfed("status", "--coordinator", coordinator)
    assert status.returncode == 0, status.stderr[-2000:]
    assert "plain" in status.stdout


def test_the_sdk_talks_to_a_real_coordinator_without_torch(coordinator: str) -> None:
    from tetherfed import Client

    with Client(coordinator) as client:
        client.create_federation("sdk")
        names = [f.name for f in client.list_federations().data]
    assert "sdk" in names


def test_report_of_a_run_folder_without_torch(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "worker-0").mkdir(parents=True)
    steps = [{"event": "step", "step": s, "loss": 1.0 / s, "epoch": 0} for s in range(1, 6)]
    (run / "worker-0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    done = tetherfed("report", str(run))
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()) == run / "report.html"
    assert "plotly" in (run / "report.html").read_text()
