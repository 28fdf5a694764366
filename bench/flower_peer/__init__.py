"""Flower, the `round` benchmark's peer, run in the same run on the same machine.

A Flower FedAvg round with the round row's N and P, over loopback, on Flower's deployment
runtime with its stock settings: one `flower-superlink --insecure` and N `flower-supernode
--insecure` processes on 127.0.0.1 (free ports), the app in `app/` (a ServerApp running FedAvg, a
ClientApp returning the arrays it received) submitted with `flwr run` to a SuperLink connection
named in a private FLWR_HOME's config.toml, the way Flower's deployment guide launches it with
1.42's flags. Two departures from a stock launch, neither on the round's path: the SuperLink
does not `uv sync` the app's dependencies at each run (`--disable-runtime-dependency-installation`:
.venv-peers has them, and the benchmark must not need the network), and telemetry and the update
check are off.

Flower lives in its own virtual environment (`make bench-peers` → .venv-peers, or
$TETHERFED_PEERS_VENV), never in the project's. Every process started here, and every process
those start, ends before `run` returns: bounded waits, terminate then kill, by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import psutil

from tetherfed_coordinator.embedded import free_port

APP = Path(__file__).resolve().parent / "app"
FLWR_PIN = "1.42.0"


def venv() -> Path:
    """Where Flower's virtual environment is (it may not exist)."""
    default = Path(__file__).resolve().parents[2] / ".venv-peers"
    return Path(os.environ.get("TETHERFED_PEERS_VENV") or default)


def available() -> bool:
    """Flower is installed (`make bench-peers`) and the app ships beside this file (it does in
    a source tree, not in the wheel)."""
    return (venv() / "bin" / "flower-superlink").is_file() and (APP / "pyproject.toml").is_file()


class FlowerError(RuntimeError):
    """The Flower run failed; the message carries the tail of the process logs."""


def run(
    nodes: int,
    side: int,
    rounds: int,
    warmup: int = 1,
    check_dir: Path | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Run `warmup + rounds` FedAvg rounds of `nodes` SuperNodes, each returning 4 float32 arrays
    of side × side; return Flower's version and each timed round's seconds (`round_s`), from
    FedAvg having built the round's train messages to FedAvg having aggregated all N replies,
    and the PIDs of every process the run started (`pids`; all ended when this returns).

    With `check_dir`, the ClientApps save what they sent and the ServerApp each aggregate there
    (`client{i}-round{r}.npz`, `aggregate-round{r}.npz`).
    """
    bin_dir = venv() / "bin"
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryDirectory(prefix="tetherfed-flower-") as tmp_name:
        tmp = Path(tmp_name)
        out_dir = check_dir or tmp / "out"
        out_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        home = tmp / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        env |= {
            "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",  # Flower starts its own tools
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "NO_PROXY": ",".join(filter(None, [env.get("NO_PROXY"), "127.0.0.1,localhost"])),
        }
        app = tmp / "app"  # a copy: `flwr run` packs the directory, caches and all
        shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__"))
        with _processes(tmp, env) as procs:
            procs.start(
                "superlink",
                [
                    str(bin_dir / "flower-superlink"),
                    "--insecure",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--disable-runtime-dependency-installation",
                ],
            )
            _wait_healthy(f"http://127.0.0.1:{port}/health", procs, deadline)
            for i in range(nodes):
                procs.start(
                    f"supernode{i}",
                    [
                        str(bin_dir / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(free_port()),
                        "--node-config",
                        f"partition-id={i} num-partitions={nodes}",
                    ],
                )
            config = (
                f"nodes={nodes} side={side} warmup={warmup} rounds={rounds} "
                f'out-dir="{out_dir}" check={"true" if check_dir else "false"}'
            )
            submit = procs.start(
                "flwr-run",
                [str(bin_dir / "flwr"), "run", str(app), "bench", "--run-config", config],
                cwd=tmp,
            )
            try:
                code = submit.wait(timeout=max(1.0, min(120.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                raise FlowerError(f"`flwr run` did not return{procs.logs()}") from None
            if code != 0:
                raise FlowerError(f"`flwr run` exited with {code}{procs.logs()}")
            result = _wait_result(out_dir / "result.json", procs, deadline)
        result["pids"] = procs.pids()  # after the `with`: all of them stopped
    if "error" in result:
        raise FlowerError(f"the ServerApp failed: {result['error'][-3000:]}")
    if any(n != nodes for n in result["replies"]):
        raise FlowerError(f"rounds aggregated {result['replies']} replies, not {nodes} each")
    return result


def _wait_healthy(url: str, procs: _Processes, deadline: float) -> None:
    while time.monotonic() < deadline:
        procs.check_alive()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise FlowerError(f"the SuperLink at {url} was not healthy in time{procs.logs()}")


def _wait_result(path: Path, procs: _Processes, deadline: float) -> dict[str, Any]:
    noted = 0.0
    while time.monotonic() < deadline:
        if path.exists():
            result: dict[str, Any] = json.loads(path.read_text())
            return result
        procs.check_alive()
        if time.monotonic() >= noted + 2.0:
            procs.note_descendants()
            noted = time.monotonic()
        time.sleep(0.2)
    raise FlowerError(f"no result from the ServerApp in time{procs.logs()}")


class _Processes:
    """The processes this run started, their logs, and every descendant seen."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp, self.env = tmp, env
        self.started: dict[str, subprocess.Popen[bytes]] = {}
        self.logs_: dict[str, IO[bytes]] = {}
        self.descendants: dict[int, psutil.Process] = {}

    def start(self, name: str, cmd: list[str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "w+b")  # noqa: SIM115 (closed in stop_all)
        self.logs_[name] = log
        proc = subprocess.Popen(
            cmd, env=self.env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        self.started[name] = proc
        return proc

    def check_alive(self) -> None:
        for name, proc in self.started.items():
            if name != "flwr-run" and proc.poll() is not None:
                raise FlowerError(f"{name} exited with {proc.returncode}{self.logs()}")

    def note_descendants(self) -> None:
        """Remember the processes ours started (Flower detaches some into their own sessions,
        and an orphan is re-parented, so they are collected while their parents live). One
        pass over the process table, so polling it every few seconds costs the rounds nothing."""
        children: dict[int, list[psutil.Process]] = {}
        for p in psutil.process_iter(["ppid"]):
            children.setdefault(p.info["ppid"], []).append(p)
        # Only from ours still running: an exited one's PID may already name someone else's.
        todo = [proc.pid for proc in self.started.values() if proc.poll() is None]
        while todo:
            for child in children.get(todo.pop(), []):
                if child.pid not in self.descendants:
                    self.descendants[child.pid] = child  # psutil pins its start time
                    todo.append(child.pid)

    def pids(self) -> list[int]:
        """Every PID this run started or saw started under it (checked gone by the tests)."""
        return sorted({p.pid for p in self.started.values()} | set(self.descendants))

    def logs(self, chars: int = 1500) -> str:
        parts = []
        for name, log in self.logs_.items():
            with contextlib.suppress(OSError, ValueError):
                log.flush()
                text = (self.tmp / f"{name}.log").read_text(errors="replace").strip()
                if text:
                    parts.append(f"\n--- {name} ---\n{text[-chars:]}")
        return "".join(parts)

    def stop_all(self) -> None:
        self.note_descendants()
        # Ours first (the SuperLink and SuperNodes stop their own children on SIGTERM), then
        # whatever they started that is still there; psutil's Process checks that a PID still
        # names the process seen before signalling it.
        for proc in self.started.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.started.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        left = [p for p in self.descendants.values() if _alive(p)]
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, still = psutil.wait_procs(left, timeout=5)
        for p in still:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(still, timeout=5)
        for log in self.logs_.values():
            log.close()


def _alive(p: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    return False


@contextlib.contextmanager
def _processes(tmp: Path, env: dict[str, str]) -> Iterator[_Processes]:
    procs = _Processes(tmp, env)
    try:
        yield procs
    finally:
        procs.stop_all()
