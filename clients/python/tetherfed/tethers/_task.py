"""The task a tethered model trains on: its data, its loss, and the probe batch drawn from it."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

TaskKind = Literal["classification", "regression"]
LossFn = Callable[[Tensor, Tensor], Tensor]
MetricFn = Callable[[Tensor, Tensor], float]


@dataclass(frozen=True)
class Task:
    """A dataset with its loss: what a worker trains on.

    ``input_shape`` excludes the batch dimension; ``n_outputs`` is the number of classes
    (classification, integer targets) or of regression targets (float targets of shape (N, n)).
    ``sample_inputs(n, generator)``, when given, draws n fresh inputs from the task's input
    distribution (the federation's shared probe batch for ``cka``); without it the probe batch is
    a seeded sample of the task's own inputs (see :func:`probe_inputs`).

    ``metrics`` maps a name to ``fn(outputs, targets) -> float`` over the whole validation set
    (outputs (N, n_outputs), targets as in the dataset), a score where *higher is better*
    (e.g. :func:`accuracy` as ``acc``); a worker records each as ``val_<name>`` next to
    ``val_loss``.
    """

    name: str
    train: TensorDataset
    val: TensorDataset
    loss_fn: LossFn
    kind: TaskKind
    input_shape: tuple[int, ...]
    n_outputs: int
    sample_inputs: Callable[[int, torch.Generator], Tensor] | None = None
    metrics: Mapping[str, MetricFn] = field(default_factory=lambda: MappingProxyType({}))


def accuracy(outputs: Tensor, targets: Tensor) -> float:
    """Fraction in [0, 1] of rows of ``outputs`` (N, classes) whose argmax is the integer target
    (N,); NaN for N = 0."""
    if len(targets) == 0:
        return math.nan
    return float((outputs.argmax(dim=1) == targets).float().mean())


CLASSIFICATION_METRICS: Mapping[str, MetricFn] = MappingProxyType({"acc": accuracy})


def probe_inputs(task: Task, size: int, seed: int) -> Tensor:
    """The probe batch of a federation with probe seed ``seed``: ``size`` inputs from the task's
    ``sample_inputs``, else drawn (with replacement) from its training and validation inputs."""
    generator = torch.Generator().manual_seed(seed)
    if task.sample_inputs is not None:
        return task.sample_inputs(size, generator)
    pool = torch.cat([task.train.tensors[0], task.val.tensors[0]])
    return pool[torch.randint(0, len(pool), (size,), generator=generator)]
