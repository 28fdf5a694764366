"""`Policy.merge_scope` on the worker: which tensors a layer carries (`layer_parts`), how a
merge or drift moves them (`Federation._apply`), and the merge gate's exact rollback.

The Federation here never reaches a coordinator (every request answers 503): the tests set its
policy and call the apply path the training thread runs, with real torch models."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from torch import Tensor, nn

from tether_protocol.messages import Decision, MergeGate, Policy, SnapshotRef
from tetherfed import Federation
from tetherfed.federation._federation import StepReport
from tetherfed.tethers import (
    INIT_DIGEST_KEY,
    init_digest,
    layer_parts,
    tether,
    tethered_layers,
)

SCOPES = ("tethers", "weights", "model")


class SmallCNN(nn.Module):
    """A CNN with BatchNorm, an untethered embedding and a norm before the first tethered
    layer: every kind of tensor `model` scope must carry."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.LayerNorm(6)  # before the first tethered layer: carried by conv
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.emb = nn.Embedding(5, 6)  # untethered
        self.fc = nn.Linear(6, 3)
        self.head = nn.Linear(3, 2, bias=False)
        self.register_buffer("scale", torch.tensor(2.0))  # a root buffer, before every layer

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        h = self.bn(self.conv(x)).mean(dim=(2, 3))
        return self.head(self.fc(self.pre(torch.cat([h, h[:, :2]], 1) + self.emb(ids))))


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallCNN()
    with torch.no_grad():  # running statistics that differ between two models
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.num_batches_tracked.fill_(seed + 3)
    # weight_norm on fc: its weight is two originals (g, v) under the tether
    torch.nn.utils.parametrizations.weight_norm(model.fc)
    return tether(model, "static", layers=["conv", "fc", "head"], seed=seed)


def float_state(model: nn.Module) -> dict[int, Tensor]:
    """Every floating-point parameter and buffer, by identity (tied tensors once)."""
    out = {id(p): p for p in model.parameters()}
    out |= {id(b): b for b in model.buffers() if b.is_floating_point()}
    return out


def tether_state(model: nn.Module) -> set[int]:
    return {
        id(t) for tp in tethered_layers(model).values() for t in (*tp.parameters(), *tp.buffers())
    }


def test_model_scope_carries_every_float_tensor_exactly_once() -> None:
    model = cnn(0)
    parts = layer_parts(model, "model")
    carried = [id(part.tensor()) for found in parts.values() for part in found]
    assert len(carried) == len(set(carried)), "a tensor is carried twice"
    expected = set(float_state(model)) - tether_state(model)
    assert set(carried) == expected
    assert id(model.bn.num_batches_tracked) not in carried  # integer buffers stay
    names = {layer: [p.name for p in found] for layer, found in parts.items()}
    # the nearest tethered layer before each tensor (the first layer for those before it)
    assert names["conv"] == [
        "conv@weight",
        "conv@bias",
        "conv@model:bn.weight",
        "conv@model:bn.bias",
        "conv@model:bn.running_mean",
        "conv@model:bn.running_var",
        "conv@model:emb.weight",
        "conv@model:scale",
        "conv@model:pre.weight",
        "conv@model:pre.bias",
    ]
    assert names["fc"] == ["fc@weight:original0", "fc@weight:original1", "fc@bias"]
    assert names["head"] == ["head@weight"]


def test_weights_scope_is_the_layers_weight_and_bias_and_tethers_scope_nothing() -> None:
    model = cnn(0)
    weights = {k: [p.name for p in v] for k, v in layer_parts(model, "weights").items()}
    assert weights == {
        "conv": ["conv@weight", "conv@bias"],
        "fc": ["fc@weight:original0", "fc@weight:original1", "fc@bias"],
        "head": ["head@weight"],
    }
    conv = layer_parts(model, "weights")["conv"][0]
    assert conv.tensor() is model.conv.parametrizations.weight.original  # the raw W, not W ⊙ T
    assert layer_parts(model, "tethers") == {"conv": [], "fc": [], "head": []}


def test_init_digest_fingerprints_the_initial_weights_not_the_tethers() -> None:
    a, same = cnn(0), cnn(0)
    tethered_layers(same)["conv"].set_(torch.zeros(4, 3, 3, 3))  # tethers do not count
    assert init_digest(a) == init_digest(same) and len(init_digest(a)) == 16
    assert init_digest(a) != init_digest(cnn(1))


# -- the apply path --------------------------------------------------------------------------


@pytest.fixture
def fed() -> Iterator[Federation]:
    model = cnn(0)
    offline = httpx.MockTransport(lambda request: httpx.Response(503, json={"detail": "off"}))
    federation = Federation("http://coordinator.invalid", "f", model, transport=offline)
    federation._test_model = model  # type: ignore[attr-defined]
    try:
        yield federation
    finally:
        federation.close(leave=False, flush_timeout_s=0.0)


def model_of(fed: Federation) -> nn.Module:
    return fed._test_model  # type: ignore[attr-defined,no-any-return]


def set_policy(fed: Federation, **fields: Any) -> Policy:
    policy = Policy(**fields)
    fed._session.policy = policy
    return policy


def decision(layer: str, operator: str, params: dict[str, float] | None = None) -> Decision:
    action = "merge" if operator in ("average", "weighted") else "drift"
    return Decision(
        id=1,
        federation="f",
        layer=layer,
        worker_id="me",
        partner_id="them",
        action=action,
        score=0.9,
        measure="pearson",
        merge_threshold=0.5,
        drift_threshold=-0.5,
        operator=operator,  # type: ignore[arg-type]
        params=params or {},
        partner_snapshot=SnapshotRef(worker_id="them", version=1, step=1),
        own_snapshot=SnapshotRef(worker_id="me", version=1, step=1),
        epoch=0,
        reason="test",
    )


def partner_of(layer: str, scope: str, seed: int = 1) -> tuple[Tensor, dict[str, Tensor], Any]:
    """The partner's tether and parts of `layer` (as a Ready carries them: float32 copies)."""
    other = cnn(seed)
    tether_value = tethered_layers(other)[layer].current().detach().clone()
    parts = {
        p.name: p.tensor().detach().float().clone()
        for p in layer_parts(other, scope)[layer]  # type: ignore[arg-type]
    }
    return tether_value, parts, other


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


EXPECTED = {
    "average": lambda own, other: own + (other - own) * 0.5,
    "weighted": lambda own, other: own + (other - own) * 0.25,
    "repel": lambda own, other: own + (own - other) * 0.5,
}
PARAMS = {"average": {}, "weighted": {"alpha": 0.25}, "repel": {"beta": 0.5}, "decouple": {}}


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("operator", ["average", "weighted", "repel", "decouple"])
def test_an_operator_moves_the_tether_and_exactly_the_parts_of_its_scope(
    fed: Federation, scope: str, operator: str
) -> None:
    model = model_of(fed)
    set_policy(fed, merge_scope=scope)
    partner, parts, _ = partner_of("conv", scope)
    moved = {p.name: p for p in layer_parts(model, scope)["conv"]}  # type: ignore[arg-type]
    own_tether = tethered_layers(model)["conv"].current().detach().clone()
    own_parts = {name: p.tensor().detach().clone() for name, p in moved.items()}
    before = snapshot(model)
    carried = {id(p.tensor()) for p in moved.values()} | {id(tethered_layers(model)["conv"].tether)}
    # Execute
    problem = fed._apply(decision("conv", operator, PARAMS[operator]), partner, parts)
    # Assert
    assert problem is None
    after = model.state_dict()
    tether_now = tethered_layers(model)["conv"].current()
    if operator == "decouple":
        for key, value in before.items():
            assert torch.equal(after[key], value), key
        return
    expected_tether = EXPECTED[operator](own_tether, partner)
    if operator == "repel":
        expected_tether = expected_tether.clamp(0, 1)  # tethers stay in [0, 1]
    torch.testing.assert_close(tether_now, expected_tether, rtol=0, atol=1e-6)
    for name, part in moved.items():
        want = EXPECTED[operator](own_parts[name], parts[name])  # weights: never clipped
        torch.testing.assert_close(part.tensor().detach(), want, rtol=1e-6, atol=1e-6)
    if operator == "repel" and scope != "tethers":
        assert any(
            bool((p.tensor() < 0).any() or (p.tensor() > 1).any()) for p in moved.values()
        ), "repel clipped a weight to [0, 1]"
    # every tensor the scope does not move is bitwise unchanged
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in carried:
            assert torch.equal(after[key], before[key]), f"{key} moved under scope {scope}"


def test_model_scope_when_every_layer_merges_averages_the_whole_model_once(
    fed: Federation,
) -> None:
    model = model_of(fed)
    set_policy(fed, merge_scope="model")
    other = cnn(1)
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    theirs = other.state_dict()
    for layer in ("conv", "fc", "head"):
        tether_value = tethered_layers(other)[layer].current().detach()
        parts = {p.name: p.tensor().detach().float() for p in layer_parts(other, "model")[layer]}
        assert fed._apply(decision(layer, "average"), tether_value, parts) is None
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            assert torch.equal(value, own[key]), key  # num_batches_tracked stays
            continue
        torch.testing.assert_close(value, (own[key] + theirs[key]) / 2, rtol=1e-6, atol=1e-6)


def test_a_missing_or_misshapen_partner_part_is_refused_and_nothing_changes(
    fed: Federation,
) -> None:
    model = model_of(fed)
    set_policy(fed, merge_scope="weights")
    partner, parts, _ = partner_of("conv", "weights")
    before = snapshot(model)
    missing = {k: v for k, v in parts.items() if k != "conv@bias"}
    problem = fed._apply(decision("conv", "average"), partner, missing)
    assert problem is not None and "merge_scope weights: partner's conv@bias is missing" in problem
    wrong = parts | {"conv@weight": torch.zeros(4, 3, 3, 2)}
    problem = fed._apply(decision("conv", "average"), partner, wrong)
    assert (
        problem
        == "merge_scope weights: partner's conv@weight has shape [4, 3, 3, 2], ours [4, 3, 3, 3]"
    )
    nonfinite = parts | {"conv@bias": torch.full((4,), float("inf"))}
    problem = fed._apply(decision("conv", "average"), partner, nonfinite)
    assert problem is not None and "conv@bias would hold NaN or Inf" in problem
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert fed.generations["conv"] == 0


class StubProbe:
    """The probe losses the gate reads: before, then after the merge."""

    def __init__(self, *losses: float) -> None:
        self.losses = list(losses)

    def loss(self) -> float:
        return self.losses.pop(0)


@pytest.mark.parametrize("scope", SCOPES)
def test_the_gate_rolls_back_tether_and_parts_bitwise(fed: Federation, scope: str) -> None:
    model = model_of(fed)
    set_policy(fed, merge_scope=scope, gate=MergeGate(probe_loss_rise=0.01))
    fed._probe = StubProbe(1.0, 2.0)  # type: ignore[assignment]  # the merge doubles the loss
    partner, parts, _ = partner_of("conv", scope)
    before = snapshot(model)
    # Execute
    report = StepReport(step=1)
    ack = fed._apply_gated(decision("conv", "average"), partner, report, parts)
    # Assert: rejected, every tensor bitwise as before (tether, weights, BN statistics...)
    assert (
        not isinstance(ack, str) and ack.outcome == "rejected" and "merge gate" in str(ack.reason)
    )
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} not restored exactly under {scope}"
    assert fed.generations["conv"] == 0
    # and a merge the gate keeps stays applied
    fed._probe = StubProbe(1.0, 1.0)  # type: ignore[assignment]
    ack = fed._apply_gated(decision("conv", "average"), partner, report, parts)
    assert not isinstance(ack, str) and ack.outcome == "applied"
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and fed.generations["conv"] == 1


def test_the_worker_registers_its_init_digest(fed: Federation) -> None:
    assert fed._session.meta[INIT_DIGEST_KEY] == init_digest(cnn(0)) == fed.init_digest
    assert fed.state_dict()[INIT_DIGEST_KEY] == fed.init_digest


def test_snapshots_carry_the_parts_of_the_scope_right_after_each_tether(fed: Federation) -> None:
    set_policy(fed, merge_scope="weights")
    index = 0
    parts = fed._copy_parts(index, "weights", ["conv", "fc", "head"])
    assert {k: list(v) for k, v in parts.items()} == {
        "conv": ["conv@weight", "conv@bias"],
        "fc": ["fc@weight:original0", "fc@weight:original1", "fc@bias"],
        "head": ["head@weight"],
    }
    model = model_of(fed)
    assert torch.equal(parts["conv"]["conv@bias"], model.conv.bias.detach())
    assert all(b.dtype == torch.float32 for v in parts.values() for b in v.values())
    assert fed._copy_parts(index, "tethers", ["conv", "fc", "head"]) == {}
    assert list(fed._copy_parts(index, "weights", ["fc"])) == ["fc"]  # layers out of scope: none
