"""`tetherfed up --engine ray` on a real Ray cluster started on loopback for this module: two CPU
worker actors and one coordinator replica make and acknowledge decisions; a worker actor killed as a
node failure would (`ray.kill(..., no_restart=False)`) is restarted by Ray and resumes under its
worker id; Ctrl-C removes every actor and the placement group; the run folder has a local run's
layout. Skips only where Ray is not installed, and fails instead on CI."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tetherfed_coordinator.embedded import free_port

pytestmark = [pytest.mark.integration, pytest.mark.torch, pytest.mark.timeout(420)]

RAY = Path(sys.executable).parent / "ray"
SMALL = ["--publish-every", "5", "--log-every", "10", "--eval-every", "20"]


def _ray_or_skip() -> None:
    if importlib.util.find_spec("ray") is not None and RAY.exists():
        return
    why = f"ray is not installed here ({RAY} missing): pip install 'tetherfed[ray]'"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}; CI must run the Ray engine test (make venv installs the extra)")
    pytest.skip(why)


def _session_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def _ours(session: int, temp_dir: str) -> list[int]:
    """Live processes of the `ray start` we ran: in its session, or naming its temp dir."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            if _session_of(pid) == session or temp_dir in cmdline:
                found.append(pid)
    return found


class RayCluster:
    """A Ray head on 127.0.0.1 with its own temp dir and ports; `address` is HOST:PORT."""

    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="tfray", dir="/tmp")  # short: socket paths
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        cmd = [
            str(RAY),
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--num-cpus",
            "2",
            "--num-gpus",
            "0",
            "--include-dashboard",
            "false",
            "--object-store-memory",
            "100000000",
            "--temp-dir",
            self.temp_dir,
            "--disable-usage-stats",
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--min-worker-port",
            "0",
            "--max-worker-port",
            "0",
        ]
        self.starter = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )

    def wait(self, timeout_s: float = 180.0) -> None:
        """Until `ray start` returned (the head runs); fails with its output otherwise."""
        try:
            out, _ = self.starter.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"ray start did not return within {timeout_s:.0f} s")
        assert self.starter.returncode == 0, f"ray start failed:\n{out}"

    def stop(self) -> None:
        """Kill every process of this head (never another Ray on the machine), by PID."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _ours(self.starter.pid, self.temp_dir):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while _ours(self.starter.pid, self.temp_dir) and time.monotonic() < deadline:
                time.sleep(0.2)
        subprocess.run(["rm", "-rf", self.temp_dir], check=False)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """A Ray head started for this module (`wait()` before use), killed at the end."""
    _ray_or_skip()
    cluster = RayCluster()
    try:
        yield cluster
    finally:
        cluster.stop()
        assert not _ours(cluster.starter.pid, cluster.temp_dir), "Ray processes outlived the test"


def ray_script(address: str, body: str, timeout_s: float = 120) -> Any:
    """Run `body` in a Ray driver connected to `address` (namespace tetherfed); it prints one
    JSON value, returned here. In a subprocess: the test process never imports ray."""
    code = (
        "import json, ray, time\n"
        f"ray.init(address={address!r}, namespace='tetherfed', log_to_driver=False)\n"
        f"{body}\nray.shutdown()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def wait_for(
    what: str, check: Callable[[], Any], timeout_s: float, proc: subprocess.Popen[str]
) -> Any:
    """`check()` once truthy; fails after `timeout_s` or when `proc` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            value = check()
            if value:
                return value
        if proc.poll() is not None:
            pytest.fail(f"tetherfed up exited ({proc.returncode}) before {what}")
        time.sleep(0.5)
    pytest.fail(f"no {what} within {timeout_s:.0f} s")


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (a line a killed process left half-written skipped)."""
    found = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            found.append(json.loads(line))
    return found


def layout(out: Path) -> set[str]:
    """The run folder's file names, worker folders included (report.html aside, and the temporary
    file of a checkpoint write that a kill cut short: `latest.tmp`)."""
    return {
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file()
        and p.name != "report.html"
        and not p.name.startswith(".")
        and p.suffix != ".tmp"
    }


@pytest.fixture
def up() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start `tetherfed up --out OUT --device cpu --workers 2 … ARGS` (output in OUT.out);
    killed at teardown."""
    started: list[subprocess.Popen[str]] = []

    def start(out: Path, *args: str) -> subprocess.Popen[str]:
        cmd = [
            sys.executable,
            "-m",
            "tetherfed.cli",
            "up",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--workers",
            "2",
            *SMALL,
            *args,
        ]
        out.parent.mkdir(parents=True, exist_ok=True)
        with (out.parent / f"{out.name}.out").open("w") as log:  # never a pipe left unread
            started.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True))
        return started[-1]

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_up_refuses_ray_without_a_shared_redis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tetherfed.cli import main

    assert main(["up", "--engine", "ray", "--out", str(tmp_path)]) == 2  # EXIT_USAGE
    assert "--engine ray needs --redis-url" in capsys.readouterr().err
    assert not (tmp_path / "config.json").exists(), "refused before anything started"


def test_workers_on_ray_decide_survive_an_actor_kill_and_tear_down(
    ray_cluster: RayCluster,
    redis_url: str,
    tmp_path: Path,
    up: Callable[..., subprocess.Popen[str]],
) -> None:
    # A short local run for the layout, while the Ray head starts.
    local = up(
        tmp_path / "local",
        "--steps",
        "40",
        "--redis-url",
        redis_url,
        "--federation",
        f"local-{os.getpid()}",
    )
    ray_cluster.wait()
    out = tmp_path / "ray"
    proc = up(
        out,
        "--engine",
        "ray",
        "--address",
        ray_cluster.address,
        "--coordinators",
        "1",
        "--redis-url",
        redis_url,
        "--cpus-per-worker",
        "0.5",
        "--federation",
        f"ray-{os.getpid()}",
        "--steps",
        "1000000",
    )

    # Decisions made and acknowledged (status.json counts the workers' applied acks).
    def acked() -> bool:
        status = json.loads((out / "status.json").read_text())
        applied = sum(w["merges"] + w["drifts"] for w in status["workers"])
        return sum(status["decisions"].values()) > 0 and applied > 0

    wait_for("acknowledged decisions", acked, 240, proc)
    metrics = out / "worker-0" / "metrics.jsonl"
    wait_for("worker-0's checkpoint", (out / "worker-0" / "latest.pt").exists, 120, proc)
    worker_id = wait_for("worker-0's id", lambda: _json_lines(metrics)[-1]["worker_id"], 60, proc)

    # Kill worker-0's actor as a failed node would; Ray restarts it and it resumes.
    killed = ray_script(
        ray_cluster.address,
        """
name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].endswith("/worker-0"))
actor = ray.get_actor(name)
pid = ray.get(actor.pid.remote())
ray.kill(actor, no_restart=False)
print(json.dumps({"name": name, "pid": pid}))""",
    )
    before = len(_json_lines(metrics))
    log = out / "worker-0.log"
    wait_for(
        "worker-0 resumed", lambda: f"resumed as worker {worker_id}" in log.read_text(), 180, proc
    )

    def steps_after() -> list[dict[str, Any]]:  # step events carry the registered id
        return [x for x in _json_lines(metrics)[before:] if x.get("event") == "step"]

    after = wait_for("a step after the restart", steps_after, 120, proc)
    assert {line.get("worker_id") for line in after} == {worker_id}, "same id after the restart"
    restarted = re.findall(r"actor restarted in process (\d+)", log.read_text())
    assert restarted and int(restarted[-1]) != killed["pid"], "a new actor process runs worker-0"

    # Ctrl-C: the run ends as interrupted, every actor and the placement group go away.
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, (tmp_path / "ray.out").read_text()[-3000:]
    left = ray_script(
        ray_cluster.address,
        """
time.sleep(1)
actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
groups = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
print(json.dumps({"actors": actors, "groups": len(groups)}))""",
    )
    assert left == {"actors": [], "groups": 0}, left

    summary = json.loads((out / "summary.json").read_text())
    assert summary["state"] == "interrupted"
    decisions = _json_lines(out / "decisions.jsonl")
    assert any(d["ack"] is not None for d in decisions), "an acknowledged decision in the folder"
    assert local.wait(timeout=180) == 0, (tmp_path / "local.out").read_text()[-3000:]
    assert layout(out) == layout(tmp_path / "local")
    local_summary = json.loads((tmp_path / "local" / "summary.json").read_text())
    assert summary.keys() == local_summary.keys()


def test_up_refuses_a_run_the_ray_cluster_cannot_hold(
    ray_cluster: RayCluster, redis_url: str, tmp_path: Path
) -> None:
    """On a 2-CPU cluster a replica and two 1-CPU workers cannot all run: the second worker
    waited for ever ("starting 0/?"). Refused before anything starts, saying what is needed."""
    ray_cluster.wait()
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "tetherfed.cli", "up", "--out", str(out), "--workers", "2"]
    cmd += ["--engine", "ray", "--address", ray_cluster.address, "--redis-url", redis_url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)

    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "the Ray cluster has 2 CPU; this run needs 3 CPU" in done.stderr, done.stderr[-2000:]
    assert not (out / "config.json").exists(), "refused before anything started"


def test_an_experiment_is_refused_when_its_runs_at_once_exceed_the_cluster(
    ray_cluster: RayCluster, redis_url: str, tmp_path: Path
) -> None:
    """`tiny` runs have 4 workers; two runs at once of 0.25-CPU workers and a replica need 3 CPU
    of the 2: refused before the sweep starts (the same run one at a time would fit)."""
    ray_cluster.wait()
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "tetherfed.cli", "experiment", "run", "tiny", "--out", str(out)]
    cmd += ["--jobs", "2", "--engine", "ray", "--address", ray_cluster.address]
    cmd += ["--redis-url", redis_url, "--cpus-per-worker", "0.25"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)

    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    expected = (
        "the Ray cluster has 2 CPU; this run needs 3 CPU (1 coordinator replica(s) × 1 + "
        "8 worker(s) × 0.25, for 2 run(s) at once (--jobs 2))"
    )
    assert expected in done.stderr, done.stderr[-2000:]
    assert not out.exists(), "refused before anything was written"


def _hold_cpus(address: str, names: list[str]) -> None:
    """Another job takes 0.5 CPU per name: a detached placement group each, outliving its
    driver (removed with `_release`)."""
    ray_script(
        address,
        f"""
from ray.util.placement_group import placement_group
groups = [placement_group([{{"CPU": 0.5}}], name=n, lifetime="detached") for n in {names!r}]
ray.get([g.ready() for g in groups], timeout=60)
print(json.dumps(len(groups)))""",
    )


def _release(address: str, names: list[str]) -> None:
    ray_script(
        address,
        f"""
from ray.util import get_placement_group, remove_placement_group
for name in {names!r}:
    try:
        remove_placement_group(get_placement_group(name))
    except ValueError:
        pass  # removed already
print(json.dumps(0))""",
    )


def test_a_worker_actor_the_cluster_cannot_place_is_pending_with_why_then_fails_the_run(
    ray_cluster: RayCluster,
    redis_url: str,
    tmp_path: Path,
    up: Callable[..., subprocess.Popen[str]],
) -> None:
    """Another job holds 1 of the 2 CPUs after the capacity check (which counts the cluster's
    total): the replica takes the other and both 0.5-CPU workers wait. Each shows `pending` with
    what it waits for; one freed CPU share lets one start; the other fails the run after
    --pending-timeout, saying why, instead of "starting 0/?" for ever."""
    ray_cluster.wait()
    hogs = ["hog-0", "hog-1"]
    _hold_cpus(ray_cluster.address, hogs)
    try:
        out = tmp_path / "ray"
        proc = up(
            out,
            "--engine",
            "ray",
            "--address",
            ray_cluster.address,
            "--redis-url",
            redis_url,
            "--cpus-per-worker",
            "0.5",
            "--pending-timeout",
            "60",
            "--federation",
            f"pending-{os.getpid()}",
            "--steps",
            "1000000",
        )
        why = "waiting for 0.5 CPU: the cluster has 0 of 2 free"

        def rows() -> list[dict[str, Any]]:
            return list(json.loads((out / "status.json").read_text())["workers"])

        def both_pending() -> bool:
            return all(r["status"] == "pending" and r["waiting"] == why for r in rows())

        wait_for("both workers pending, saying why", both_pending, 180, proc)
        _release(ray_cluster.address, hogs[:1])
        wait_for(
            "one worker placed", lambda: sum(r["status"] != "pending" for r in rows()), 60, proc
        )
        assert proc.wait(timeout=240) == 1, (tmp_path / "ray.out").read_text()[-3000:]
    finally:
        _release(ray_cluster.address, hogs)
    summary = json.loads((out / "summary.json").read_text())
    failure = f"its Ray actor could not be scheduled for 60 s, {why}"
    assert any(failure in f for f in summary["failures"]), summary["failures"]
    assert f"pending: {why}" in (tmp_path / "ray.out").read_text(), "the table said why"
    left = ray_script(
        ray_cluster.address,
        """
time.sleep(1)
print(json.dumps([a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]))""",
    )
    assert left == [], left
