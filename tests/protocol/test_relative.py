"""Relative rules: thresholds on a partner's standing in the publisher's row (z-score, rank)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tether_protocol.messages import (
    FederationCreate,
    MergeGate,
    Policy,
    PolicyPatch,
    SnapshotMeta,
    policy_preset,
)
from tether_protocol.policy import (
    FederationState,
    PeerState,
    decide,
    layers_in_scope,
    relative_scores,
)


def state(row: dict[str, float], **kw: object) -> FederationState:
    peers = {p: PeerState(worker_id=p, step=100, version=2) for p in row}
    return FederationState(layer_order=["fc1"], peers=peers, scores={"fc1": row}, **kw)  # type: ignore[arg-type]


SNAP = SnapshotMeta(worker_id="me", step=100, epoch=0, loss=1.0, grad_norm=1.0)
# Raw scores all high: an absolute merge threshold of 0.5 would merge with anyone.
HIGH = {"same": 0.97, "x1": 0.90, "x2": 0.89, "x3": 0.91}


def test_rank_gives_one_to_the_best_zero_to_the_worst_and_splits_ties() -> None:
    assert relative_scores({"a": 0.9, "b": 0.5, "c": 0.1}, "rank") == {"a": 1.0, "b": 0.5, "c": 0.0}
    assert relative_scores({"a": 0.9, "b": 0.9, "c": 0.1}, "rank") == {
        "a": 0.75,
        "b": 0.75,
        "c": 0.0,
    }
    assert relative_scores({"a": 0.3}, "rank") == {"a": 0.5}  # nothing to compare it with
    # Float noise is not a ranking: a layer every worker computes alike ties everyone.
    noisy = {"a": 1.0, "b": 0.99999997, "c": 0.99999994}
    assert relative_scores(noisy, "rank") == {"a": 0.5, "b": 0.5, "c": 0.5}
    assert relative_scores(noisy, "zscore") == {"a": 0.0, "b": 0.0, "c": 0.0}


def test_zscore_is_standardised_over_the_row() -> None:
    z = relative_scores({"a": 3.0, "b": 1.0, "c": 2.0}, "zscore")
    assert z["c"] == pytest.approx(0.0)
    assert z["a"] == pytest.approx(1.224744871, rel=1e-9)
    assert z["b"] == pytest.approx(-1.224744871, rel=1e-9)
    assert relative_scores({"a": 0.5, "b": 0.5}, "zscore") == {"a": 0.0, "b": 0.0}


def test_rank_rule_merges_with_the_closest_and_drifts_from_the_farthest() -> None:
    policy = Policy(
        trigger="every_publish",
        relative="rank",
        merge_threshold=0.9,
        drift_threshold=0.1,
        cooldown_steps=0,
    )
    result = decide(policy, state(HIGH), SNAP)
    assert [(d.action, d.partner_id) for d in result.decisions] == [
        ("merge", "same"),
        ("drift", "x2"),
    ]
    assert result.decisions[0].score == pytest.approx(0.97)  # the raw score travels on
    assert "rank 1" in result.decisions[0].reason
    absolute = Policy(trigger="every_publish", cooldown_steps=0, pairing="all")
    assert len(decide(absolute, state(HIGH), SNAP).decisions) == 4  # why relative rules exist


def test_zscore_rule_separates_one_close_partner_from_a_high_crowd() -> None:
    policy = Policy(
        trigger="every_publish",
        relative="zscore",
        merge_threshold=1.0,
        drift_threshold=None,
        pairing="all",
        cooldown_steps=0,
    )
    merges = [d.partner_id for d in decide(policy, state(HIGH), SNAP).decisions]
    assert merges == ["same"]


def test_a_cooling_partner_still_shapes_the_row_but_is_not_chosen() -> None:
    policy = Policy(
        trigger="every_publish",
        relative="rank",
        merge_threshold=0.9,
        drift_threshold=None,
        cooldown_steps=50,
    )
    cooling = state(HIGH, cooldowns={("fc1", "same"): 90})
    result = decide(policy, cooling, SNAP)
    # x3 ranks 2 of 4 (2/3): not close enough to merge just because "same" is cooling down.
    assert [(d.action, d.partner_id) for d in result.decisions] == [("hold", "x3")]


def test_min_merge_score_keeps_a_raw_floor_under_a_relative_rule() -> None:
    policy = Policy(
        trigger="every_publish",
        relative="rank",
        merge_threshold=0.9,
        drift_threshold=None,
        cooldown_steps=0,
        min_merge_score=0.98,
    )
    result = decide(policy, state(HIGH), SNAP)
    assert [d.action for d in result.decisions] == ["hold"]
    assert "min_merge_score" in result.decisions[0].reason


def test_policy_validates_relative_thresholds_and_the_gate() -> None:
    with pytest.raises(ValidationError, match=r"outside \[0, 1\], the range of rank"):
        Policy(relative="rank", merge_threshold=1.5, drift_threshold=0.1)
    assert (
        Policy(relative="zscore", merge_threshold=1.5, drift_threshold=-1.5).merge_threshold == 1.5
    )
    with pytest.raises(ValidationError, match="only with a relative rule"):
        Policy(min_merge_score=0.2)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        Policy(gate={"probe_loss_rise": -0.1})  # type: ignore[arg-type]
    gated = Policy.model_validate({"gate": {"probe_loss_rise": 0.01}})
    assert gated.gate == MergeGate(probe_loss_rise=0.01)
    patched = PolicyPatch(relative="zscore", merge_threshold=2.0).apply(Policy())
    assert (patched.relative, patched.merge_threshold) == ("zscore", 2.0)


def test_warmup_starts_no_round_and_last_scopes_the_last_layer() -> None:
    policy = Policy(trigger="every_publish", warmup_steps=150, cooldown_steps=0)
    early = decide(policy, state(HIGH), SNAP)
    assert not early.triggered and "warm-up" in early.trigger_reason
    late = SnapshotMeta(worker_id="me", step=150, epoch=0)
    assert decide(policy, state(HIGH), late).triggered
    assert layers_in_scope(Policy(layers="last"), ["fc1", "fc2", "out"]) == ["out"]
    assert layers_in_scope(Policy(layers="last"), []) == []


def test_the_cka_preset_is_the_measured_configuration() -> None:
    cka = policy_preset("cka")
    assert (cka.measure, cka.relative, cka.layers, cka.pairing) == ("cka", "rank", "last", "best")
    assert cka.max_staleness_steps == 200  # decisions arrive 50–80 steps late on a fast worker
    assert cka.gate == MergeGate(probe_loss_rise=0.01) and cka.warmup_steps == 100
    assert FederationCreate(name="f", policy="cka").resolved_policy() == cka
