"""The decision policy: a pure function from (policy, federation state, new snapshot) to decisions.

A publish from worker w may trigger a round (DESIGN §3). For each layer in scope the round looks at
w's score against every other worker and decides, for w's own tether:

- merge with the most compatible eligible partner scoring above `merge_threshold` (pairing `best`),
  or with every such partner (pairing `all`), while w has merges left this epoch on that layer;
- drift from the least compatible eligible partner scoring below `drift_threshold` (or from every
  such partner under `all`);
- otherwise hold (recorded, with the best score and why nothing happened).

A partner is eligible when the pair is comparable on the layer (finite score), its snapshot is
within `max_staleness_steps` of w's step, and the pair is out of cooldown on that layer. Decisions
only change w's tether: the partner's changes come from its own rounds.

The merge budget (`max_merges_per_epoch`) is counted per worker and layer: with one layer in scope
(the prototype) that is exactly the prototype's per-epoch cap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .messages import Action, DriftOperator, MergeOperator, Policy, SnapshotMeta, SnapshotRef


@dataclass(frozen=True)
class PeerState:
    """What the coordinator knows of another worker's latest snapshot."""

    worker_id: str
    step: int
    version: int


@dataclass(frozen=True)
class FederationState:
    """Everything the policy reads, gathered by the caller before a round.

    scores: layer → partner id → score of the publisher against that partner (NaN: not comparable).
    previous_loss: the publisher's loss at its previous publish (None on its first).
    merges: layer → merges the publisher already received this epoch.
    cooldowns: (layer, partner) → publisher step of the pair's last merge or drift.
    """

    layer_order: Sequence[str]
    peers: Mapping[str, PeerState]
    scores: Mapping[str, Mapping[str, float]]
    previous_loss: float | None = None
    merges: Mapping[str, int] = field(default_factory=dict)
    cooldowns: Mapping[tuple[str, str], int] = field(default_factory=dict)


@dataclass(frozen=True)
class DecisionDraft:
    """A decision before the coordinator gives it an id and a timestamp."""

    layer: str
    worker_id: str
    partner_id: str | None
    action: Action
    score: float | None
    operator: MergeOperator | DriftOperator | None
    params: dict[str, float]
    partner_snapshot: SnapshotRef | None
    reason: str


@dataclass(frozen=True)
class Round:
    """A round's outcome: decisions, and the state changes to write atomically with them."""

    triggered: bool
    trigger_reason: str
    decisions: list[DecisionDraft] = field(default_factory=list)
    merges: dict[str, int] = field(default_factory=dict)  # layer → merges added
    cooldowns: dict[tuple[str, str], int] = field(default_factory=dict)  # (layer, partner) → step


def plateau(
    policy: Policy, loss: float | None, previous_loss: float | None, grad_norm: float | None
) -> bool:
    """The prototype's trigger: |Δloss| < ε_loss or grad-norm < ε_grad."""
    if (
        loss is not None
        and previous_loss is not None
        and abs(loss - previous_loss) < policy.loss_epsilon
    ):
        return True
    return grad_norm is not None and grad_norm < policy.grad_epsilon


def trigger(
    policy: Policy, snapshot: SnapshotMeta, previous_loss: float | None
) -> tuple[bool, str]:
    """Whether this publish starts a round, and why."""
    if policy.trigger == "every_publish":
        return True, "every publish"
    if snapshot.plateau:
        return True, "worker reported a plateau"
    if plateau(policy, snapshot.loss, previous_loss, snapshot.grad_norm):
        return True, "plateau: loss change or gradient norm below threshold"
    return False, "no plateau"


def layers_in_scope(policy: Policy, layer_order: Sequence[str]) -> list[str]:
    """The publisher's layers the policy looks at ('middle' is the middle of the layer table)."""
    if policy.layers == "all":
        return list(layer_order)
    if policy.layers == "middle":
        return [layer_order[len(layer_order) // 2]] if layer_order else []
    wanted = set(policy.layers)
    return [name for name in layer_order if name in wanted]


def decide(policy: Policy, state: FederationState, snapshot: SnapshotMeta) -> Round:
    """Run one policy round for a new snapshot (pure: reads its arguments, returns the outcome)."""
    fired, why = trigger(policy, snapshot, state.previous_loss)
    if not fired:
        return Round(triggered=False, trigger_reason=why)
    result = Round(triggered=True, trigger_reason=why)
    for layer in layers_in_scope(policy, state.layer_order):
        _decide_layer(policy, state, snapshot, layer, result)
    return result


def _eligible(
    policy: Policy, state: FederationState, snapshot: SnapshotMeta, layer: str
) -> dict[str, float]:
    out: dict[str, float] = {}
    for partner, score in state.scores.get(layer, {}).items():
        peer = state.peers.get(partner)
        if partner == snapshot.worker_id or peer is None or math.isnan(score):
            continue
        stale = (
            policy.max_staleness_steps is not None
            and abs(peer.step - snapshot.step) > policy.max_staleness_steps
        )
        last = state.cooldowns.get((layer, partner))
        cooling = last is not None and snapshot.step - last < policy.cooldown_steps
        if not stale and not cooling:
            out[partner] = score
    return out


def _decide_layer(
    policy: Policy, state: FederationState, snapshot: SnapshotMeta, layer: str, result: Round
) -> None:
    scores = _eligible(policy, state, snapshot, layer)
    if not scores:
        return
    ranked = sorted(scores, key=lambda p: (-scores[p], p))
    merges = _merges(policy, state, layer, ranked, scores)
    drifts = _drifts(policy, layer, ranked, scores)
    for partner, action in [*merges, *drifts]:
        result.decisions.append(
            _draft(policy, state, snapshot, layer, partner, action, scores[partner])
        )
        result.cooldowns[(layer, partner)] = snapshot.step
    if merges:
        result.merges[layer] = len(merges)
    if not merges and not drifts:
        result.decisions.append(_hold(policy, state, snapshot, layer, ranked[0], scores[ranked[0]]))


def _merges(
    policy: Policy,
    state: FederationState,
    layer: str,
    ranked: list[str],
    scores: Mapping[str, float],
) -> list[tuple[str, Action]]:
    above = [p for p in ranked if scores[p] > policy.merge_threshold]
    budget = max(policy.max_merges_per_epoch - state.merges.get(layer, 0), 0)
    if policy.pairing == "best":
        above = above[:1]
    return [(p, "merge") for p in above[:budget]]


def _drifts(
    policy: Policy, layer: str, ranked: list[str], scores: Mapping[str, float]
) -> list[tuple[str, Action]]:
    if policy.drift_threshold is None:
        return []
    below = [p for p in reversed(ranked) if scores[p] < policy.drift_threshold]
    if policy.pairing == "best":
        below = below[:1]
    return [(p, "drift") for p in below]


def _draft(
    policy: Policy,
    state: FederationState,
    snapshot: SnapshotMeta,
    layer: str,
    partner: str,
    action: Action,
    score: float,
) -> DecisionDraft:
    peer = state.peers[partner]
    merge = action == "merge"
    threshold = policy.merge_threshold if merge else policy.drift_threshold
    comparison = ">" if merge else "<"
    return DecisionDraft(
        layer=layer,
        worker_id=snapshot.worker_id,
        partner_id=partner,
        action=action,
        score=score,
        operator=policy.merge_operator if merge else policy.drift_operator,
        params=policy.merge_params() if merge else policy.drift_params(),
        partner_snapshot=SnapshotRef(worker_id=partner, version=peer.version, step=peer.step),
        reason=f"{policy.measure} {score:.4g} {comparison} {threshold:g}",
    )


def _hold(
    policy: Policy,
    state: FederationState,
    snapshot: SnapshotMeta,
    layer: str,
    best: str,
    score: float,
) -> DecisionDraft:
    over_budget = score > policy.merge_threshold
    reason = (
        f"merge limit reached ({policy.max_merges_per_epoch} per epoch)"
        if over_budget
        else f"best {policy.measure} {score:.4g} within thresholds"
    )
    peer = state.peers[best]
    return DecisionDraft(
        layer=layer,
        worker_id=snapshot.worker_id,
        partner_id=best,
        action="hold",
        score=score,
        operator=None,
        params={},
        partner_snapshot=SnapshotRef(worker_id=best, version=peer.version, step=peer.step),
        reason=reason,
    )
