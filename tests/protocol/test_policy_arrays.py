"""The policy over array rows (`ScoreRow`, `PeerTable`, what the scorer passes for a federation
of many workers) decides exactly what the module docstring's rules say, checked against a
plain-Python reading of those rules on random rows with stale peers, NaNs and cooldowns."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tether_protocol.messages import Policy, SnapshotMeta
from tether_protocol.policy import (
    TIE_TOLERANCE,
    FederationState,
    PeerState,
    PeerTable,
    ScoreRow,
    decide,
)

ME = "w050"


def reference(
    policy: Policy,
    row: dict[str, float],
    peers: dict[str, PeerState],
    cooldowns: dict[str, int],
    step: int,
) -> list[tuple[str, str]]:
    """(partner, action) per the docstring, one layer, with plain loops."""
    fresh = {
        p: s
        for p, s in row.items()
        if p != ME
        and p in peers
        and not math.isnan(s)
        and (
            policy.max_staleness_steps is None
            or abs(peers[p].step - step) <= policy.max_staleness_steps
        )
    }
    values = list(fresh.values())
    n = len(values)
    if policy.relative == "rank":

        def rank(s: float) -> float:
            if n == 1:
                return 0.5
            below = sum(v < s - TIE_TOLERANCE for v in values)
            tied = sum(abs(v - s) <= TIE_TOLERANCE for v in values) - 1
            return (below + 0.5 * tied) / (n - 1)

        standing = {p: rank(s) for p, s in fresh.items()}
    elif policy.relative == "zscore":
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
        spread = max(values) - min(values) > TIE_TOLERANCE
        standing = {p: (s - mean) / std if spread else 0.0 for p, s in fresh.items()}
    else:
        standing = dict(fresh)
    ok = [p for p in fresh if p not in cooldowns or step - cooldowns[p] >= policy.cooldown_steps]
    if not ok:
        return []
    ranked = sorted(ok, key=lambda p: (-standing[p], -fresh[p], p))
    floor = policy.min_merge_score
    merges = [
        p
        for p in ranked
        if standing[p] > policy.merge_threshold and (floor is None or fresh[p] > floor)
    ]
    drifts = [
        p
        for p in reversed(ranked)
        if policy.drift_threshold is not None and standing[p] < policy.drift_threshold
    ]
    if policy.pairing == "best":
        merges, drifts = merges[:1], drifts[:1]
    merges = merges[: policy.max_merges_per_epoch]
    out = [(p, "merge") for p in merges] + [(p, "drift") for p in drifts]
    return out or [(ranked[0], "hold")]


@pytest.mark.parametrize("relative", ["none", "zscore", "rank"])
@pytest.mark.parametrize("pairing", ["best", "all"])
def test_array_rows_decide_as_the_rules_say(relative: str, pairing: str) -> None:
    rng = np.random.default_rng(7)
    ids = [f"w{i:03d}" for i in range(120)]
    thresholds = {"none": (0.6, -0.6), "zscore": (1.5, -1.5), "rank": (0.97, 0.03)}[relative]
    for trial in range(20):
        values = np.round(rng.uniform(-1, 1, len(ids)), 2)  # rounded: ties happen
        values[rng.random(len(ids)) < 0.1] = np.nan
        peers = {w: PeerState(w, int(rng.integers(90, 111)), 1) for w in ids if rng.random() < 0.9}
        cooldowns = {w: 100 - int(rng.integers(0, 5)) for w in ids if rng.random() < 0.2}
        policy = Policy(
            trigger="every_publish",
            relative=relative,
            pairing=pairing,
            merge_threshold=thresholds[0],
            drift_threshold=thresholds[1],
            min_merge_score=0.2 if relative != "none" else None,
            max_staleness_steps=6,
            cooldown_steps=3,
            max_merges_per_epoch=1 + trial % 4,
        )
        state = FederationState(
            layer_order=["fc"],
            peers=PeerTable(peers.values()),
            scores={"fc": ScoreRow(ids, values, own=ME)},
            cooldowns={("fc", p): s for p, s in cooldowns.items()},
        )
        snap = SnapshotMeta(worker_id=ME, step=100, epoch=0, loss=1.0)
        got = [(d.partner_id, d.action) for d in decide(policy, state, snap).decisions]
        row = {w: float(v) for w, v in zip(ids, values, strict=True)}
        assert got == reference(policy, row, peers, cooldowns, 100), (trial, relative, pairing)


def test_score_row_reads_as_the_mapping_it_stands_for() -> None:
    row = ScoreRow(["a", "b", "c"], np.array([0.1, 1.0, -0.5]), own="b")
    assert dict(row) == {"a": 0.1, "c": -0.5}
    assert len(row) == 2 and "b" not in row and row.get("c") == -0.5
    assert list(row.values()) == [0.1, -0.5]
