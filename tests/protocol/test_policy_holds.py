"""a round that gives the worker nothing to apply says why (`Round.hold`), with
a machine-readable code, for every reason the policy knows; a round with a merge or drift has
no hold."""

from __future__ import annotations

import math

import pytest

from tether_protocol.messages import HoldCode, Policy, SnapshotMeta
from tether_protocol.policy import FederationState, PeerState, decide

LAYERS = ["fc1", "fc2"]
EVERY = Policy(trigger="every_publish", cooldown_steps=0, max_staleness_steps=None)


def state(
    scores: dict[str, dict[str, float]], peer_step: int = 100, **kw: object
) -> FederationState:
    peers = {
        p: PeerState(worker_id=p, step=peer_step, version=3) for row in scores.values() for p in row
    }
    return FederationState(layer_order=LAYERS, peers=peers, scores=scores, **kw)  # type: ignore[arg-type]


def snap(step: int = 100, loss: float = 1.0, grad: float = 1.0) -> SnapshotMeta:
    return SnapshotMeta(worker_id="me", step=step, epoch=0, loss=loss, grad_norm=grad)


CASES: list[tuple[str, Policy, FederationState, SnapshotMeta, HoldCode, str]] = [
    (
        "warm-up",
        EVERY.model_copy(update={"warmup_steps": 500}),
        state({"fc1": {"a": 0.9}}),
        snap(step=100),
        "warmup",
        "warm-up: step 100 < 500",
    ),
    (
        "no plateau",
        Policy(),
        state({"fc1": {"a": 0.9}}, previous_loss=5.0),
        snap(),
        "no_plateau",
        "no plateau",
    ),
    (
        "fedavg schedule",
        EVERY.model_copy(update={"fedavg_every": 1000}),
        state({"fc1": {"a": 0.9}}, cooldowns={("fc1", "a"): 100}),
        snap(step=150),
        "schedule",
        "fedavg",
    ),
    (
        "no layer in scope",
        EVERY.model_copy(update={"layers": ["other"]}),
        state({"fc1": {"a": 0.9}}),
        snap(),
        "out_of_scope",
        "policy.layers",
    ),
    ("alone", EVERY, state({}), snap(), "no_partner", "no other active worker"),
    (
        "not comparable",
        EVERY,
        state({"fc1": {"a": math.nan}}),
        snap(),
        "no_partner",
        "comparable snapshot",
    ),
    (
        "stale partners",
        EVERY.model_copy(update={"max_staleness_steps": 10}),
        state({"fc1": {"a": 0.9}}, peer_step=20),
        snap(step=100),
        "stale_partners",
        "more than max_staleness_steps 10",
    ),
    (
        "cooling down",
        EVERY.model_copy(update={"cooldown_steps": 50}),
        state({"fc1": {"a": 0.9}}, cooldowns={("fc1", "a"): 90}),
        snap(step=100),
        "cooldown",
        "cooling down",
    ),
    (
        "between the thresholds",
        EVERY,
        state({"fc1": {"a": 0.1}}),
        snap(),
        "within_thresholds",
        "within thresholds",
    ),
    (
        "merge budget spent",
        EVERY.model_copy(update={"max_merges_per_epoch": 1}),
        state({"fc1": {"a": 0.9}}, merges={"fc1": 1}),
        snap(),
        "merge_limit",
        "merge limit",
    ),
    (
        "under the raw floor",
        EVERY.model_copy(
            update={"relative": "rank", "min_merge_score": 0.5, "merge_threshold": 0.4}
        ),
        state({"fc1": {"a": 0.2}}),
        snap(),
        "min_merge_score",
        "min_merge_score",
    ),
]


@pytest.mark.parametrize(
    ("policy", "fed_state", "snapshot", "code", "says"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_a_round_with_nothing_to_apply_says_why(
    policy: Policy, fed_state: FederationState, snapshot: SnapshotMeta, code: str, says: str
) -> None:
    result = decide(policy, fed_state, snapshot)
    assert not [d for d in result.decisions if d.action != "hold"], result.decisions
    assert result.hold is not None, "a round that decided nothing must say why"
    assert result.hold.code == code, result.hold
    assert says in result.hold.reason, result.hold.reason


def test_a_round_with_a_merge_or_drift_has_no_hold() -> None:
    merge = decide(EVERY, state({"fc1": {"a": 0.9}, "fc2": {"a": 0.1}}), snap())
    assert [d.action for d in merge.decisions] == ["merge", "hold"] and merge.hold is None
    drift = decide(EVERY, state({"fc1": {"a": -0.9}}), snap())
    assert [d.action for d in drift.decisions] == ["drift"] and drift.hold is None


def test_the_hold_names_the_layer_whose_partners_held() -> None:
    result = decide(EVERY, state({"fc1": {"a": 0.1}}), snap())
    assert result.hold is not None and result.hold.layer == "fc1"
    assert result.decisions[0].code == "within_thresholds"
