"""Built-in tasks and models, and user tasks given as module:function."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tetherfed.tethers._tethering import tether, tethered_layers
from tetherfed.worker._tasks import (
    Task,
    build_model,
    default_model,
    load_task,
    model_names,
    resolve_reference,
    task_names,
)

EXPECTED = {
    # name: (kind, input_shape, n_outputs, n_train, n_val)
    "random-classification": ("classification", (128,), 10, 3200, 640),
    "piecewise": ("regression", (1,), 1, 5000, 1000),
    "sin": ("regression", (1,), 1, 5000, 1000),
    "sinc": ("regression", (1,), 1, 5000, 1000),
    "digits": ("classification", (1, 8, 8), 10, 1438, 359),
    "digits-rot": ("classification", (1, 8, 8), 10, 1438, 359),
    "digits-perm": ("classification", (1, 8, 8), 10, 1438, 359),
}


@pytest.fixture
def user_module_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def test_builtin_names_are_listed() -> None:
    assert task_names() == list(EXPECTED)
    assert set(model_names()) == {
        "mlp",
        "relu-chain-5555",
        "relu-chain-888",
        "digits-mlp",
        "digits-cnn",
    }


@pytest.mark.parametrize("name", list(EXPECTED))
def test_task_loads_with_declared_shapes(name: str) -> None:
    kind, input_shape, n_outputs, n_train, n_val = EXPECTED[name]

    task = load_task(name, seed=0)

    assert (task.name, task.kind, task.input_shape, task.n_outputs) == (
        name,
        kind,
        input_shape,
        n_outputs,
    )
    for split, n in ((task.train, n_train), (task.val, n_val)):
        x, y = split.tensors
        assert x.shape == (n, *input_shape) and x.dtype == torch.float32
        if kind == "classification":
            assert y.shape == (n,) and y.dtype == torch.long
            assert int(y.min()) >= 0 and int(y.max()) == n_outputs - 1
        else:
            assert y.shape == (n, n_outputs) and y.dtype == torch.float32


@pytest.mark.parametrize("name", list(EXPECTED))
def test_task_is_deterministic_per_seed(name: str) -> None:
    a, b, c = load_task(name, seed=1), load_task(name, seed=1), load_task(name, seed=2)

    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])


def test_regression_targets_follow_their_functions() -> None:
    piecewise, sin, sinc = load_task("piecewise"), load_task("sin"), load_task("sinc")

    x, y = piecewise.train.tensors
    assert x.min() >= -3 and x.max() <= 3
    inside = ((x >= -2) & (x < -1)) | ((x >= 0) & (x < 2))
    assert torch.equal(y, inside.float())
    x, y = sin.train.tensors
    torch.testing.assert_close(y, torch.sin(x))
    x, y = sinc.train.tensors
    assert x.min() >= -32 and x.max() <= 32 and x.abs().max() > 16
    torch.testing.assert_close(y, torch.sin(x) / x, atol=1e-5, rtol=1e-4)


def test_digits_are_scaled_to_unit_interval_and_splits_disjoint() -> None:
    task = load_task("digits", seed=0)
    train_x, val_x = task.train.tensors[0], task.val.tensors[0]

    assert train_x.min() == 0 and train_x.max() == 1
    assert len(train_x) + len(val_x) == 1797
    assert not any(torch.equal(val_x[0], row) for row in train_x[:50])


@pytest.mark.parametrize("name", list(EXPECTED))
def test_default_model_trains_a_step_on_a_batch(name: str) -> None:
    task = load_task(name, seed=0)
    model = tether(build_model(default_model(name), task, seed=0))
    x, y = task.train[:16]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    loss = task.loss_fn(model(x), y)
    loss.backward()
    opt.step()

    assert model(x).shape == (16, task.n_outputs)
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    assert len(tethered_layers(model)) >= 3


@pytest.mark.parametrize(
    ("model_name", "task_name", "layers"),
    [
        ("mlp", "random-classification", {"fc1": [64, 128], "fc2": [64, 64], "out": [10, 64]}),
        ("mlp", "digits", {"fc1": [64, 64], "fc2": [64, 64], "out": [10, 64]}),
        (
            "relu-chain-5555",
            "sin",
            {"fc1": [5, 1], "fc2": [5, 5], "fc3": [5, 5], "fc4": [5, 5], "out": [1, 5]},
        ),
        ("relu-chain-888", "sinc", {"fc1": [8, 1], "fc2": [8, 8], "fc3": [8, 8], "out": [1, 8]}),
        (
            "digits-cnn",
            "digits",
            {"conv1": [16, 1, 3, 3], "conv2": [32, 16, 3, 3], "out": [10, 512]},
        ),
    ],
)
def test_models_have_the_seed_architectures(
    model_name: str, task_name: str, layers: dict[str, list[int]]
) -> None:
    model = tether(build_model(model_name, load_task(task_name), seed=0))

    got = {name: list(tp.tether.shape) for name, tp in tethered_layers(model).items()}

    assert got == layers


def test_digits_mlp_runs_on_images() -> None:
    task = load_task("digits")
    model = build_model("digits-mlp", task)
    assert model(task.val.tensors[0][:4]).shape == (4, 10)


def test_build_model_is_seeded_and_leaves_global_rng_alone() -> None:
    task = load_task("sin")
    torch.manual_seed(99)
    expected_next = torch.rand(1)
    torch.manual_seed(99)

    a, b = build_model("mlp", task, seed=3), build_model("mlp", task, seed=3)
    c = build_model("mlp", task, seed=4)

    assert torch.equal(torch.rand(1), expected_next)
    assert torch.equal(a.fc1.weight, b.fc1.weight)
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


def test_cnn_rejects_flat_inputs() -> None:
    with pytest.raises(ValueError, match="channels, height, width"):
        build_model("digits-cnn", load_task("sin"))


def test_unknown_names_raise() -> None:
    with pytest.raises(ValueError, match="unknown task 'mnist'"):
        load_task("mnist")
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet", load_task("sin"))
    with pytest.raises(ValueError, match="unknown task 'mnist'"):
        default_model("mnist")


@pytest.mark.usefixtures("user_module_on_path")
def test_user_task_and_model_resolve_from_module_function() -> None:
    task = load_task("usertask_example:tiny_task", seed=5)
    model = build_model("usertask_example:tiny_model", task, seed=0)

    assert isinstance(task, Task) and task.name == "tiny"
    assert torch.equal(
        task.train.tensors[0], load_task("usertask_example:tiny_task", 5).train.tensors[0]
    )
    assert not torch.equal(
        task.train.tensors[0], load_task("usertask_example:tiny_task", 6).train.tensors[0]
    )
    assert model(task.train.tensors[0]).shape == (12, 2)
    assert default_model("usertask_example:tiny_task") == "mlp"


@pytest.mark.usefixtures("user_module_on_path")
def test_user_task_without_seed_parameter_is_called_without_one() -> None:
    assert load_task("usertask_example:seedless_task", seed=3).name == "tiny"


@pytest.mark.usefixtures("user_module_on_path")
@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("no_such_module_xyz:task", "cannot import module 'no_such_module_xyz'"),
        ("usertask_example:missing", "has no callable 'missing'"),
        ("usertask_example:NOT_CALLABLE", "has no callable 'NOT_CALLABLE'"),
        ("usertask_example:not_a_task", "returned str, not a Task"),
        (":tiny_task", "expected 'module:function'"),
        ("usertask_example:", "expected 'module:function'"),
    ],
)
def test_bad_user_task_references_raise_value_error(reference: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_task(reference)


@pytest.mark.usefixtures("user_module_on_path")
def test_user_model_must_return_a_module() -> None:
    with pytest.raises(ValueError, match=r"not nn\.Module"):
        build_model("usertask_example:not_a_model", load_task("sin"))


def test_resolve_reference_returns_the_callable() -> None:
    assert resolve_reference("torch.nn:Linear") is nn.Linear
