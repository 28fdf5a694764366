"""A worker's checkpoints: written so that a failure never leaves a half-written file under the
checkpoint's name, read so that a bad file is named with what is wrong with it.

A checkpoint (`latest.pt`, `best.pt`) holds the worker's configuration (without the coordinator's
token), the step, the model, optimizer and scheduler states, the federation state and the
validation loss, in one `torch.save` file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

KEYS = ("config", "step", "model", "optimizer", "scheduler", "federation")
# Signals whose handlers may end or requeue a run (Ctrl-C, a scheduler's stop, Slurm's requeue
# signal, tetherfed's finish signal): held back while a checkpoint is written.
DEFERRED = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2")
    if hasattr(signal, name)
)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and the cause."""


def save(path: Path, state: Mapping[str, Any]) -> None:
    """Write `state` to `path` atomically and durably: a temporary file in the same folder,
    flushed to disk, then renamed over `path` (and the folder entry flushed).

    The file is readable by its owner only (mode 0600): the federation state holds the worker's
    token. On any failure the temporary file is removed, `path` keeps its previous content, and
    `CheckpointError` says which file, why, and how much room its filesystem has left."""
    tmp = path.with_name(path.name + ".tmp")
    with signals_deferred():
        _write(path, tmp, state)


def _write(path: Path, tmp: Path, state: Mapping[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # a leftover of an interrupted write (or anything there)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {error}{_room(path)}") from error


def load(path: Path, device: torch.device) -> dict[str, Any]:
    """The checkpoint at `path`, its tensors on `device`. `CheckpointError` naming the file when
    it cannot be read, is not a checkpoint (truncated, another format) or lacks a part."""
    try:
        saved = torch.load(path, map_location=device, weights_only=False)
    except Exception as error:  # torch raises many kinds for a torn or foreign file
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(error).__name__}: {error}); it is damaged or "
            "not a tetherfed checkpoint: move it away to start over, or copy best.pt over it"
        ) from error
    missing = [key for key in KEYS if not isinstance(saved, dict) or key not in saved]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: not a worker's")
    return dict(saved)


def restore(
    path: Path, saved: Mapping[str, Any], parts: Mapping[str, Any], config: Mapping[str, Any]
) -> None:
    """Load each part of `saved` (model, optimizer, scheduler) into its object in `parts`;
    `CheckpointError` naming the file when one does not fit, with the settings that differ
    between the checkpoint's run and this one (`config`)."""
    for name, target in parts.items():
        try:
            target.load_state_dict(saved[name])
        except (RuntimeError, ValueError, KeyError) as error:
            before = saved.get("config") or {}
            changed = sorted(k for k in config if k in before and before[k] != config[k])
            hint = f"; settings changed since: {', '.join(changed)}" if changed else ""
            raise CheckpointError(
                f"checkpoint {path} does not fit this worker's {name}{hint}: {error}"
            ) from error


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold back the `DEFERRED` signals that arrive inside the block and deliver them, once each,
    when it ends (main thread only; elsewhere the block runs as it is).

    A handler that raises while `torch.save` writes (Slurm's requeue exits, Ctrl-C interrupts)
    lets torch's writer fail on the way out, so the interruption surfaced as a failed write and
    the run reported a disk error. Deferred, the write completes and the handler runs after it.
    Signals whose handler was not set from Python are left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous: dict[int, Any] = {}
    for sig in DEFERRED:
        if signal.getsignal(sig) is not None:
            previous[sig] = signal.signal(sig, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


def _room(path: Path) -> str:
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(path.parent).free
        return f" ({free / 2**20:.1f} MiB free on its filesystem)"
    return ""


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
