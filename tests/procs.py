"""Processes as /proc shows them (Linux): whether one runs, a parent's children, and every
process carrying a marker in its environment. Used to find the coordinator's scoring
processes and to prove a test left no process behind."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def proc_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def child_pids(parent: int, needle: str) -> list[int]:
    """Live processes whose parent is `parent` and whose command line contains `needle`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if ppid == parent and needle in cmdline and proc_alive(int(entry.name)):
                found.append(int(entry.name))
    return sorted(found)


def marked_pids(name: str, value: str) -> list[int]:
    """Live processes (but this one) whose environment holds `name=value`: whoever started
    them, e.g. a coordinator's scoring processes inherit the coordinator's environment."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return sorted(p for p in found if proc_alive(p))


def restore_sigint() -> None:
    """Let the processes we start be stopped with Ctrl-C (SIGINT), as a user stops them.

    A command started in the background of a non-interactive shell (`make test &`, `nohup`, some
    CI runners) starts with SIGINT ignored, and an ignored signal is inherited by every child
    across exec: then no `tetherfed` process a test interrupts would notice. A handler is not
    inherited, so installing Python's own makes our children start with the default again."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
