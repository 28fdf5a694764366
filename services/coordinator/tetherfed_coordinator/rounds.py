"""Synchronous rounds (`Policy.sync_every`) on the coordinator: which publishes wait for their
peers before they are scored.

A worker publishes at every multiple k of `sync_every` steps and waits for that round's
decisions (`tetherfed.federation._sync`). For the round to compare the peers' step-k snapshots,
not stale ones, the scorer defers the publish at step k while some active peer's latest snapshot
is below k, for at most `sync_timeout_s` after the publish (`deferral`, a pure function). A
deferred publish is examined again with every scoring batch of the scorer holding it and on its
periodic wake-up (`Scorer.step`, at least every DEFERRED_WAKE_MS); once every active peer
reached k it is scored, and on timeout it is scored with whoever is there (peers too far behind
are left out by `max_staleness_steps`, as always). Peers are compared at their latest snapshot:
one still at k is at distance 0 from the round's step, the publisher's snapshot step, so fresh
under any staleness bound. Only active workers count: one that left, or whose heartbeat lapsed,
is never waited for.

Where the deferral lives: a deferred publish's scoring entry stays pending (unacked) in the
scoring group, owned by the scorer holding it, which keeps the entries in memory (`Deferred`) and
claims them again on every pass (XCLAIM, resetting their idle time) so that no other live scorer
reclaims them. If that scorer dies, its entries stay pending and another scorer (or itself,
restarted) reclaims them after `reclaim_idle_ms` (XAUTOCLAIM), deferring or scoring them
anew: the deferral survives the process. Commits keep their at-most-once guard
(commit.lua's `scored_version` compare-and-set): a publish scored twice is committed once.
The publish time is the entry id's (the Redis clock, in ms), so every scorer measures the same
timeout (up to its clock's offset from Redis).
"""

from __future__ import annotations

from collections.abc import Mapping

from tether_protocol.messages import Policy

from .replies import Entries

DEFERRED_WAKE_MS = 100  # the longest a scorer holding deferred publishes blocks for new ones


def round_step(policy: Policy, step: int) -> bool:
    """Whether a publish at `step` is a synchronous round's (a positive multiple of
    `sync_every`; never without synchronous rounds)."""
    every = policy.sync_every
    return every is not None and step > 0 and step % every == 0


def missing_peers(step: int, own: str, peers: Mapping[str, int | None]) -> list[str]:
    """The peers (active workers but `own`: id → latest snapshot's step, None without one)
    whose latest snapshot is below `step`, sorted."""
    return sorted(w for w, at in peers.items() if w != own and (at is None or at < step))


def deferral(
    policy: Policy, step: int, own: str, peers: Mapping[str, int | None], waited_s: float
) -> list[str]:
    """The peers a publish by `own` at `step`, made `waited_s` seconds ago, still waits for
    before it is scored: empty (score it now) outside synchronous rounds, off a round step,
    once every active peer (`peers`: id → latest snapshot's step, None without one) reached
    `step`, or after `policy.sync_timeout_s`."""
    if not round_step(policy, step) or waited_s >= policy.sync_timeout_s:
        return []
    return missing_peers(step, own, peers)


def entry_seconds(entry_id: str) -> float:
    """When a scoring entry was added (its id's Redis clock), in Unix seconds."""
    return int(entry_id.split("-", 1)[0]) / 1000


class Deferred:
    """The scoring entries this scorer deferred, by entry id (kept pending in the group)."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, str]] = {}

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def ids(self) -> list[str]:
        """The deferred entries' ids."""
        return list(self._entries)

    def join(self, entries: Entries) -> Entries:
        """`entries` and the deferred ones (each once), oldest first: a batch examines every
        deferred publish again."""
        merged = dict(self._entries)
        merged.update({entry_id: fields for entry_id, fields in entries})
        return sorted(merged.items(), key=lambda e: _order(e[0]))

    def keep(self, entries: Entries) -> None:
        """From now on, exactly `entries` are deferred."""
        self._entries = dict(entries)


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
