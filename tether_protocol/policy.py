"""The decision policy: a pure function from (policy, federation state, new snapshot) to decisions.

A publish from worker w may trigger a round (the policy's `trigger`). For each layer in scope the
round looks at w's score against every other worker and decides, for w's own tether:

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

import bisect
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from .messages import (
    Action,
    DriftOperator,
    HoldCode,
    MergeOperator,
    Policy,
    SnapshotMeta,
    SnapshotRef,
)


@dataclass(frozen=True)
class PeerState:
    """What the coordinator knows of another worker's latest snapshot, and the `group` the
    worker registered in (its meta `group`; None without one), which `fedavg_within = "group"`
    averages within."""

    worker_id: str
    step: int
    version: int
    group: str | None = None


FloatArray = npt.NDArray[np.float64]


class PeerTable(Mapping[str, PeerState]):
    """Worker id → PeerState, which also gives the peers' steps as arrays aligned with a list of
    ids (memoised per list object), so one table serves every round of a scoring batch."""

    def __init__(self, peers: Iterable[PeerState]) -> None:
        self._by_id = {p.worker_id: p for p in peers}
        self._aligned: dict[int, tuple[Sequence[str], npt.NDArray[np.bool_], Any]] = {}

    def __getitem__(self, wid: str) -> PeerState:
        return self._by_id[wid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def aligned(self, ids: Sequence[str]) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
        """(whether each id is a peer, its step or 0), in the order of `ids`."""
        hit = self._aligned.get(id(ids))
        if hit is None or hit[0] is not ids:
            peers = [self._by_id.get(w) for w in ids]
            present = np.fromiter((p is not None for p in peers), bool, len(peers))
            steps = np.fromiter((0 if p is None else p.step for p in peers), np.int64, len(peers))
            hit = self._aligned[id(ids)] = (ids, present, steps)
        return hit[1], hit[2]


class ScoreRow(Mapping[str, float]):
    """One publisher's scores on one layer as arrays, as a scorer reads them out of an
    all-pairs matrix: `ids` (sorted, unique; shared by every row of the matrix) and `array`
    (float64, aligned, NaN: not comparable). The mapping leaves out the publisher (`own`)."""

    def __init__(
        self,
        ids: Sequence[str],
        array: FloatArray,
        own: str | None = None,
        index: Mapping[str, int] | None = None,
    ) -> None:
        self.ids, self.array, self.own = ids, array, own
        self._index = index

    def _at(self, wid: str) -> int | None:
        if wid == self.own:
            return None
        if self._index is not None:
            return self._index.get(wid)
        return _position(self.ids, wid)

    def __getitem__(self, wid: str) -> float:
        at = self._at(wid)
        if at is None:
            raise KeyError(wid)
        return float(self.array[at])

    def __iter__(self) -> Iterator[str]:
        return (w for w in self.ids if w != self.own)

    def __len__(self) -> int:
        return len(self.ids) - (self.own is not None and _position(self.ids, self.own) is not None)


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
    code: HoldCode | None = None  # a hold's machine-readable reason (`messages.Hold`)


@dataclass(frozen=True)
class HoldReason:
    """Why a round decided nothing for the publisher to apply (see `messages.Hold`)."""

    code: HoldCode
    reason: str
    layer: str | None = None


@dataclass(frozen=True)
class Round:
    """A round's outcome: decisions, and the state changes to write atomically with them."""

    triggered: bool
    trigger_reason: str
    decisions: list[DecisionDraft] = field(default_factory=list)
    merges: dict[str, int] = field(default_factory=dict)  # layer → merges added
    cooldowns: dict[tuple[str, str], int] = field(default_factory=dict)  # (layer, partner) → step
    hold: HoldReason | None = None  # set when no merge or drift was decided


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
    """Whether this publish starts a round, and why: after warm-up, every publish under
    `every_publish`, each synchronous round's publish (`sync_every`), else a plateau."""
    if snapshot.step < policy.warmup_steps:
        return False, f"warm-up: step {snapshot.step} < {policy.warmup_steps}"
    if policy.trigger == "every_publish":
        return True, "every publish"
    if policy.sync_every is not None and snapshot.step % policy.sync_every == 0:
        return True, f"synchronous round at step {snapshot.step}"
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
        return held(policy, state, snapshot, fedavg(policy, policy.fedavg_every, state, snapshot))
    fired, why = trigger(policy, snapshot, state.previous_loss)
    if not fired:
        return held(policy, state, snapshot, Round(triggered=False, trigger_reason=why))
    result = Round(triggered=True, trigger_reason=why)
    cooling = _cooling(state)
    layers = layers_in_scope(policy, state.layer_order)
    if policy.pairing_by == "model":
        _decide_model(policy, state, snapshot, layers, result, cooling)
        return held(policy, state, snapshot, result)
    for layer in layers:
        _decide_layer(policy, state, snapshot, layer, result, cooling.get(layer, {}))
    return held(policy, state, snapshot, result)


MODEL_ROW = "\x00model"  # the pseudo-layer `_decide_model` decides on (no layer name has NUL)


def _decide_model(
    policy: Policy,
    state: FederationState,
    snapshot: SnapshotMeta,
    layers: Sequence[str],
    result: Round,
    cooling: Mapping[str, Mapping[str, int]],
) -> None:
    """`pairing_by = "model"`: pick the partners once, on the mean of the publisher's layer
    scores over `layers` (a partner's NaN layers left out; all NaN: not comparable), with the
    pair cooling when it cools on any of them and the merge budget of the layer that used most
    of it; then every layer the partner is comparable on gets the merge or drift. A hold is
    recorded once, on the first layer."""
    scored = [layer for layer in layers if state.scores.get(layer)]
    if not scored:
        return
    cool: dict[str, int] = {}
    for layer in scored:
        for partner, step in cooling.get(layer, {}).items():
            cool[partner] = max(step, cool.get(partner, step))
    used = max(state.merges.get(layer, 0) for layer in scored)
    whole = replace(state, scores={MODEL_ROW: _mean_row(state, scored)}, merges={MODEL_ROW: used})
    picked = Round(triggered=True, trigger_reason=result.trigger_reason)
    _decide_layer(policy, whole, snapshot, MODEL_ROW, picked, cool)
    for draft in picked.decisions:
        if draft.action == "hold":
            result.decisions.append(replace(draft, layer=scored[0], reason=_whole(draft, scored)))
            continue
        chosen = draft.partner_id
        if chosen is None:  # merges and drifts always name their partner
            continue
        for layer in scored:
            if math.isnan(state.scores[layer].get(chosen, math.nan)):
                continue
            result.decisions.append(replace(draft, layer=layer, reason=_whole(draft, scored)))
            result.cooldowns[(layer, chosen)] = snapshot.step
            if draft.action == "merge":
                result.merges[layer] = result.merges.get(layer, 0) + 1


def _mean_row(state: FederationState, layers: Sequence[str]) -> dict[str, float]:
    """Partner → the mean of its finite scores over `layers` (NaN when it has none)."""
    mean: dict[str, float] = {}
    for partner in sorted({p for layer in layers for p in state.scores[layer]}):
        values = [state.scores[layer].get(partner, math.nan) for layer in layers]
        finite = [v for v in values if not math.isnan(v)]
        mean[partner] = sum(finite) / len(finite) if finite else math.nan
    return mean


def _whole(draft: DecisionDraft, layers: Sequence[str]) -> str:
    return f"mean over {len(layers)} layer(s): {draft.reason}"


def _fresh(
    policy: Policy, state: FederationState, snapshot: SnapshotMeta, layer: str
) -> tuple[Sequence[str], npt.NDArray[np.intp], FloatArray]:
    """The publisher's comparable partners with fresh snapshots: (ids in id order, positions of
    those partners in ids, their raw scores)."""
    row = state.scores.get(layer)
    if not row:
        return (), np.empty(0, np.intp), np.empty(0)
    if isinstance(row, ScoreRow):
        ids, values = row.ids, row.array
    else:
        items = sorted(row.items())
        ids = [k for k, _ in items]
        values = np.fromiter((v for _, v in items), np.float64, len(items))
    peers = state.peers if isinstance(state.peers, PeerTable) else PeerTable(state.peers.values())
    present, steps = peers.aligned(ids)
    keep = present & ~np.isnan(values)
    own = _position(ids, snapshot.worker_id)
    if own is not None:
        keep[own] = False
    if policy.max_staleness_steps is not None:
        keep &= np.abs(steps - snapshot.step) <= policy.max_staleness_steps
    at = np.flatnonzero(keep)
    return ids, at, np.asarray(values[at], dtype=np.float64)


def _position(ids: Sequence[str], wid: str) -> int | None:
    """Where `wid` sits in the sorted `ids` (None when absent)."""
    i = bisect.bisect_left(ids, wid)
    return i if i < len(ids) and ids[i] == wid else None


TIE_TOLERANCE = 1e-4


def standings(raw: FloatArray, rule: str) -> FloatArray:
    """`relative_scores` over an array of raw scores (same order); see the module docstring."""
    n = raw.size
    if rule == "none" or n == 0:
        return raw
    if rule == "zscore":
        if float(raw.max() - raw.min()) <= TIE_TOLERANCE:
            return np.zeros(n)
        mean = float(raw.mean())
        out: FloatArray = (raw - mean) / math.sqrt(float(np.mean((raw - mean) ** 2)))
        return out
    if rule == "rank":
        if n == 1:
            return np.full(1, 0.5)
        ordered = np.sort(raw)
        below = np.searchsorted(ordered, raw - TIE_TOLERANCE, side="left")
        tied = np.searchsorted(ordered, raw + TIE_TOLERANCE, side="right") - below - 1
        ranks: FloatArray = (below + 0.5 * tied) / (n - 1)
        return ranks
    raise ValueError(f"unknown relative rule {rule!r}; use none, zscore or rank")


def relative_scores(row: Mapping[str, float], rule: str) -> dict[str, float]:
    """Each partner's standing in a publisher's row of raw scores: `none` (the raw score),
    `zscore` or `rank` (see the module docstring for both definitions and for ties)."""
    values = standings(np.fromiter(row.values(), np.float64, len(row)), rule)
    return {p: float(v) for p, v in zip(row, values, strict=True)}


@dataclass(frozen=True)
class _Eligible:
    """The partners that may be chosen now, aligned: ids[pos[i]] scores raw[i], and the
    thresholds apply to scores[i]."""

    ids: Sequence[str]
    pos: npt.NDArray[np.intp]
    raw: FloatArray
    scores: FloatArray

    def name(self, i: int) -> str:
        return self.ids[int(self.pos[i])]


def _eligible(
    policy: Policy,
    state: FederationState,
    snapshot: SnapshotMeta,
    layer: str,
    cooling: Mapping[str, int],
) -> _Eligible:
    """The partners out of cooldown (`cooling`: partner → step of the pair's last decision on
    this layer), with their standing in the row of every fresh comparable partner."""
    ids, pos, raw = _fresh(policy, state, snapshot, layer)
    standing = standings(raw, policy.relative)
    if cooling:
        keep = np.ones(pos.size, dtype=bool)
        for partner, last in cooling.items():
            at = _position(ids, partner)
            if at is None or snapshot.step - last >= policy.cooldown_steps:
                continue
            i = int(np.searchsorted(pos, at))  # pos ascends
            if i < pos.size and pos[i] == at:
                keep[i] = False
        pos, raw, standing = pos[keep], raw[keep], standing[keep]
    return _Eligible(ids, pos, raw, standing)


def _cooling(state: FederationState) -> dict[str, dict[str, int]]:
    """Layer → partner → step of the pair's last merge or drift."""
    out: dict[str, dict[str, int]] = {}
    for (layer, partner), step in state.cooldowns.items():
        out.setdefault(layer, {})[partner] = step
    return out


def _decide_layer(
    policy: Policy,
    state: FederationState,
    snapshot: SnapshotMeta,
    layer: str,
    result: Round,
    cooling: Mapping[str, int],
) -> None:
    el = _eligible(policy, state, snapshot, layer, cooling)
    if not el.pos.size:
        return
    # best first: highest standing, then highest raw score, then partner id
    ranked = np.lexsort((el.pos, -el.raw, -el.scores))
    merges = _merges(policy, state, layer, ranked, el)
    drifts = _drifts(policy, ranked, el)
    for i, action in [*merges, *drifts]:
        partner = el.name(i)
        result.decisions.append(
            _draft(
                policy,
                state,
                snapshot,
                layer,
                partner,
                action,
                float(el.raw[i]),
                float(el.scores[i]),
            )
        )
        result.cooldowns[(layer, partner)] = snapshot.step
    if merges:
        result.merges[layer] = len(merges)
    if not merges and not drifts:
        best = int(ranked[0])
        result.decisions.append(
            _hold(
                policy,
                state,
                snapshot,
                layer,
                el.name(best),
                float(el.raw[best]),
                float(el.scores[best]),
            )
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
    ranked: npt.NDArray[np.intp],
    el: _Eligible,
) -> list[tuple[int, Action]]:
    ok = el.scores[ranked] > policy.merge_threshold
    if policy.min_merge_score is not None:
        ok &= el.raw[ranked] > policy.min_merge_score
    above = ranked[ok]
    budget = max(policy.max_merges_per_epoch - state.merges.get(layer, 0), 0)
    if policy.pairing == "best":
        above = above[:1]
    return [(int(i), "merge") for i in above[:budget]]


def _drifts(
    policy: Policy, ranked: npt.NDArray[np.intp], el: _Eligible
) -> list[tuple[int, Action]]:
    if policy.drift_threshold is None:
        return []
    worst = ranked[::-1]
    below = worst[el.scores[worst] < policy.drift_threshold]
    if policy.pairing == "best":
        below = below[:1]
    return [(int(i), "drift") for i in below]


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
    code: HoldCode = "within_thresholds"
    if standing > policy.merge_threshold and floor is not None and score <= floor:
        reason = f"best {_compared(policy, score, standing)} is not above min_merge_score {floor:g}"
        code = "min_merge_score"
    elif standing > policy.merge_threshold:
        reason = f"merge limit reached ({policy.max_merges_per_epoch} per epoch)"
        code = "merge_limit"
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
        code=code,
    )


def fedavg(policy: Policy, every: int, state: FederationState, snapshot: SnapshotMeta) -> Round:
    """The FedAvg baseline as decisions (McMahan et al. 2017, "Communication-Efficient Learning
    of Deep Networks from Decentralized Data", with equal weights).

    When the publisher's step has crossed a multiple of `every` since its last averaging on a
    layer (the pair cooldowns record it), it gets one `weighted` merge per non-stale peer, the
    k-th with α = 1/(k+1): applied in id order they make Tᵢ the running mean of its own tether
    and the peers' latest, i.e. the federation mean (up to the peers' own progress meanwhile).
    Scores are ignored; they are recorded on the decisions when known.

    With `policy.fedavg_within = "group"` the peers are only those of the publisher's group
    (`PeerState.group`; the publisher's own group is read from `state.peers` too): FedAvg run
    separately in each ground-truth cluster, the oracle that clustered FL is measured against
    (IFCA, Ghosh et al. 2020, "An Efficient Framework for Clustered Federated Learning"). A
    worker registered without a group is in the group of the other workers without one; a
    publisher missing from `state.peers` (no full tether published yet) counts as without one.
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
    """Peers to average with on `layer` now (none unless a multiple of `every` was crossed),
    within the publisher's group under `fedavg_within = "group"`."""
    last = max((s for (lay, _), s in state.cooldowns.items() if lay == layer), default=0)
    if snapshot.step // every <= last // every:
        return []
    grouped = policy.fedavg_within == "group"
    own = state.peers.get(snapshot.worker_id)
    group = own.group if own is not None else None
    peers = []
    for partner, peer in sorted(state.peers.items()):
        stale = (
            policy.max_staleness_steps is not None
            and abs(peer.step - snapshot.step) > policy.max_staleness_steps
        )
        outside = grouped and peer.group != group
        if partner != snapshot.worker_id and not stale and not outside:
            peers.append(partner)
    return peers


def held(policy: Policy, state: FederationState, snapshot: SnapshotMeta, result: Round) -> Round:
    """`result` with its `hold` set when it decided no merge or drift: why, for the worker (the
    first hold decision's reason, else why no partner was eligible on the first layer in scope,
    else why no round started)."""
    if any(d.action != "hold" for d in result.decisions):
        return result
    return replace(result, hold=_why_held(policy, state, snapshot, result))


def _why_held(
    policy: Policy, state: FederationState, snapshot: SnapshotMeta, result: Round
) -> HoldReason:
    if not result.triggered:
        code: HoldCode = "no_plateau"
        if policy.fedavg_every is not None:
            code = "schedule"
        elif snapshot.step < policy.warmup_steps:
            code = "warmup"
        return HoldReason(code, result.trigger_reason)
    for draft in result.decisions:  # holds only
        return HoldReason(
            draft.code or "within_thresholds", f"layer {draft.layer!r}: {draft.reason}", draft.layer
        )
    layers = layers_in_scope(policy, state.layer_order)
    if not layers:
        return HoldReason(
            "out_of_scope", f"no layer of the worker is in policy.layers {policy.layers}"
        )
    return _no_partner(policy, state, snapshot, layers[0])


def _no_partner(
    policy: Policy, state: FederationState, snapshot: SnapshotMeta, layer: str
) -> HoldReason:
    """Why no partner was eligible on `layer`: none comparable, all stale, or all cooling."""
    comparable = [
        p
        for p, score in state.scores.get(layer, {}).items()
        if p != snapshot.worker_id and p in state.peers and not math.isnan(score)
    ]
    if not comparable:
        return HoldReason(
            "no_partner",
            f"layer {layer!r}: no other active worker has a comparable snapshot of it "
            f"({len(state.peers)} other worker(s) published)",
            layer,
        )
    if not len(_fresh(policy, state, snapshot, layer)[1]):
        steps = sorted(state.peers[p].step for p in comparable)
        return HoldReason(
            "stale_partners",
            f"layer {layer!r}: every comparable partner (steps {steps[0]}..{steps[-1]}) is more "
            f"than max_staleness_steps {policy.max_staleness_steps} from step {snapshot.step}",
            layer,
        )
    return HoldReason(
        "cooldown",
        f"layer {layer!r}: every fresh partner is cooling down ({policy.cooldown_steps} steps "
        "after a merge or drift of the pair)",
        layer,
    )
