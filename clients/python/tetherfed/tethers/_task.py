"""The task a tethered model trains on: its data, its loss, and the probe batch drawn from it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

TaskKind = Literal["classification", "regression"]
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Task:
    """A dataset with its loss: what a worker trains on.

    ``input_shape`` excludes the batch dimension; ``n_outputs`` is the number of classes
    (classification, integer targets) or of regression targets (float targets of shape (N, n)).
    ``sample_inputs(n, generator)``, when given, draws n fresh inputs from the task's input
    distribution (the federation's shared probe batch for ``cka``); without it the probe batch is
    a seeded sample of the task's own inputs (see :func:`probe_inputs`).
    """

    name: str
    train: TensorDataset
    val: TensorDataset
    loss_fn: LossFn
    kind: TaskKind
    input_shape: tuple[int, ...]
    n_outputs: int
    sample_inputs: Callable[[int, torch.Generator], Tensor] | None = None


def probe_inputs(task: Task, size: int, seed: int) -> Tensor:
    """The probe batch of a federation with probe seed ``seed``: ``size`` inputs from the task's
    ``sample_inputs``, else drawn (with replacement) from its training and validation inputs."""
    generator = torch.Generator().manual_seed(seed)
    if task.sample_inputs is not None:
        return task.sample_inputs(size, generator)
    pool = torch.cat([task.train.tensors[0], task.val.tensors[0]])
    return pool[torch.randint(0, len(pool), (size,), generator=generator)]
