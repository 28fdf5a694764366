"""Holds a user can fix: count the scoring rounds that decided nothing for this worker, by reason,
and say once, with the counts and what to change, when they keep coming.

The coordinator tells a worker why its latest round gave it nothing to apply (`Hold`, replaced
by each round; `tether_protocol.messages.Hold` lists the codes). The worker sees it with each
poll; a round is counted once (by its snapshot version and code). Some reasons are the policy's
schedule (`warmup`, `no_plateau`, `schedule`: no round was due) and some its answer
(`within_thresholds`: partners were scored and none crossed a threshold); the others mean the
federation cannot do anything for this worker until something changes (`ADVICE`). After
`WARN_AFTER` rounds in a row held for those, one warning names the counts and the changes; a
round that decided something (the hold is cleared) or scored partners ends the streak.
"""

from __future__ import annotations

import logging
from collections import Counter

from tether_protocol.messages import Hold

log = logging.getLogger("tetherfed.federation")

WARN_AFTER = 10  # rounds in a row held for reasons the user can fix before one warning

# Reasons the user can fix, with what to change (the codes' meanings: `Hold`'s docstring).
ADVICE: dict[str, str] = {
    "stale_partners": "every comparable partner's latest snapshot is more than "
    "policy.max_staleness_steps steps away: raise max_staleness_steps, or make the workers "
    "publish at a similar pace (publish_every, the I/O budget)",
    "no_partner": "no other worker has a comparable snapshot of the layer: check that the "
    "workers tether the same layer names and shapes, and that the others run and publish",
    "cooldown": "every fresh partner is cooling down after a decision: lower policy.cooldown_steps",
    "out_of_scope": "policy.layers names none of this worker's layers: fix policy.layers "
    "(or use 'all')",
    "merge_limit": "the epoch's merge budget is spent: raise policy.max_merges_per_epoch",
    "min_merge_score": "the best raw score is under policy.min_merge_score: lower it",
}
ANSWERED = "within_thresholds"  # partners were scored: the federation works, the streak ends


class HoldTally:
    """The rounds that held for one worker, by code (`counts`), and the warning of a streak of
    fixable ones (`observe`). Used by the I/O thread only; `counts` is read at the end."""

    def __init__(self, warn_after: int = WARN_AFTER) -> None:
        self.warn_after = warn_after
        self.counts: Counter[str] = Counter()
        self._streak: Counter[str] = Counter()
        self._last: tuple[int, str] | None = None
        self._warned = False

    def observe(self, hold: Hold | None, worker: str | None) -> str | None:
        """Take the hold a poll carried (None: the latest round decided something); the
        warning logged now, if any."""
        if hold is None:
            if self._last is not None:  # a round since decided something for this worker
                self._end_streak()
            return None
        key = (hold.version, hold.code)
        if key == self._last:
            return None  # the same round, seen by another poll
        self._last = key
        self.counts[hold.code] += 1
        if hold.code == ANSWERED:
            self._end_streak()
        elif hold.code in ADVICE:
            self._streak[hold.code] += 1
        rounds = sum(self._streak.values())
        if self._warned or rounds < self.warn_after:
            return None
        self._warned = True
        message = warning(worker, rounds, self._streak)
        log.warning("%s", message)
        return message

    def _end_streak(self) -> None:
        self._streak.clear()
        self._warned = False


def warning(worker: str | None, rounds: int, by_code: Counter[str]) -> str:
    """'worker W: the last N scoring rounds decided nothing for it (code n, …): what to change'."""
    counts = ", ".join(f"{code} {n}" for code, n in by_code.most_common())
    changes = "; ".join(f"{code}: {ADVICE[code]}" for code, _ in by_code.most_common())
    return (
        f"worker {worker}: {rounds} scoring rounds in a row decided nothing for it "
        f"({counts}). {changes}"
    )
