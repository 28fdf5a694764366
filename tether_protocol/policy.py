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

Relative rules (`policy.relative`) compare thresholds not with raw scores but with where a partner
stands in the publisher's row — the comparable partners whose snapshots are fresh (cooling pairs
included: a pair in cooldown still says what "close" means for this worker, it just cannot be
chosen). `zscore`: (s − mean) / std over that row (population std; all 0 when the row has one
partner or no spread). `rank`: (partners scoring below + half those tied) / (row size − 1), so the
best scores 1 and the worst 0 (a lone partner scores ½: there is nothing to compare it with). A
federation whose raw scores all sit high then still separates its closest pairs from the rest;
`min_merge_score` keeps a raw floor.
Scores closer than `TIE_TOLERANCE` (the float32 accumulation error of normalized scores, see
`compat`) are ties, and a row with no wider spread has z-scores of 0: float noise never ranks
partners (under `cka` a layer that sees the probe batch through one linear map of a scalar
input scores 1 against everyone, up to rounding).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

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
    if snapshot.step < policy.warmup_steps:
        return False, f"warm-up: step {snapshot.step} < {policy.warmup_steps}"
    if policy.trigger == "every_publish":
        return True, "every publish"
    if snapshot.plateau:
        return True, "worker reported a plateau"
    if plateau(policy, snapshot.loss, previous_loss, snapshot.grad_norm):
        return True, "plateau: loss change or gradient norm below threshold"
    return False, "no plateau"


def layers_in_scope(policy: Policy, layer_order: Sequence[str]) -> list[str]:
    """The publisher's layers the policy looks at ('middle' is the middle of the layer table,
    'last' its last entry)."""
    if policy.layers == "all":
        return list(layer_order)
    if policy.layers == "middle":
        return [layer_order[len(layer_order) // 2]] if layer_order else []
    if policy.layers == "last":
        return list(layer_order[-1:])
    wanted = set(policy.layers)
    return [name for name in layer_order if name in wanted]


def decide(policy: Policy, state: FederationState, snapshot: SnapshotMeta) -> Round:
    """Run one policy round for a new snapshot (pure: reads its arguments, returns the outcome)."""
    if policy.fedavg_every is not None:
        return fedavg(policy, policy.fedavg_every, state, snapshot)
    fired, why = trigger(policy, snapshot, state.previous_loss)
    if not fired:
        return Round(triggered=False, trigger_reason=why)
    result = Round(triggered=True, trigger_reason=why)
    for layer in layers_in_scope(policy, state.layer_order):
        _decide_layer(policy, state, snapshot, layer, result)
    return result


def _row(
    policy: Policy, state: FederationState, snapshot: SnapshotMeta, layer: str
) -> dict[str, float]:
    """The publisher's comparable partners with fresh snapshots, and their raw scores."""
    out: dict[str, float] = {}
    for partner, score in state.scores.get(layer, {}).items():
        peer = state.peers.get(partner)
        if partner == snapshot.worker_id or peer is None or math.isnan(score):
            continue
        stale = (
            policy.max_staleness_steps is not None
            and abs(peer.step - snapshot.step) > policy.max_staleness_steps
        )
        if not stale:
            out[partner] = score
    return out


TIE_TOLERANCE = 1e-4


def relative_scores(row: Mapping[str, float], rule: str) -> dict[str, float]:
    """Each partner's standing in a publisher's row of raw scores: `none` (the raw score),
    `zscore` or `rank` (see the module docstring for both definitions and for ties)."""
    if rule == "none":
        return dict(row)
    values = list(row.values())
    n = len(values)
    if rule == "zscore":
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
        spread = max(values) - min(values) > TIE_TOLERANCE
        return {p: (s - mean) / std if spread else 0.0 for p, s in row.items()}
    if rule == "rank":
        if n == 1:
            return dict.fromkeys(row, 0.5)
        return {p: _rank(s, values) for p, s in row.items()}
    raise ValueError(f"unknown relative rule {rule!r}; use none, zscore or rank")


def _rank(score: float, values: Sequence[float]) -> float:
    below = sum(v < score - TIE_TOLERANCE for v in values)
    tied = sum(abs(v - score) <= TIE_TOLERANCE for v in values) - 1  # not counting itself
    return (below + 0.5 * tied) / (len(values) - 1)


def _eligible(
    policy: Policy, state: FederationState, snapshot: SnapshotMeta, layer: str
) -> tuple[dict[str, float], dict[str, float]]:
    """(raw scores, scores the thresholds apply to) of the partners that may be chosen now."""
    raw = _row(policy, state, snapshot, layer)
    standing = relative_scores(raw, policy.relative) if raw else {}
    out: dict[str, float] = {}
    for partner in raw:
        last = state.cooldowns.get((layer, partner))
        if last is None or snapshot.step - last >= policy.cooldown_steps:
            out[partner] = standing[partner]
    return {p: raw[p] for p in out}, out


def _decide_layer(
    policy: Policy, state: FederationState, snapshot: SnapshotMeta, layer: str, result: Round
) -> None:
    raw, scores = _eligible(policy, state, snapshot, layer)
    if not scores:
        return
    ranked = sorted(scores, key=lambda p: (-scores[p], -raw[p], p))
    merges = _merges(policy, state, layer, ranked, scores, raw)
    drifts = _drifts(policy, layer, ranked, scores)
    for partner, action in [*merges, *drifts]:
        result.decisions.append(
            _draft(policy, state, snapshot, layer, partner, action, raw[partner], scores[partner])
        )
        result.cooldowns[(layer, partner)] = snapshot.step
    if merges:
        result.merges[layer] = len(merges)
    if not merges and not drifts:
        best = ranked[0]
        result.decisions.append(
            _hold(policy, state, snapshot, layer, best, raw[best], scores[best])
        )


def _compared(policy: Policy, score: float, standing: float) -> str:
    """How a reason names the number a threshold was applied to."""
    if policy.relative == "none":
        return f"{policy.measure} {score:.4g}"
    return f"{policy.measure} {score:.4g}, {policy.relative} {standing:.3g}"


def _merges(
    policy: Policy,
    state: FederationState,
    layer: str,
    ranked: list[str],
    scores: Mapping[str, float],
    raw: Mapping[str, float],
) -> list[tuple[str, Action]]:
    floor = policy.min_merge_score
    above = [
        p
        for p in ranked
        if scores[p] > policy.merge_threshold and (floor is None or raw[p] > floor)
    ]
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
    standing: float,
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
        reason=f"{_compared(policy, score, standing)} {comparison} {threshold:g}",
    )


def _hold(
    policy: Policy,
    state: FederationState,
    snapshot: SnapshotMeta,
    layer: str,
    best: str,
    score: float,
    standing: float,
) -> DecisionDraft:
    floor = policy.min_merge_score
    if standing > policy.merge_threshold and floor is not None and score <= floor:
        reason = f"best {_compared(policy, score, standing)} is not above min_merge_score {floor:g}"
    elif standing > policy.merge_threshold:
        reason = f"merge limit reached ({policy.max_merges_per_epoch} per epoch)"
    else:
        reason = f"best {_compared(policy, score, standing)} within thresholds"
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


def fedavg(policy: Policy, every: int, state: FederationState, snapshot: SnapshotMeta) -> Round:
    """The FedAvg baseline as decisions (McMahan et al. 2017, "Communication-Efficient Learning
    of Deep Networks from Decentralized Data", with equal weights).

    When the publisher's step has crossed a multiple of `every` since its last averaging on a
    layer (the pair cooldowns record it), it gets one `weighted` merge per non-stale peer, the
    k-th with α = 1/(k+1): applied in id order they make Tᵢ the running mean of its own tether
    and the peers' latest, i.e. the federation mean (up to the peers' own progress meanwhile).
    Scores are ignored; they are recorded on the decisions when known.
    """
    result = Round(triggered=False, trigger_reason=f"fedavg: not yet a multiple of {every} steps")
    for layer in layers_in_scope(policy, state.layer_order):
        peers = _fedavg_peers(policy, state, snapshot, layer, every)
        for k, partner in enumerate(peers, start=1):
            score = state.scores.get(layer, {}).get(partner, math.nan)
            draft = _draft(policy, state, snapshot, layer, partner, "merge", score, score)
            result.decisions.append(
                replace(
                    draft,
                    operator="weighted",
                    params={"alpha": 1.0 / (k + 1)},
                    score=None if math.isnan(score) else score,
                    reason=f"fedavg every {every} steps: peer {k} of {len(peers)}",
                )
            )
            result.cooldowns[(layer, partner)] = snapshot.step
        if peers:
            result.merges[layer] = len(peers)
    if result.decisions:
        result = replace(result, triggered=True, trigger_reason=f"fedavg every {every} steps")
    return result


def _fedavg_peers(
    policy: Policy, state: FederationState, snapshot: SnapshotMeta, layer: str, every: int
) -> list[str]:
    """Peers to average with on `layer` now (none unless a multiple of `every` was crossed)."""
    last = max((s for (lay, _), s in state.cooldowns.items() if lay == layer), default=0)
    if snapshot.step // every <= last // every:
        return []
    peers = []
    for partner, peer in sorted(state.peers.items()):
        stale = (
            policy.max_staleness_steps is not None
            and abs(peer.step - snapshot.step) > policy.max_staleness_steps
        )
        if partner != snapshot.worker_id and not stale:
            peers.append(partner)
    return peers
