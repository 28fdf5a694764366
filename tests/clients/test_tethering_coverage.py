"""Which weights `tether()` covers: every registered layer type, tied weights, selection by name,
predicate and registration, lazy and weight-normed layers, and the coverage it reports."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

import tetherfed
from tetherfed.diagnostics import Diagnostics
from tetherfed.diagnostics._recorder import raw_weight, weight_layers
from tetherfed.tethers import _tethering
from tetherfed.tethers._tethering import (
    Coverage,
    get_tether,
    layer_table,
    load_plain_state_dict,
    pre_tether_weight,
    register_tetherable,
    set_tether_,
    tether,
    tether_coverage,
    tethered_layers,
    untether,
    update_importance,
)


def original(module: nn.Module, param: str = "weight") -> Tensor:
    return cast(Tensor, cast(Any, module).parametrizations[param].original)


def numel(*tensors: Tensor) -> int:
    return sum(t.numel() for t in tensors)


# (module factory, input factory, functional forward with explicit weights, expected layer names)
Case = tuple[Callable[[], nn.Module], Callable[[], Any], Callable[[nn.Module, Any], Tensor]]


def _conv_t(module: nn.Module, x: Tensor) -> Tensor:
    m = cast(nn.ConvTranspose2d, module)
    return F.conv_transpose2d(x, original(m) * get_tether(m), m.bias)


def _embedding(module: nn.Module, x: Tensor) -> Tensor:
    return F.embedding(x, original(module) * get_tether(module))


def _bilinear(module: nn.Module, x: tuple[Tensor, Tensor]) -> Tensor:
    m = cast(nn.Bilinear, module)
    return F.bilinear(x[0], x[1], original(m) * get_tether(m), m.bias)


CASES: dict[str, Case] = {
    "conv_transpose1d": (
        lambda: nn.ConvTranspose1d(2, 3, 3),
        lambda: torch.randn(2, 2, 5),
        lambda m, x: F.conv_transpose1d(x, original(m) * get_tether(m), cast(Any, m).bias),
    ),
    "conv_transpose2d": (
        lambda: nn.ConvTranspose2d(2, 3, 3),
        lambda: torch.randn(2, 2, 4, 4),
        _conv_t,
    ),
    "conv_transpose3d": (
        lambda: nn.ConvTranspose3d(2, 3, 2),
        lambda: torch.randn(1, 2, 3, 3, 3),
        lambda m, x: F.conv_transpose3d(x, original(m) * get_tether(m), cast(Any, m).bias),
    ),
    "embedding": (lambda: nn.Embedding(7, 4), lambda: torch.tensor([[0, 3, 6]]), _embedding),
    "bilinear": (
        lambda: nn.Bilinear(3, 4, 2),
        lambda: (torch.randn(5, 3), torch.randn(5, 4)),
        _bilinear,
    ),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_single_weight_types_are_tethered_and_compute_w_times_t(kind: str) -> None:
    make, inputs, functional = CASES[kind]
    torch.manual_seed(0)
    module, x = make(), inputs()
    weight = cast(Tensor, cast(Any, module).weight)

    tether(module)

    assert list(tethered_layers(module)) == [tetherfed.ROOT_LAYER]
    assert tether_coverage(module).tethered == weight.numel()
    got = module(*x) if isinstance(x, tuple) else module(x)
    torch.testing.assert_close(got, functional(module, x))


def test_multihead_attention_packed_projection_is_tethered() -> None:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)

    tether(attn)

    assert list(tethered_layers(attn)) == ["in_proj_weight", "out_proj"]
    coverage = tether_coverage(attn)
    assert coverage.tethered == 3 * 8 * 8 + 8 * 8
    assert coverage.total == coverage.tethered + 3 * 8 + 8  # the biases
    w_in = original(attn, "in_proj_weight") * get_tether(attn, "in_proj_weight")
    w_out = original(attn.out_proj) * get_tether(attn.out_proj)
    expected, _ = F.multi_head_attention_forward(
        *(x.transpose(0, 1),) * 3,
        8,
        2,
        w_in,
        attn.in_proj_bias,
        None,
        None,
        False,
        0.0,
        w_out,
        attn.out_proj.bias,
        training=False,
    )
    got, _ = attn(x, x, x)
    torch.testing.assert_close(got, expected.transpose(0, 1))


def test_multihead_attention_separate_projections_are_tethered() -> None:
    attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)

    tether(attn)

    assert list(tethered_layers(attn)) == [
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "out_proj",
    ]
    with pytest.raises(ValueError, match="several tethers"):
        get_tether(attn)
    set_tether_(attn, torch.zeros(8, 4), param="k_proj_weight")
    assert torch.equal(attn.k_proj_weight, torch.zeros(8, 4))


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
def test_recurrent_weights_are_tethered_and_take_effect(cls: type[nn.RNNBase]) -> None:
    torch.manual_seed(0)
    rnn = cls(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    reference = cls(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(2, 5, 3)
    names = [n for n, _ in rnn.named_parameters() if n.startswith("weight")]

    tether(rnn)

    assert list(tethered_layers(rnn)) == names  # weight_ih_l0, ..., weight_hh_l1_reverse
    assert tether_coverage(rnn).tethered == numel(*(getattr(reference, n) for n in names))
    with torch.no_grad():  # the same function with W ⊙ T as plain weights
        for name, param in reference.named_parameters():
            stored = original(rnn, name) if name in names else getattr(rnn, name)
            t = get_tether(rnn, name) if name in names else 1.0
            param.copy_(stored * t)
    torch.testing.assert_close(rnn(x)[0], reference(x)[0])
    set_tether_(rnn, torch.zeros_like(get_tether(rnn, "weight_ih_l0")), param="weight_ih_l0")
    assert not torch.allclose(rnn(x)[0], reference(x)[0]), "a new tether must change the output"


def test_recurrent_hook_refreshes_flat_weights_where_torch_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_tethering, "_RNN_NEEDS_HOOK", True)
    monkeypatch.setattr(nn.RNNBase, "_update_flat_weights", lambda self: None)  # older torch
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    plain = lstm(x)[0]

    tether(lstm)

    assert not torch.allclose(lstm(x)[0], plain), "the forward must read W ⊙ T"
    for name in tethered_layers(lstm):
        set_tether_(lstm, torch.ones_like(get_tether(lstm, name)), param=name)
    torch.testing.assert_close(lstm(x)[0], plain)


def test_rnn_cell_is_tethered() -> None:
    cell = nn.GRUCell(3, 4)
    tether(cell)
    assert list(tethered_layers(cell)) == ["weight_ih", "weight_hh"]


def test_transformer_encoder_tethers_attention_projections() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(2, 3, 16)
    before = encoder(x)

    tether(encoder)

    names = list(tethered_layers(encoder))
    assert "layers.0.self_attn.in_proj_weight" in names and "layers.1.linear2" in names
    assert len(names) == 8
    coverage = tether_coverage(encoder)
    attention = sum(
        numel(original(m.self_attn, "in_proj_weight"), original(m.self_attn.out_proj))
        for m in cast(Any, encoder.layers)
    )
    assert coverage.tethered == attention + 2 * 2 * 16 * 32
    assert [(s.type, s.modules) for s in coverage.skipped] == [("LayerNorm", 4)]
    assert not torch.allclose(encoder(x), before)
    encoder.eval()  # the fused fast path reads the tethered weights too
    with torch.no_grad():
        fast = encoder(x)
    for name, tp in tethered_layers(encoder).items():
        tp.set_(torch.ones_like(get_tether(tp)))
        del name
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), before)
    assert not torch.allclose(fast, before)


def test_selection_by_parameter_name_and_predicate() -> None:
    def make() -> nn.Module:
        layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    by_name = tether(make(), layers=["layers.0.self_attn.in_proj_weight", "layers.1.norm1.bias"])
    by_predicate = tether(make(), layers=lambda name, module, param: param == "in_proj_weight")

    assert list(tethered_layers(by_name)) == [
        "layers.0.self_attn.in_proj_weight",
        "layers.1.norm1.bias",
    ]
    assert list(tethered_layers(by_predicate)) == [
        "layers.0.self_attn.in_proj_weight",
        "layers.1.self_attn.in_proj_weight",
    ]
    skipped = {s.type: s.reason for s in tether_coverage(by_predicate).skipped}
    assert skipped["NonDynamicallyQuantizableLinear"] == "not selected"


def test_selection_errors_name_the_problem() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    with pytest.raises(ValueError, match=r"cannot tether: 1 \(no registered weight\)"):
        tether(net, layers=["1"])
    with pytest.raises(ValueError, match=r"unknown layers: 0\.gain"):
        tether(net, layers=["0.gain"])
    tether(net, layers=["1.weight"])
    with pytest.raises(ValueError, match=r"already tethered: 1$"):
        tether(net, layers=["1.weight"])


class Scale(nn.Module):
    """A custom layer: y = x * gain + shift (elementwise)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.randn(n))
        self.shift = nn.Parameter(torch.randn(n))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain + self.shift


def test_register_tetherable_adds_a_custom_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_tethering, "_REGISTRY", dict(_tethering._REGISTRY))
    net = nn.Sequential(nn.Linear(3, 3), Scale(3))
    before = tether_coverage(net)
    assert [(s.type.rsplit(".", 1)[-1], s.reason) for s in before.skipped] == [
        ("Linear", "not selected"),
        ("Scale", "no registered weight"),
    ]

    tetherfed.register_tetherable(Scale, params=("gain",))
    tether(net)

    assert list(tethered_layers(net)) == ["0", "1.gain"]
    x = torch.randn(2, 3)
    expected = net[0](x) * original(net[1], "gain") * get_tether(net[1]) + net[1].shift
    torch.testing.assert_close(net(x), expected)
    with pytest.raises(ValueError, match="params must name"):
        register_tetherable(Scale, params=())


def test_lazy_layers_raise_a_clear_error_until_initialised() -> None:
    net = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.LazyConv1d(2, 3))
    x = torch.randn(2, 3, 8)

    with pytest.raises(ValueError, match="uninitialised lazy layers: 0, 2; run one forward pass"):
        tether(net)

    net(x)
    tether(net)
    assert list(tethered_layers(net)) == ["0", "2"]


def test_tied_weights_share_one_tether_and_stay_tied() -> None:
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(11, 6)
            self.body = nn.Linear(6, 6)
            self.head = nn.Linear(6, 11, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids: Tensor) -> Tensor:
            out: Tensor = self.head(torch.tanh(self.body(self.embed(ids))))
            return out

    torch.manual_seed(0)
    model = tether(TiedLM(), "importance", importance_every=1)

    assert list(tethered_layers(model)) == ["embed", "body"]
    assert original(model.embed) is original(model.head)
    assert (
        cast(Any, model.embed).parametrizations.weight[0]
        is cast(Any, model.head).parametrizations.weight[0]
    )
    torch.testing.assert_close(model.head.weight, model.embed.weight, rtol=0, atol=0)
    assert layer_table(model)[0] == {"name": "embed", "shape": [11, 6], "dtype": "float32"}
    coverage = tether_coverage(model)
    assert (coverage.layers, coverage.tethered, coverage.total) == (2, 66 + 36, 66 + 36 + 6)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    assert update_importance(model) == ["embed", "body"]
    set_tether_(model.head, torch.full((11, 6), 0.5))
    torch.testing.assert_close(model.embed.weight, original(model.embed) * 0.5)
    plain = untether(model)
    assert plain.head.weight is plain.embed.weight
    torch.testing.assert_close(plain.embed.weight, model.embed.weight)


def test_tying_an_unregistered_holder_keeps_the_tie() -> None:
    holder = Scale(4)
    net = nn.Sequential(nn.Linear(4, 4), holder)
    holder.gain = net[0].bias  # a bias shared with a custom module
    tether(net, layers=["0.bias"])
    assert list(tethered_layers(net)) == ["0.bias"]
    torch.testing.assert_close(holder.gain, net[0].bias, rtol=0, atol=0)


def _weight_normed() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 8)), nn.ReLU(), nn.Linear(8, 2))


def test_weight_norm_layers_tether_on_top_and_importance_runs() -> None:
    net = _weight_normed()
    x = torch.randn(6, 4)
    tether(net, "importance", importance_every=2)
    w = pre_tether_weight(net[0])
    torch.testing.assert_close(net[0].weight, w * get_tether(net[0]))

    for _ in range(2):
        net.zero_grad()
        net(x).pow(2).sum().backward()
        refreshed = update_importance(net)

    assert refreshed == ["0", "2"]
    # The score of the weight-normed layer: |W ⊙ ∂L/∂W| for W = weight_norm(g, v).
    net.zero_grad()
    w = pre_tether_weight(net[0]).detach().requires_grad_(True)
    out = F.linear(
        torch.relu(F.linear(x, w * get_tether(net[0]), net[0].bias)), net[2].weight, net[2].bias
    )
    out.pow(2).sum().backward()
    tp = tethered_layers(net)["0"]
    ema_before = tp.ema.clone()
    net(x).pow(2).sum().backward()
    update_importance(net)
    assert w.grad is not None
    expected = 0.9 * ema_before + 0.1 * (w.detach() * w.grad).abs()
    torch.testing.assert_close(tp.ema, expected)


def test_weight_norm_layers_feed_the_diagnostics(tmp_path: Any) -> None:
    net = tether(_weight_normed(), "static")
    assert set(weight_layers(net)) == {"0", "2"}
    diag = Diagnostics(net, every=2, out_dir=tmp_path, updates_per_epoch=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(1, 5):
        opt.zero_grad()
        net(torch.randn(4, 4)).pow(2).mean().backward()
        opt.step()
        diag.step(step, 0, 1.0)
    record = diag.close(5, 0)
    assert record is None or record["event"] == "diagnostics"
    assert (tmp_path / "diagnostics.jsonl").exists()
    torch.testing.assert_close(raw_weight(*weight_layers(net)["0"]), pre_tether_weight(net[0]))


def test_legacy_weight_norm_is_skipped_with_its_reason_or_refused_by_name() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the legacy API
        net = nn.Sequential(nn.utils.weight_norm(nn.Linear(3, 4)), nn.Linear(4, 2))

    with pytest.raises(ValueError, match="legacy WeightNorm hook"):
        tether(net, layers=["0"])
    tether(net)

    assert list(tethered_layers(net)) == ["1"]
    (skipped,) = tether_coverage(net).skipped
    assert skipped.type == "Linear" and "legacy WeightNorm" in skipped.reason
    net(torch.randn(2, 3)).sum().backward()
    assert update_importance(net) == []


def test_load_plain_state_dict_and_untether_cover_the_new_kinds() -> None:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.ModuleDict(
            {"lstm": nn.LSTM(3, 4), "attn": nn.MultiheadAttention(4, 2), "emb": nn.Embedding(5, 4)}
        )

    plain_state = make().state_dict()
    model = tether(make(), "learned", seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    x = torch.randn(5, 2, 3)

    load_plain_state_dict(model, plain_state)

    torch.testing.assert_close(
        original(cast(Any, model)["lstm"], "weight_hh_l0"), plain_state["lstm.weight_hh_l0"]
    )
    exported = untether(model)
    assert not any("parametrizations" in key for key in exported.state_dict())
    lstm, exported_lstm = cast(Any, model)["lstm"], cast(Any, exported)["lstm"]
    torch.testing.assert_close(exported_lstm(x)[0], lstm(x)[0])
    torch.testing.assert_close(exported_lstm.weight_ih_l0, lstm.weight_ih_l0)


def test_tether_logs_its_coverage(caplog: pytest.LogCaptureFixture) -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with caplog.at_level(logging.INFO, logger="tetherfed.tethers"):
        tether(net)

    coverage = tether_coverage(net)
    assert isinstance(coverage, Coverage)
    assert coverage.as_dict() == {
        "layers": 2,
        "tethered": 24,
        "total": 24 + 6 + 8,
        "untethered_in_tethered": 6,
        "skipped": [
            {"type": "LayerNorm", "modules": 1, "parameters": 8, "reason": "no registered weight"}
        ],
        "share": round(24 / 38, 6),
    }
    assert "tethered 2 layers, 24 of 38 parameters (63.2%)" in caplog.text
    assert "LayerNorm x1 (8: no registered weight)" in caplog.text


def test_learned_logits_are_not_counted_as_model_parameters() -> None:
    net = tether(nn.Linear(3, 3), "learned")
    assert tether_coverage(net).total == 12


class BasicBlock(nn.Module):
    """A ResNet basic block (torchvision's shape, built here: conv-bn-relu-conv-bn + skip)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


def test_tiny_resnet_tethers_convs_and_head_not_batch_norm() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        BasicBlock(8),
        BasicBlock(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )

    tether(net)

    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    assert list(tethered_layers(net)) == [*convs, "7"]
    coverage = tether_coverage(net)
    assert coverage.tethered == 3 * 8 * 9 + 4 * 8 * 8 * 9 + 80
    assert [(s.type, s.modules, s.parameters) for s in coverage.skipped] == [
        ("BatchNorm2d", 5, 5 * 16)
    ]
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_tiny_gpt2_tethers_every_conv1d_and_keeps_the_tie() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=128,
        n_head=2,
        vocab_size=256,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()  # random init, nothing downloaded
    ids = torch.randint(0, 256, (2, 8))
    before = model(ids).logits
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]

    tether(model)

    names = list(tethered_layers(model))
    assert len(conv1d) == 8 and set(conv1d) <= set(names)
    assert names[:2] == ["transformer.wte", "transformer.wpe"]  # lm_head shares wte's tether
    wte, head = cast(Any, model).transformer.wte, cast(Any, model).lm_head
    assert original(head) is original(wte)
    torch.testing.assert_close(head.weight, wte.weight, rtol=0, atol=0)
    coverage = tether_coverage(model)
    assert coverage.total == sum(p.numel() for p in model.parameters())
    assert [(s.type, s.modules) for s in coverage.skipped] == [("LayerNorm", 5)]
    assert coverage.share > 0.99
    after = model(ids).logits
    assert not torch.allclose(after, before)
    for tp in tethered_layers(model).values():
        tp.set_(torch.ones_like(tp.current()))
    torch.testing.assert_close(model(ids).logits, before)
