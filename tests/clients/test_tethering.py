"""Tethered layers: W_eff = W ⊙ T through torch parametrizations, in the three modes."""

from __future__ import annotations

import io
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tetherfed.tethers._tethering import (
    ROOT_LAYER,
    TetherMode,
    TetherParametrization,
    get_tether,
    layer_table,
    set_tether_,
    tether,
    tethered_layers,
    update_importance,
)

MODES = ["static", "learned", "importance"]


class Net(nn.Module):
    """The prototype's MLP shape, shrunk, plus a conv stem to cover Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(3 * 4 * 4, 8)
        self.fc2 = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv(x)).flatten(1)
        x = torch.relu(self.fc1(x))
        y: Tensor = self.out(torch.relu(self.fc2(x)))
        return y


def make_net(mode: str = "static", seed: int = 0, **kwargs: Any) -> Net:
    torch.manual_seed(1234)
    net = Net()
    options: dict[str, Any] = {"seed": seed, **kwargs}
    tether(net, cast(TetherMode, mode), **options)
    return net


def raw_weight(module: nn.Module) -> Tensor:
    parametrizations = cast(nn.ModuleDict, module.parametrizations)
    return cast(Tensor, parametrizations["weight"].original)


@pytest.mark.parametrize("mode", MODES)
def test_linear_forward_equals_explicit_masked_linear(mode: str) -> None:
    net = make_net(mode)
    x = torch.randn(5, 8)

    got = net.fc2(x)

    expected = F.linear(x, raw_weight(net.fc2) * get_tether(net.fc2), net.fc2.bias)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("conv_cls", [nn.Conv1d, nn.Conv2d, nn.Conv3d])
def test_conv_forward_equals_explicit_masked_conv(conv_cls: type[nn.Module]) -> None:
    conv = conv_cls(2, 3, kernel_size=3)
    dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[cast(type[nn.Conv1d], conv_cls)]
    x = torch.randn(2, 2, *([6] * dims))
    tether(conv)
    functional = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]

    got = conv(x)

    expected = functional(x, raw_weight(conv) * get_tether(conv), cast(Tensor, conv.bias))
    torch.testing.assert_close(got, expected)


def test_static_gradients_reach_weight_not_tether() -> None:
    net = make_net("static")
    net(torch.randn(4, 1, 4, 4)).sum().backward()

    grad = raw_weight(net.fc1).grad
    assert grad is not None and grad.abs().sum() > 0, "raw weight should receive a gradient"
    tp = tethered_layers(net)["fc1"]
    assert not tp.tether.requires_grad, "a static tether must not be trainable"
    assert [n for n, _ in net.named_parameters() if "tether" in n or "logits" in n] == []


def test_learned_gradients_reach_weight_and_logits() -> None:
    net = make_net("learned")
    net(torch.randn(4, 1, 4, 4)).sum().backward()

    tp = tethered_layers(net)["fc2"]
    assert raw_weight(net.fc2).grad is not None
    assert tp.logits.grad is not None and tp.logits.grad.abs().sum() > 0
    assert "fc2.parametrizations.weight.0.logits" in dict(net.named_parameters())


def test_learned_gradient_matches_chain_rule() -> None:
    lin = nn.Linear(4, 3)
    tether(lin, "learned", seed=3)
    x = torch.randn(6, 4)
    lin(x).pow(2).sum().backward()
    w = raw_weight(lin).detach()
    t: Tensor = get_tether(lin).requires_grad_(True)
    reference: Tensor = F.linear(x, w * t, lin.bias.detach()).pow(2).sum()
    torch.autograd.backward(reference)
    assert t.grad is not None

    tp = tethered_layers(lin)[ROOT_LAYER]

    expected = t.grad * t.detach() * (1 - t.detach())  # d sigmoid / d logits
    torch.testing.assert_close(tp.logits.grad, expected)


def test_learned_initial_tether_equals_static_draw() -> None:
    static, learned = make_net("static", seed=7), make_net("learned", seed=7)

    for name, tp in tethered_layers(static).items():
        torch.testing.assert_close(
            get_tether(tethered_layers(learned)[name]), tp.tether, atol=2e-4, rtol=0
        )


@pytest.mark.parametrize("mode", MODES)
def test_no_compounding_across_forward_passes(mode: str) -> None:
    net = make_net(mode)
    x = torch.randn(3, 1, 4, 4)
    before = raw_weight(net.fc1).detach().clone()

    first, second = net(x), net(x)
    _ = net.fc1.weight, net.fc1.weight

    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(raw_weight(net.fc1), before, rtol=0, atol=0)


def test_optimizer_step_changes_raw_weight_not_tether() -> None:
    net = make_net("static")
    t_before = get_tether(net.fc1).clone()
    w_before = raw_weight(net.fc1).detach().clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(4, 1, 4, 4)).pow(2).mean().backward()
        opt.step()

    torch.testing.assert_close(get_tether(net.fc1), t_before, rtol=0, atol=0)
    assert not torch.equal(raw_weight(net.fc1), w_before), "training should move the raw weight"
    torch.testing.assert_close(net.fc1.weight, raw_weight(net.fc1) * t_before)


def test_static_tether_is_seeded_uniform_draw_in_layer_order() -> None:
    a, b, c = make_net(seed=5), make_net(seed=5), make_net(seed=6)
    gen = torch.Generator().manual_seed(5)
    conv_draw = torch.rand((3, 1, 3, 3), generator=gen)

    torch.testing.assert_close(get_tether(a.conv), conv_draw, rtol=0, atol=0)
    for name in ["conv", "fc1", "fc2", "out"]:
        ta = get_tether(tethered_layers(a)[name])
        assert torch.equal(ta, get_tether(tethered_layers(b)[name])), f"{name}: same seed differs"
        assert not torch.equal(ta, get_tether(tethered_layers(c)[name])), f"{name}: seeds agree"
        assert ta.min() >= 0 and ta.max() < 1


@pytest.mark.parametrize("mode", ["static", "learned", "importance"])
def test_set_then_get_round_trips(mode: str) -> None:
    net = make_net(mode)
    value = torch.rand(8, 8, generator=torch.Generator().manual_seed(9)) * 0.98 + 0.01

    set_tether_(net.fc2, value)

    torch.testing.assert_close(get_tether(net.fc2), value, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(net.fc2.weight, raw_weight(net.fc2) * value, atol=1e-6, rtol=1e-5)


def test_set_tether_accepts_the_parametrization_and_keeps_autograd_clean() -> None:
    net = make_net("learned")
    tp = tethered_layers(net)["out"]

    set_tether_(tp, torch.full((3, 8), 0.25))

    torch.testing.assert_close(get_tether(net.out), torch.full((3, 8), 0.25))
    assert tp.logits.is_leaf and tp.logits.grad_fn is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (torch.full((8, 7), 0.5), "shape mismatch"),
        (torch.full((8, 8), 1.5), r"\[0, 1\]"),
        (torch.full((8, 8), float("nan")), "finite"),
    ],
)
def test_set_tether_rejects_bad_values_and_changes_nothing(value: Tensor, message: str) -> None:
    net = make_net("static")
    before = get_tether(net.fc2).clone()

    with pytest.raises(ValueError, match=message):
        set_tether_(net.fc2, value)

    torch.testing.assert_close(get_tether(net.fc2), before, rtol=0, atol=0)


def test_get_tether_on_untethered_module_raises() -> None:
    with pytest.raises(ValueError, match="no tether"):
        get_tether(nn.Linear(2, 2))


def train_steps(net: Net, steps: int) -> list[list[str]]:
    refreshed = []
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for step in range(steps):
        opt.zero_grad()
        x = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(step))
        net(x).pow(2).mean().backward()
        refreshed.append(update_importance(net))
        opt.step()
    return refreshed


def test_importance_refreshes_tether_every_k_steps() -> None:
    net = make_net("importance", importance_every=3, importance_decay=0.5)
    initial = get_tether(net.fc1).clone()

    refreshed = train_steps(net, 2)
    torch.testing.assert_close(get_tether(net.fc1), initial, rtol=0, atol=0)
    refreshed += train_steps(net, 1)

    assert refreshed == [[], [], ["conv", "fc1", "fc2", "out"]]
    t = get_tether(net.fc1)
    assert not torch.equal(t, initial), "the tether should have been refreshed at step 3"
    assert t.min() >= 0 and t.max() == 1, "importance is scaled by its maximum"


def test_importance_tether_is_scaled_ema_of_weight_times_grad() -> None:
    lin = nn.Linear(3, 2)
    tether(lin, "importance", importance_every=2, importance_decay=0.5)
    tp = tethered_layers(lin)[ROOT_LAYER]
    w = torch.randn(2, 3)
    g1, g2 = torch.randn(2, 3), torch.randn(2, 3)

    assert tp.observe(w, g1) is False
    assert tp.observe(w, g2) is True

    ema = 0.5 * (0.5 * (w * g1).abs()) + 0.5 * (w * g2).abs()
    torch.testing.assert_close(get_tether(lin), ema / ema.max())


def test_observe_outside_importance_mode_raises() -> None:
    lin = tether(nn.Linear(2, 2), "static")
    with pytest.raises(ValueError, match="importance mode"):
        tethered_layers(lin)[ROOT_LAYER].observe(torch.ones(2, 2), torch.ones(2, 2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "frozen"}, "unknown tether mode"),
        ({"importance_every": 0}, "importance_every"),
        ({"importance_decay": 1.0}, "importance_decay"),
    ],
)
def test_tether_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tether(nn.Linear(2, 2), **kwargs)


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_round_trips_into_differently_seeded_model(mode: str) -> None:
    source = make_net(mode, seed=1, importance_every=3)
    train_steps(source, 4)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    target = make_net(mode, seed=2, importance_every=3)
    train_steps(target, 2)
    x = torch.randn(4, 1, 4, 4)
    assert not torch.equal(source(x), target(x)), "different seeds should differ before loading"

    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True))

    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    if mode == "importance":  # the step counter travels too: both refresh on step 6
        expected = [[], ["conv", "fc1", "fc2", "out"]]
        assert train_steps(source, 2) == train_steps(target, 2) == expected


def test_state_dict_keys_name_the_tether() -> None:
    keys = set(make_net("importance").state_dict())

    assert {
        "fc1.parametrizations.weight.original",
        "fc1.parametrizations.weight.0.tether",
        "fc1.parametrizations.weight.0.ema",
        "fc1.parametrizations.weight.0.steps",
    } <= keys


def test_layers_selects_only_named_modules() -> None:
    torch.manual_seed(0)
    net = Net()

    tether(net, layers=["fc2", "conv"])

    assert list(tethered_layers(net)) == ["conv", "fc2"]
    assert isinstance(tethered_layers(net)["fc2"], TetherParametrization)
    torch.testing.assert_close(
        net.fc1(torch.ones(1, 48)), F.linear(torch.ones(1, 48), net.fc1.weight, net.fc1.bias)
    )
    assert not hasattr(net.fc1, "parametrizations")


def test_unknown_layer_names_raise_naming_them() -> None:
    net = Net()
    with pytest.raises(ValueError, match="unknown layers: fc9, head"):
        tether(net, layers=["fc1", "fc9", "head"])
    assert tethered_layers(net) == {}, "a failed tether() should change nothing"


def test_untetherable_layer_and_double_tether_raise() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(ValueError, match=r"cannot tether: 1 \(no registered weight\)"):
        tether(net, layers=["1"])
    tether(net)
    with pytest.raises(ValueError, match="already tethered: 0"):
        tether(net)


def test_layer_table_lists_names_shapes_dtypes_in_order() -> None:
    net = make_net("learned")

    table = layer_table(net)

    assert table == [
        {"name": "conv", "shape": [3, 1, 3, 3], "dtype": "float32"},
        {"name": "fc1", "shape": [8, 48], "dtype": "float32"},
        {"name": "fc2", "shape": [8, 8], "dtype": "float32"},
        {"name": "out", "shape": [3, 8], "dtype": "float32"},
    ]


def test_double_precision_model_gets_double_tethers() -> None:
    lin = nn.Linear(3, 2).double()
    tether(lin, "learned")
    assert get_tether(lin).dtype == torch.float64
    assert lin(torch.randn(1, 3, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_cpu(mode: str) -> None:
    cpu = make_net(mode, seed=4)
    torch.manual_seed(1234)
    gpu = tether(Net().cuda(), mode, seed=4)
    x = torch.randn(4, 1, 4, 4)

    for name, tp in tethered_layers(cpu).items():
        gpu_tp = tethered_layers(gpu)[name]
        assert get_tether(gpu_tp).is_cuda
        # The stored state (draw or logits) is bit-identical; sigmoid may differ by an ulp.
        torch.testing.assert_close(gpu_tp.storage().cpu(), tp.storage(), rtol=0, atol=0)
        torch.testing.assert_close(get_tether(gpu_tp).cpu(), get_tether(tp), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), atol=1e-5, rtol=1e-5)
    gpu(x.cuda()).sum().backward()
    if mode == "importance":
        assert update_importance(gpu) == []
    set_tether_(gpu.fc2, torch.full((8, 8), 0.5))
    torch.testing.assert_close(get_tether(gpu.fc2).cpu(), torch.full((8, 8), 0.5))
