"""A user's own task and model, referenced as "usertask_example:function" in test_tasks.py."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from tetherfed.worker import WorkerInfo
from tetherfed.worker._tasks import Task

NOT_CALLABLE = 42


def tiny_task(seed: int) -> Task:
    """Three inputs, two classes, a handful of samples; depends on the seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((12, 3), generator=g)
    y = (x.sum(dim=1) > 1.5).long()
    data = TensorDataset(x, y)
    return Task("tiny", data, data, nn.CrossEntropyLoss(), "classification", (3,), 2)


def seedless_task() -> Task:
    """A task function that takes no seed."""
    return tiny_task(0)


def not_a_task() -> str:
    """Returns the wrong type."""
    return "nope"


def tiny_model(task: Task) -> nn.Module:
    """One Linear layer sized for the task."""
    return nn.Sequential(nn.Flatten(), nn.Linear(task.input_shape[0], task.n_outputs))


def not_a_model(task: Task) -> str:
    """A model function that returns the wrong type."""
    return str(task.name)


def worker_task(seed: int, worker: WorkerInfo, scale: float = 1.0) -> Task:
    """A task that records what it was given: inputs hold (seed, worker index, group index,
    index in group, group size, repeat, run seed, scale)."""
    values = [
        seed,
        worker.index,
        worker.group_index,
        worker.index_in_group,
        worker.group_size,
        worker.repeat,
        worker.seed,
        scale,
    ]
    x = torch.tensor([values] * 4, dtype=torch.float32)
    data = TensorDataset(x, torch.zeros(4, dtype=torch.long))
    return Task(worker.group, data, data, nn.CrossEntropyLoss(), "classification", (8,), 2)
