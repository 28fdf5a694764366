"""`tetherfed worker`: one federated training process. Its options, the built-in tasks and
models, the training loop, and :func:`main`, the entry every engine starts a worker through.
Names load on first use, so the CLI can build its parser without importing torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tetherfed._lazy import lazy_exports

if TYPE_CHECKING:
    from ._main import main, run_from_args
    from ._options import WorkerInfo, WorkerOptions
    from ._tasks import build_model, default_model, load_task
    from ._worker import WorkerConfig, run_worker

_LAZY = {
    "main": "._main",
    "run_from_args": "._main",
    "WorkerInfo": "._options",
    "WorkerOptions": "._options",
    "build_model": "._tasks",
    "default_model": "._tasks",
    "load_task": "._tasks",
    "WorkerConfig": "._worker",
    "run_worker": "._worker",
}

__all__ = [
    "WorkerConfig",
    "WorkerInfo",
    "WorkerOptions",
    "build_model",
    "default_model",
    "load_task",
    "main",
    "run_from_args",
    "run_worker",
]

__getattr__ = lazy_exports(__name__, _LAZY)
