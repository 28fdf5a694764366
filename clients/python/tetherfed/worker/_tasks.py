"""Built-in offline tasks and models; a user's own as a ``module:function`` reference.

Tasks (``load_task(name, seed)``):

* ``random-classification``: the prototype's data, 128 U[0,1) inputs, 10 uniformly random labels,
  3,200 training samples (plus 640 for validation). Labels carry no signal: models can only
  memorise, as in the prototype.
* ``piecewise``, ``sin``, ``sinc``: 1-D regression on 5,000 samples, x ~ U[-3, 3]
  (``sinc`` = sin(x)/x on x ~ U[-32, 32]); ``piecewise`` is the seed's step function, 1 on
  [-2, -1) and [0, 2), else 0. Validation: 1,000 further draws.
* ``digits``: scikit-learn's bundled 8x8 digits as 1x8x8 images scaled to [0, 1], split 80/20.
* ``digits-rot`` (clustered): ``digits`` in K rotation clusters. Cluster c sees every image,
  training and validation, rotated counter-clockwise by c·90° when K ≤ 4 (exact, ``rot90``),
  else by c·360/K degrees (bilinear, zeros outside). Task args: ``k`` (K, default 4) and
  ``cluster`` (default: the worker's group index, ``WorkerInfo.group_index``; it must be < K).
  The probe inputs (``sample_inputs``) are drawn from all K rotations, so workers of every
  cluster share them.
* ``digits-perm`` (clustered): ``digits`` in K label-permutation clusters: cluster c's labels,
  training and validation, go through a fixed permutation π_c of the 10 classes (π_0 the
  identity; π_1 … π_{K-1} distinct, drawn one after another from ``perm_seed``, default 0).
  Task args ``k``, ``cluster`` as above, and ``perm_seed``. Inputs are digits' own.

Classification tasks report accuracy as the metric ``acc`` (a worker records ``val_acc``).

Task arguments: a task function's keyword parameters other than ``seed`` and ``worker`` are its
arguments, set with ``task_args`` (a spec's ``[[groups]]`` ``task_args = {k = 4}``, or
``tetherfed worker --task-arg k=4``); an argument the function does not take is an error. A task
function that takes ``worker`` receives a :class:`~tetherfed.worker.WorkerInfo` (the worker's
index, group, place in the group, repeat and run seed), so it can give each worker its own data.

Shards (``shard = {size = N, scheme = "disjoint" | "iid"}``, see :func:`shard`): the group's
workers load the task from the run's seed (one dataset for the whole group, whatever their data
seeds), then each keeps N training examples; the validation set is left whole.

Models (``build_model(name, task, seed)``) adapt their input and output sizes to the task:
``mlp`` (the prototype's fc1-fc2-out with 64 hidden units: 128-64-10 on random-classification),
``relu-chain-5555`` / ``relu-chain-888`` (ReLU chains of 5-5-5-5 and 8-8-8 units), ``digits-mlp`` and
``digits-cnn`` (two Conv2d layers).

A user task is ``"package.module:function"``; the function returns a :class:`Task` and is called
with ``seed=`` when it takes a ``seed`` parameter, ``worker=`` when it takes ``worker``, and its
task args as keywords. A user model is ``"package.module:function"``
taking the task and returning an ``nn.Module``; it is called under ``torch.manual_seed(seed)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import cast

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from tetherfed.tethers import CLASSIFICATION_METRICS, Task
from tetherfed.tethers._probe import GATE_BATCH

from ._options import ShardSpec, TaskArg, WorkerInfo

_CLASSIFICATION_TRAIN, _CLASSIFICATION_VAL = 3200, 640
_REGRESSION_TRAIN, _REGRESSION_VAL = 5000, 1000
_DIGITS_VAL_FRACTION = 0.2
_DIGITS_CLASSES = 10
_DEFAULT_CLUSTERS = 4


class MLP(nn.Module):
    """ReLU after every hidden Linear (``fc1``, ``fc2``, ...), then a Linear ``out``.

    Inputs of any shape are flattened after the batch dimension.
    """

    def __init__(self, n_inputs: int, hidden: Sequence[int], n_outputs: int) -> None:
        super().__init__()
        widths = [n_inputs, *hidden]
        self.hidden_names = [f"fc{i + 1}" for i in range(len(hidden))]
        for name, n_in, n_out in zip(self.hidden_names, widths, widths[1:], strict=False):
            self.add_module(name, nn.Linear(n_in, n_out))
        self.out = nn.Linear(widths[-1], n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        """Map a batch (B, *input_shape) to (B, n_outputs)."""
        x = x.flatten(1)
        for name in self.hidden_names:
            layer: nn.Module = getattr(self, name)
            x = torch.relu(layer(x))
        y: Tensor = self.out(x)
        return y


class SmallCNN(nn.Module):
    """Two 3x3 ``Conv2d`` layers (``conv1``, ``conv2``), a 2x2 max-pool and a Linear ``out``."""

    def __init__(self, input_shape: tuple[int, ...], n_outputs: int, channels: int = 16) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"a CNN needs (channels, height, width) inputs, got {input_shape}")
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.out = nn.Linear(2 * channels * (h // 2) * (w // 2), n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        """Map a batch (B, C, H, W) to (B, n_outputs)."""
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        y: Tensor = self.out(x.flatten(1))
        return y


def _random_classification(seed: int) -> Task:
    g = torch.Generator().manual_seed(seed)

    def draw(n: int) -> TensorDataset:
        x = torch.rand((n, 128), generator=g)
        return TensorDataset(x, torch.randint(0, 10, (n,), generator=g))

    train, val = draw(_CLASSIFICATION_TRAIN), draw(_CLASSIFICATION_VAL)
    loss = nn.CrossEntropyLoss()
    return Task(
        "random-classification",
        train,
        val,
        loss,
        "classification",
        (128,),
        10,
        sample_inputs=lambda n, gen: torch.rand((n, 128), generator=gen),
        metrics=CLASSIFICATION_METRICS,
    )


def _piecewise(x: Tensor) -> Tensor:
    return (((x >= -2) & (x < -1)) | ((x >= 0) & (x < 2))).to(x.dtype)


def _sinc(x: Tensor) -> Tensor:
    return torch.sinc(x / math.pi)  # torch.sinc is normalised: sinc(x / π) = sin(x) / x


def _regression(name: str, fn: Callable[[Tensor], Tensor], half_width: float, seed: int) -> Task:
    g = torch.Generator().manual_seed(seed)

    def draw(n: int) -> TensorDataset:
        x = (torch.rand((n, 1), generator=g) * 2 - 1) * half_width
        return TensorDataset(x, fn(x))

    def inputs(n: int, gen: torch.Generator) -> Tensor:
        return (torch.rand((n, 1), generator=gen) * 2 - 1) * half_width

    train, val = draw(_REGRESSION_TRAIN), draw(_REGRESSION_VAL)
    return Task(name, train, val, nn.MSELoss(), "regression", (1,), 1, sample_inputs=inputs)


def _digits_data(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(images (1797, 1, 8, 8) in [0, 1], labels (1797,), training indices, validation indices)."""
    from sklearn.datasets import load_digits  # noqa: PLC0415 - heavy import, only when asked

    images, labels = load_digits(return_X_y=True)
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.as_tensor(labels, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(y) * _DIGITS_VAL_FRACTION)
    return x, y, order[n_val:], order[:n_val]


def _digits(seed: int) -> Task:
    x, y, train_idx, val_idx = _digits_data(seed)
    train, val = TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx])

    def inputs(n: int, gen: torch.Generator) -> Tensor:  # the whole bundled set, whatever the split
        return x[torch.randint(0, len(x), (n,), generator=gen)]

    loss = nn.CrossEntropyLoss()
    return Task(
        "digits", train, val, loss, "classification", (1, 8, 8), 10, inputs, CLASSIFICATION_METRICS
    )


def cluster_of(worker: WorkerInfo, k: int, cluster: int | None) -> int:
    """The cluster (0 … k − 1) of a worker of a clustered task: ``cluster`` when given, else its
    group's index. ValueError when k < 1 or the cluster is outside [0, k)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"task arg k must be an integer ≥ 1, got {k!r}")
    found = worker.group_index if cluster is None else cluster
    if not isinstance(found, int) or not 0 <= found < k:
        where = "task arg cluster" if cluster is not None else f"group index ({worker.group!r})"
        raise ValueError(
            f"{where} {found!r} is not a cluster of k={k}: clusters are 0 … {k - 1} "
            "(set task_args k, or cluster per group)"
        )
    return found


def rotation_degrees(cluster: int, k: int) -> float:
    """Counter-clockwise rotation of cluster ``cluster`` of k: cluster·90° for k ≤ 4, else
    cluster·360/k degrees."""
    return 90.0 * cluster if k <= 4 else 360.0 * cluster / k


def rotate(images: Tensor, degrees: float) -> Tensor:
    """Images (N, C, H, W) rotated counter-clockwise (as displayed, row 0 on top) by ``degrees``:
    exact for multiples of 90°, else bilinear with zeros outside the image."""
    quarter = degrees / 90.0
    if quarter == round(quarter):
        return torch.rot90(images, round(quarter) % 4, dims=(2, 3))
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    # grid_sample reads output (x, y) from input at affine · (x, y), x right and y down in [-1, 1]
    affine = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=images.dtype)
    grid = nn.functional.affine_grid(
        affine.expand(len(images), 2, 3), list(images.shape), align_corners=False
    )
    return nn.functional.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def _digits_rot(
    seed: int, *, worker: WorkerInfo, k: int = _DEFAULT_CLUSTERS, cluster: int | None = None
) -> Task:
    c = cluster_of(worker, k, cluster)
    x, y, train_idx, val_idx = _digits_data(seed)
    rotated = [rotate(x, rotation_degrees(j, k)) for j in range(k)]
    xc = rotated[c]
    train, val = TensorDataset(xc[train_idx], y[train_idx]), TensorDataset(xc[val_idx], y[val_idx])
    every = torch.cat(rotated)

    def inputs(n: int, gen: torch.Generator) -> Tensor:  # every cluster's: one probe batch for all
        return every[torch.randint(0, len(every), (n,), generator=gen)]

    loss = nn.CrossEntropyLoss()
    return Task(
        "digits-rot",
        train,
        val,
        loss,
        "classification",
        (1, 8, 8),
        10,
        inputs,
        CLASSIFICATION_METRICS,
    )


def label_permutations(k: int, perm_seed: int = 0) -> list[Tensor]:
    """π_0 … π_{k−1} of the 10 digit classes (each a (10,) long tensor, label l → π[l]): π_0 the
    identity, then permutations drawn in turn from ``perm_seed``, each unlike every earlier one."""
    generator = torch.Generator().manual_seed(perm_seed)
    perms = [torch.arange(_DIGITS_CLASSES)]
    while len(perms) < k:
        candidate = torch.randperm(_DIGITS_CLASSES, generator=generator)
        if not any(torch.equal(candidate, p) for p in perms):
            perms.append(candidate)
    return perms


def _digits_perm(
    seed: int,
    *,
    worker: WorkerInfo,
    k: int = _DEFAULT_CLUSTERS,
    cluster: int | None = None,
    perm_seed: int = 0,
) -> Task:
    c = cluster_of(worker, k, cluster)
    pi = label_permutations(k, perm_seed)[c]
    x, y, train_idx, val_idx = _digits_data(seed)
    yc = pi[y]
    train, val = TensorDataset(x[train_idx], yc[train_idx]), TensorDataset(x[val_idx], yc[val_idx])

    def inputs(n: int, gen: torch.Generator) -> Tensor:
        return x[torch.randint(0, len(x), (n,), generator=gen)]

    loss = nn.CrossEntropyLoss()
    return Task(
        "digits-perm",
        train,
        val,
        loss,
        "classification",
        (1, 8, 8),
        10,
        inputs,
        CLASSIFICATION_METRICS,
    )


_TASKS: Mapping[str, Callable[..., Task]] = MappingProxyType(
    {
        "random-classification": _random_classification,
        "piecewise": lambda seed: _regression("piecewise", _piecewise, 3.0, seed),
        "sin": lambda seed: _regression("sin", torch.sin, 3.0, seed),
        "sinc": lambda seed: _regression("sinc", _sinc, 32.0, seed),
        "digits": _digits,
        "digits-rot": _digits_rot,
        "digits-perm": _digits_perm,
    }
)


def _mlp(hidden: Sequence[int]) -> Callable[[Task], nn.Module]:
    return lambda task: MLP(math.prod(task.input_shape), hidden, task.n_outputs)


_MODELS: Mapping[str, Callable[[Task], nn.Module]] = MappingProxyType(
    {
        "mlp": _mlp((64, 64)),
        "relu-chain-5555": _mlp((5, 5, 5, 5)),
        "relu-chain-888": _mlp((8, 8, 8)),
        "digits-mlp": _mlp((32, 32)),
        "digits-cnn": lambda task: SmallCNN(task.input_shape, task.n_outputs),
    }
)

_DEFAULT_MODELS: Mapping[str, str] = MappingProxyType(
    {
        "random-classification": "mlp",
        "piecewise": "relu-chain-5555",
        "sin": "relu-chain-5555",
        "sinc": "relu-chain-888",
        "digits": "digits-cnn",
        "digits-rot": "digits-cnn",
        "digits-perm": "digits-cnn",
    }
)


def task_names() -> list[str]:
    """Names of the built-in tasks."""
    return list(_TASKS)


def model_names() -> list[str]:
    """Names of the built-in models."""
    return list(_MODELS)


def default_model(task_name: str) -> str:
    """The model a task trains by default; ``mlp`` for a user's ``module:function`` task."""
    if task_name in _DEFAULT_MODELS:
        return _DEFAULT_MODELS[task_name]
    if ":" in task_name:
        return "mlp"
    raise ValueError(f"unknown task {task_name!r}; built-in tasks: {', '.join(_TASKS)}")


def load_task(
    name: str,
    seed: int = 0,
    *,
    worker: WorkerInfo | None = None,
    args: Mapping[str, TaskArg] | None = None,
) -> Task:
    """Load a built-in task by name, or a user's task given as ``"module:function"``.

    The function gets ``seed=`` and ``worker=`` (default ``WorkerInfo(seed=seed)``) when it
    takes them, and ``args`` as keyword arguments. ValueError for an unknown task, an argument
    the function does not take, or a function that returns no :class:`Task`.
    """
    fn = _task_function(name)
    params = _parameters(fn)
    kwargs: dict[str, object] = dict(check_task_args(name, args or {}, fn))
    if _accepts(params, "seed"):
        kwargs["seed"] = seed
    if _accepts(params, "worker"):
        kwargs["worker"] = worker if worker is not None else WorkerInfo(seed=seed)
    task = fn(**kwargs)
    if not isinstance(task, Task):
        raise ValueError(f"task function {name!r} returned {type(task).__name__}, not a Task")
    return task


def check_task_args(
    name: str, args: Mapping[str, TaskArg], fn: Callable[..., object] | None = None
) -> dict[str, TaskArg]:
    """``args`` as keywords for task ``name``'s function; ValueError naming what it takes
    when it does not take one of them (their values are the function's to check)."""
    fn = fn if fn is not None else _task_function(name)
    params = _parameters(fn)
    named = [
        p.name
        for p in (params or [])
        if p.name not in ("seed", "worker")
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    unknown = [a for a in args if not _accepts(params, a) or a in ("seed", "worker")]
    if unknown:
        takes = ", ".join(named) or "none"
        raise ValueError(f"task {name!r} takes no argument {unknown[0]!r} (task args: {takes})")
    return dict(args)


def shard(
    task: Task, spec: ShardSpec, worker: WorkerInfo, data_seed: int
) -> tuple[Task, TensorDataset]:
    """The task with its training set cut to the worker's shard, and the group's gate reserve.

    A permutation of the training set seeded by the run's seed and the group's index (the same
    for every worker of the group) sets aside its last min(256, n // 4) examples, n the training
    set's size: the reserve, on which the merge gate judges (no worker of the group trains on
    it, and the validation set stays for reporting). Of the rest, ``disjoint`` gives worker k
    of the group examples [k·size, (k+1)·size), ``iid`` a sample of ``size`` without
    replacement seeded by ``data_seed``. The validation set is untouched. ValueError when the
    training set is too small for the shards.
    """
    n = len(task.train)
    reserve = min(GATE_BATCH, n // 4)
    generator = torch.Generator().manual_seed(worker.seed * 1009 + worker.group_index)
    order = torch.randperm(n, generator=generator)
    pool, held = order[: n - reserve], order[n - reserve :]
    if spec.scheme == "disjoint":
        need = worker.group_size * spec.size
        if need > len(pool):
            raise ValueError(
                f"shard: {worker.group_size} disjoint shards of {spec.size} need {need} "
                f"training examples; task {task.name!r} has {n}, {reserve} of them held out for "
                f"the merge gate, so size ≤ {len(pool) // worker.group_size}"
            )
        k = worker.index_in_group
        picked = pool[k * spec.size : (k + 1) * spec.size]
    else:
        if spec.size > len(pool):
            raise ValueError(
                f"shard: an iid shard of {spec.size} needs that many training examples; task "
                f"{task.name!r} has {n}, {reserve} of them held out for the merge gate"
            )
        mine = torch.randperm(len(pool), generator=torch.Generator().manual_seed(data_seed))
        picked = pool[mine[: spec.size]]
    train = TensorDataset(*(t[picked] for t in task.train.tensors))
    return dataclasses.replace(task, train=train), TensorDataset(
        *(t[held] for t in task.train.tensors)
    )


def build_model(name: str, task: Task, seed: int = 0) -> nn.Module:
    """Build a built-in model (or a user's ``"module:function"``) for ``task``, seeded.

    The global torch RNG is left as it was.
    """
    factory = _model_factory(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(task)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model function {name!r} returned {type(model).__name__}, not nn.Module")
    return model


def resolve_reference(reference: str) -> Callable[..., object]:
    """Import ``"package.module:function"`` and return the callable, or raise ``ValueError``."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected 'module:function', got {reference!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} for {reference!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"module {module_name!r} has no callable {attr!r}")
    return cast(Callable[..., object], fn)


def _model_factory(name: str) -> Callable[[Task], object]:
    if name in _MODELS:
        return _MODELS[name]
    if ":" not in name:
        raise ValueError(
            f"unknown model {name!r}; built-in: {', '.join(_MODELS)}, or module:function"
        )
    return resolve_reference(name)


def _task_function(name: str) -> Callable[..., object]:
    if name in _TASKS:
        return _TASKS[name]
    if ":" not in name:
        raise ValueError(
            f"unknown task {name!r}; built-in: {', '.join(_TASKS)}, or module:function"
        )
    return resolve_reference(name)


def _parameters(fn: Callable[..., object]) -> list[inspect.Parameter] | None:
    """The function's parameters (None when its signature cannot be read)."""
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None


def _accepts(params: list[inspect.Parameter] | None, name: str) -> bool:
    """Whether a function with these parameters takes ``name`` as a keyword."""
    if params is None:
        return False
    return any(
        (p.name == name and p.kind is not inspect.Parameter.POSITIONAL_ONLY)
        or p.kind is inspect.Parameter.VAR_KEYWORD
        for p in params
    )
