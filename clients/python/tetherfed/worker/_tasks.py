"""Built-in offline tasks and models; a user's own as a ``module:function`` reference.

Tasks (``load_task(name, seed)``):

* ``random-classification``: the prototype's data, 128 U[0,1) inputs, 10 uniformly random labels,
  3,200 training samples (plus 640 for validation). Labels carry no signal: models can only
  memorise, as in the prototype.
* ``piecewise``, ``sin``, ``sinc``: 1-D regression on 5,000 samples, x ~ U[-3, 3]
  (``sinc`` = sin(x)/x on x ~ U[-32, 32]); ``piecewise`` is the seed's step function, 1 on
  [-2, -1) and [0, 2), else 0. Validation: 1,000 further draws.
* ``digits``: scikit-learn's bundled 8x8 digits as 1x8x8 images scaled to [0, 1], split 80/20.

Models (``build_model(name, task, seed)``) adapt their input and output sizes to the task:
``mlp`` (the prototype's fc1-fc2-out with 64 hidden units: 128-64-10 on random-classification),
``relu-chain-5555`` / ``relu-chain-888`` (ReLU chains of 5-5-5-5 and 8-8-8 units), ``digits-mlp`` and
``digits-cnn`` (two Conv2d layers).

A user task is ``"package.module:function"``; the function returns a :class:`Task` and is called
with ``seed=`` when it takes a ``seed`` parameter. A user model is ``"package.module:function"``
taking the task and returning an ``nn.Module``; it is called under ``torch.manual_seed(seed)``.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import cast

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from tetherfed.tethers import Task

_CLASSIFICATION_TRAIN, _CLASSIFICATION_VAL = 3200, 640
_REGRESSION_TRAIN, _REGRESSION_VAL = 5000, 1000
_DIGITS_VAL_FRACTION = 0.2


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


def _digits(seed: int) -> Task:
    from sklearn.datasets import load_digits  # noqa: PLC0415 - heavy import, only when asked

    images, labels = load_digits(return_X_y=True)
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.as_tensor(labels, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(y) * _DIGITS_VAL_FRACTION)
    val_idx, train_idx = order[:n_val], order[n_val:]
    train, val = TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx])

    def inputs(n: int, gen: torch.Generator) -> Tensor:  # the whole bundled set, whatever the split
        return x[torch.randint(0, len(x), (n,), generator=gen)]

    loss = nn.CrossEntropyLoss()
    return Task("digits", train, val, loss, "classification", (1, 8, 8), 10, inputs)


_TASKS: Mapping[str, Callable[[int], Task]] = MappingProxyType(
    {
        "random-classification": _random_classification,
        "piecewise": lambda seed: _regression("piecewise", _piecewise, 3.0, seed),
        "sin": lambda seed: _regression("sin", torch.sin, 3.0, seed),
        "sinc": lambda seed: _regression("sinc", _sinc, 32.0, seed),
        "digits": _digits,
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


def load_task(name: str, seed: int = 0) -> Task:
    """Load a built-in task by name, or a user's task given as ``"module:function"``."""
    if name in _TASKS:
        return _TASKS[name](seed)
    if ":" not in name:
        raise ValueError(
            f"unknown task {name!r}; built-in: {', '.join(_TASKS)}, or module:function"
        )
    fn = resolve_reference(name)
    task = fn(seed=seed) if _takes_seed(fn) else fn()
    if not isinstance(task, Task):
        raise ValueError(f"task function {name!r} returned {type(task).__name__}, not a Task")
    return task


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


def _takes_seed(fn: Callable[..., object]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "seed" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
