"""A user task for test_up.py: `crashing_task:task` raises in the loss after a few steps, for one
seed only (CRASH_SEED in the environment), so one worker of an ensemble crashes mid-run."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from tetherfed.worker._tasks import Task, load_task

CRASH_AFTER = 30


class CrashingLoss:
    """The task's loss, raising RuntimeError on call number CRASH_AFTER."""

    def __init__(self, loss_fn: Any) -> None:
        self.loss_fn, self.calls = loss_fn, 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls >= CRASH_AFTER:
            raise RuntimeError("crashing_task: deliberate crash for the test")
        return self.loss_fn(*args)


def task(seed: int) -> Task:
    """random-classification; the worker with seed CRASH_SEED crashes after CRASH_AFTER steps."""
    base = load_task("random-classification", seed)
    if seed == int(os.environ.get("CRASH_SEED", "-1")):
        return dataclasses.replace(base, loss_fn=CrashingLoss(base.loss_fn))
    return base
