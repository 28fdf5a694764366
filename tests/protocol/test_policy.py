"""The pure policy: triggers, thresholds, budgets, cooldowns, staleness, pairing, and the seed preset."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether_protocol.compat import pair_score
from tether_protocol.messages import Policy, SnapshotMeta, policy_preset, seed_policy
from tether_protocol.operators import apply_operator
from tether_protocol.policy import FederationState, PeerState, decide, layers_in_scope

LAYERS = ["fc1", "fc2", "out"]


def state(scores: dict[str, dict[str, float]], **kw: object) -> FederationState:
    peers = {p: PeerState(worker_id=p, step=100, version=3) for row in scores.values() for p in row}
    return FederationState(layer_order=LAYERS, peers=peers, scores=scores, **kw)  # type: ignore[arg-type]


def snap(
    step: int = 100, loss: float | None = 1.0, grad: float | None = 1.0, **kw: object
) -> SnapshotMeta:
    return SnapshotMeta(worker_id="me", step=step, epoch=0, loss=loss, grad_norm=grad, **kw)  # type: ignore[arg-type]


EVERY = Policy(trigger="every_publish", cooldown_steps=0)


def test_plateau_trigger_fires_on_small_loss_change_or_small_gradient() -> None:
    policy = Policy()
    scores = {"fc1": {"p": 0.9}}
    assert not decide(policy, state(scores, previous_loss=2.0), snap(loss=1.0, grad=1.0)).triggered
    assert decide(policy, state(scores, previous_loss=1.05), snap(loss=1.0)).triggered
    assert decide(policy, state(scores, previous_loss=None), snap(grad=0.01)).triggered
    assert decide(policy, state(scores, previous_loss=2.0), snap(plateau=True)).triggered


def test_merge_drift_hold_by_thresholds() -> None:
    scores = {"fc1": {"a": 0.9, "b": 0.1, "c": -0.8}}
    result = decide(EVERY, state(scores), snap())
    assert [(d.action, d.partner_id) for d in result.decisions] == [("merge", "a"), ("drift", "c")]
    merge = result.decisions[0]
    assert merge.operator == "average" and merge.partner_snapshot is not None
    assert merge.partner_snapshot.version == 3
    only_hold = decide(EVERY, state({"fc1": {"b": 0.1}}), snap())
    assert [d.action for d in only_hold.decisions] == ["hold"]
    assert "within thresholds" in only_hold.decisions[0].reason


def test_pairing_all_merges_with_every_partner_above_threshold() -> None:
    policy = EVERY.model_copy(update={"pairing": "all"})
    result = decide(policy, state({"fc1": {"a": 0.9, "b": 0.7, "c": 0.2}}), snap())
    assert sorted(d.partner_id for d in result.decisions if d.action == "merge") == ["a", "b"]
    assert result.merges == {"fc1": 2}


def test_best_pairing_picks_the_most_compatible_partner() -> None:
    result = decide(EVERY, state({"fc1": {"a": 0.6, "b": 0.95, "c": 0.7}}), snap())
    assert [d.partner_id for d in result.decisions] == ["b"]


def test_merge_budget_per_epoch() -> None:
    policy = EVERY.model_copy(update={"max_merges_per_epoch": 2})
    spent = decide(policy, state({"fc1": {"a": 0.9}}, merges={"fc1": 2}), snap())
    assert [d.action for d in spent.decisions] == ["hold"]
    assert "merge limit" in spent.decisions[0].reason
    assert spent.merges == {}


def test_cooldown_and_staleness_make_partners_ineligible() -> None:
    policy = EVERY.model_copy(update={"cooldown_steps": 10, "max_staleness_steps": 50})
    cooling = decide(
        policy, state({"fc1": {"a": 0.9}}, cooldowns={("fc1", "a"): 95}), snap(step=100)
    )
    assert cooling.decisions == []
    cooled = decide(
        policy, state({"fc1": {"a": 0.9}}, cooldowns={("fc1", "a"): 90}), snap(step=100)
    )
    assert [d.action for d in cooled.decisions] == ["merge"]
    assert cooled.cooldowns == {("fc1", "a"): 100}
    stale = decide(policy, state({"fc1": {"a": 0.9}}), snap(step=300))
    assert stale.decisions == []


def test_not_comparable_partners_are_skipped() -> None:
    result = decide(EVERY, state({"fc1": {"a": math.nan}}), snap())
    assert result.triggered and result.decisions == []


def test_layer_scope() -> None:
    assert layers_in_scope(Policy(layers="middle"), LAYERS) == ["fc2"]
    assert layers_in_scope(Policy(layers=["out", "nope"]), LAYERS) == ["out"]
    assert layers_in_scope(Policy(), LAYERS) == LAYERS


def test_policy_validation_names_the_problem() -> None:
    with pytest.raises(ValueError, match="drift_threshold"):
        Policy(merge_threshold=0.2, drift_threshold=0.5)
    with pytest.raises(ValueError, match="outside \\[-1, 1\\]"):
        Policy(measure="cosine", merge_threshold=50)
    with pytest.raises(KeyError, match="known: default, seed"):
        policy_preset("fast")
    assert Policy(measure="dot", merge_threshold=50).merge_threshold == 50


def test_seed_preset_matches_the_prototype() -> None:
    policy = seed_policy()
    assert (policy.measure, policy.merge_threshold, policy.drift_threshold) == ("dot", 50.0, None)
    assert (policy.max_merges_per_epoch, policy.loss_epsilon, policy.grad_epsilon) == (5, 0.1, 0.1)
    assert (policy.layers, policy.merge_operator, policy.trigger) == (
        "middle",
        "average",
        "plateau",
    )


# ---------------------------------------------------------------------------------------------
# Replay: the seed preset against the prototype's own loop on the same scripted sequence.
# ---------------------------------------------------------------------------------------------


def prototype_merge_points(
    losses: list[list[float]], grads: list[list[float]], own: np.ndarray, other: np.ndarray
) -> list[tuple[int, int]]:
    """The prototype's loop as its seed describes it: on |Δloss| < 0.1 or grad-norm < 0.1, merge
    the hidden layer's tether with the other model's by averaging when Σ Tᵢ⊙Tⱼ > 50, at most 5
    merges an epoch; the previous loss carries across epochs and starts at infinity."""
    tether = own.astype(np.float32).copy()
    prev_loss, points = math.inf, []
    for epoch, (epoch_losses, epoch_grads) in enumerate(zip(losses, grads, strict=True)):
        merges = 0
        for batch, (loss, grad) in enumerate(zip(epoch_losses, epoch_grads, strict=True)):
            plateau = abs(prev_loss - loss) < 0.1 or grad < 0.1
            if plateau and float(np.sum(tether * other)) > 50 and merges < 5:
                tether = (tether + other) / 2
                points.append((epoch, batch))
                merges += 1
            prev_loss = loss
    return points


def policy_merge_points(
    losses: list[list[float]], grads: list[list[float]], own: np.ndarray, other: np.ndarray
) -> list[tuple[int, int]]:
    policy, tether = seed_policy(), own.astype(np.float32).copy()
    rng = np.random.default_rng(7)
    others = {
        "fc1": rng.random((4, 4), dtype=np.float32),
        "out": rng.random((2, 4), dtype=np.float32),
    }
    previous_loss: float | None = None
    points, step = [], 0
    for epoch, (epoch_losses, epoch_grads) in enumerate(zip(losses, grads, strict=True)):
        merges: dict[str, int] = {}
        for batch, (loss, grad) in enumerate(zip(epoch_losses, epoch_grads, strict=True)):
            scores = {"fc2": {"other": pair_score(tether, other, "dot")}}
            scores |= {name: {"other": pair_score(t, t, "dot")} for name, t in others.items()}
            peers = {"other": PeerState(worker_id="other", step=step, version=1)}
            fed = FederationState(LAYERS, peers, scores, previous_loss=previous_loss, merges=merges)
            meta = SnapshotMeta(worker_id="me", step=step, epoch=epoch, loss=loss, grad_norm=grad)
            result = decide(policy, fed, meta)
            for decision in result.decisions:
                assert decision.layer == "fc2", (
                    "the seed preset touched a layer other than the middle one"
                )
                if decision.action == "merge":
                    apply_operator(decision.operator, decision.params, tether, other, out=tether)  # type: ignore[arg-type]
                    points.append((epoch, batch))
            for layer, n in result.merges.items():
                merges[layer] = merges.get(layer, 0) + n
            previous_loss, step = loss, step + 1
    return points


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    epochs=st.integers(1, 4),
    batches=st.integers(1, 30),
    scale=st.sampled_from([0.02, 0.05, 0.2, 1.0]),
)
def test_seed_preset_replays_the_prototype_merge_points(
    data: st.DataObject, epochs: int, batches: int, scale: float
) -> None:
    steps = st.lists(st.floats(0.0, 3.0), min_size=batches, max_size=batches)
    losses = [data.draw(steps) for _ in range(epochs)]
    grads = [data.draw(steps) for _ in range(epochs)]
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    other = rng.random((64, 64), dtype=np.float32)
    own = (rng.random((64, 64), dtype=np.float32) * scale).astype(np.float32)
    expected = prototype_merge_points(losses, grads, own, other)
    assert policy_merge_points(losses, grads, own, other) == expected


def test_seed_replay_on_a_plateauing_loss_hits_the_epoch_cap() -> None:
    losses = [[2.0 - 0.01 * b for b in range(40)] for _ in range(3)]
    grads = [[1.0] * 40 for _ in range(3)]
    rng = np.random.default_rng(0)
    own, other = rng.random((64, 64), dtype=np.float32), rng.random((64, 64), dtype=np.float32)
    points = policy_merge_points(losses, grads, own, other)
    assert points == prototype_merge_points(losses, grads, own, other)
    assert [sum(1 for e, _ in points if e == epoch) for epoch in range(3)] == [5, 5, 5]
