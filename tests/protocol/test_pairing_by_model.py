"""`Policy.pairing_by = "model"`: a round picks its partners once, by the mean of the layer
scores, and every layer in scope merges with them (pure `decide`)."""

from __future__ import annotations

import math

from tether_protocol.messages import Policy, SnapshotMeta
from tether_protocol.policy import FederationState, PeerState, PeerTable, decide

LAYERS = ["conv", "fc", "out"]
# Per layer, a different partner is best; on the mean, "a" is (0.6, 0.5, 0.7 against b's
# 0.9, 0.1, 0.2 and c's 0.1, 0.8, 0.3).
SCORES = {
    "conv": {"a": 0.6, "b": 0.9, "c": 0.1},
    "fc": {"a": 0.5, "b": 0.1, "c": 0.8},
    "out": {"a": 0.7, "b": 0.2, "c": 0.3},
}


def state(scores: dict[str, dict[str, float]], **kw: object) -> FederationState:
    peers = PeerTable(PeerState(w, step=100, version=2) for w in ("me", "a", "b", "c"))
    return FederationState(layer_order=LAYERS, peers=peers, scores=scores, **kw)  # type: ignore[arg-type]


def snap() -> SnapshotMeta:
    return SnapshotMeta(worker_id="me", step=100, epoch=0, loss=1.0)


def policy(**kw: object) -> Policy:
    fields: dict[str, object] = {"trigger": "every_publish", "merge_threshold": 0.4}
    return Policy(**(fields | {"drift_threshold": None} | kw))  # type: ignore[arg-type]


def test_per_layer_pairing_picks_each_layers_best() -> None:
    result = decide(policy(), state(SCORES), snap())
    assert {d.layer: d.partner_id for d in result.decisions} == {"conv": "b", "fc": "c", "out": "a"}


def test_model_pairing_merges_every_layer_with_the_best_partner_on_the_mean() -> None:
    result = decide(policy(pairing_by="model"), state(SCORES), snap())
    merges = [(d.layer, d.partner_id, d.action) for d in result.decisions]
    assert merges == [("conv", "a", "merge"), ("fc", "a", "merge"), ("out", "a", "merge")]
    assert all(d.reason.startswith("mean over 3 layer(s): ") for d in result.decisions)
    assert result.merges == {"conv": 1, "fc": 1, "out": 1}
    assert set(result.cooldowns) == {("conv", "a"), ("fc", "a"), ("out", "a")}
    assert result.hold is None


def test_a_layer_the_partner_is_not_comparable_on_is_left_out_of_the_mean_and_the_merge() -> None:
    scores = {layer: dict(row) for layer, row in SCORES.items()}
    scores["fc"]["a"] = math.nan  # a: mean of 0.6 and 0.7
    result = decide(policy(pairing_by="model"), state(scores), snap())
    assert [(d.layer, d.partner_id) for d in result.decisions] == [("conv", "a"), ("out", "a")]


def test_a_pair_cooling_on_any_layer_cools_for_the_model_and_a_hold_is_recorded_once() -> None:
    cooling = {("fc", "a"): 95, ("conv", "b"): 95, ("out", "c"): 95}
    result = decide(
        policy(pairing_by="model", cooldown_steps=10), state(SCORES, cooldowns=cooling), snap()
    )
    assert result.decisions == [] and result.hold is not None
    below = decide(policy(pairing_by="model", merge_threshold=0.9), state(SCORES), snap())
    (hold,) = below.decisions
    assert hold.action == "hold" and hold.layer == "conv" and hold.partner_id == "a"
