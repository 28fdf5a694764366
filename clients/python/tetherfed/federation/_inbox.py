"""The inbox: everything the I/O thread and the training thread hand each other about decisions.

The I/O thread puts prepared decisions in and moves the poll cursor; the training thread takes
them, applies them and settles each (its id recorded as applied and its ack queued, in one step);
the I/O thread sends those acks. One lock guards the ready queue, the applied ids, the cursor and
the unsent acks. No method returns one of those containers: they copy in and out under the lock,
and forgetting or rewinding changes them in place, so an id the training thread records while
the I/O thread rewinds is never lost with a replaced set.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable, Iterator, Mapping, MutableSet
from dataclasses import dataclass, field

from torch import Tensor

from tether_protocol.messages import AckCreate, Decision


@dataclass
class Ready:
    """A decision the I/O thread prepared: the partner tether, or why it cannot be applied;
    `parts`: the partner's parts of the layer published with that tether (entry name →
    float32 tensor: `fc1@weight`, `fc1@bias`, `fc1@model:bn.running_mean`; `merge_scope`
    weights or model), empty when it published none."""

    decision: Decision
    partner: Tensor | None
    problem: str | None = None
    parts: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class InboxState:
    """One consistent copy of the inbox for a checkpoint: applied ids and the acks not yet
    sent, taken under the lock together (a settled decision is in both or in neither)."""

    applied_ids: list[int]
    cursor: int
    pending_acks: list[tuple[int, AckCreate]]


class Inbox:
    """Decisions ready to apply, the ids applied, the poll cursor and the unsent acks, behind
    one lock; safe to call from both threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: collections.deque[Ready] = collections.deque()
        self._applied: set[int] = set()
        self._unsent: dict[int, AckCreate] = {}  # in the order the acks were made
        self._cursor = 0
        # The decision the training thread is applying, and whether it was voided meanwhile (the
        # worker forgotten, or its id rewound past): then settling it records nothing.
        self._taken: Ready | None = None
        self._void = False

    # -- restoring and checkpointing ------------------------------------------------------------
    def load(self, applied_ids: Iterable[int], cursor: int, acks: Mapping[int, AckCreate]) -> None:
        """Restore what a checkpoint kept (before the I/O thread starts)."""
        with self._lock:
            self._applied.update(applied_ids)
            self._cursor = cursor
            self._unsent.update(acks)

    def state(self) -> InboxState:
        """A consistent copy for `Federation.state_dict`."""
        with self._lock:
            return InboxState(sorted(self._applied), self._cursor, list(self._unsent.items()))

    # -- I/O thread -----------------------------------------------------------------------------
    @property
    def cursor(self) -> int:
        """The last decision id polled: the next poll asks for those after it."""
        with self._lock:
            return self._cursor

    def seek(self, cursor: int) -> None:
        """Poll from `cursor` next (decisions after it are delivered again, applied ones skipped)."""
        with self._lock:
            self._cursor = cursor

    def advance(self, decision_id: int) -> None:
        """The decision was polled and, if it needs applying, put: poll after it from now on."""
        with self._lock:
            self._cursor = max(self._cursor, decision_id)

    def put(self, ready: Ready) -> None:
        """Queue a prepared decision for the training thread."""
        with self._lock:
            self._ready.append(ready)

    def is_applied(self, decision_id: object) -> bool:
        """Whether the decision was applied (or otherwise resolved) already."""
        with self._lock:
            return decision_id in self._applied

    def rewind(self, last: int) -> None:
        """The federation's decisions now end at `last`, below the cursor: the ids after it will
        name new decisions. Poll from `last`, and drop those ids from the applied ids and the
        ready queue (a decision being applied with such an id is not recorded)."""
        with self._lock:
            self._cursor = last
            self._applied.difference_update([i for i in self._applied if i > last])
            kept = [ready for ready in self._ready if ready.decision.id <= last]
            self._ready.clear()
            self._ready.extend(kept)
            if self._taken is not None and self._taken.decision.id > last:
                self._void = True

    def reset(self) -> None:
        """The coordinator forgot this worker: decision ids start over, so the cursor, applied
        ids, ready decisions and unsent acks all go (a decision being applied is not recorded)."""
        with self._lock:
            self._cursor = 0
            self._applied.clear()
            self._ready.clear()
            self._unsent.clear()
            self._void = self._taken is not None

    def has_unsent_acks(self) -> bool:
        """Whether acks wait to be sent."""
        with self._lock:
            return bool(self._unsent)

    def unsent_acks(self) -> list[tuple[int, AckCreate]]:
        """The acks not yet sent, oldest first (a copy)."""
        with self._lock:
            return list(self._unsent.items())

    def sent(self, decision_id: int, ack: AckCreate) -> None:
        """The coordinator took (or refused for good) this ack: drop it, unless it was replaced
        by a newer one meanwhile."""
        with self._lock:
            if self._unsent.get(decision_id) is ack:
                del self._unsent[decision_id]

    # -- training thread ------------------------------------------------------------------------
    def take(self) -> Ready | None:
        """The next decision to apply; one delivered twice comes out once. Settle it (`settle`)
        before taking the next."""
        with self._lock:
            self._taken, self._void = None, False
            while self._ready:
                ready = self._ready.popleft()
                if ready.decision.id not in self._applied:
                    self._taken = ready
                    return ready
            return None

    def settle(self, ready: Ready, ack: AckCreate) -> bool:
        """Record the taken decision as applied (or rejected) and queue its ack, in one step;
        False, recording nothing, if the worker was forgotten or rewound past it meanwhile."""
        with self._lock:
            void = self._void or self._taken is not ready
            self._taken, self._void = None, False
            if void:
                return False
            self._applied.add(ready.decision.id)
            self._unsent[ready.decision.id] = ack
            return True

    def drain(self) -> list[Decision]:
        """Empty the queue (a leaving worker): the decisions not applied yet, in order."""
        with self._lock:
            pending = [r.decision for r in self._ready if r.decision.id not in self._applied]
            self._ready.clear()
            return pending

    def resolve(self, decision_id: int, ack: AckCreate) -> bool:
        """Record a decision resolved without applying it and queue its ack; False if it was
        applied or resolved already."""
        with self._lock:
            if decision_id in self._applied:
                return False
            self._applied.add(decision_id)
            self._unsent[decision_id] = ack
            return True

    # -- the applied ids, as a set --------------------------------------------------------------
    def applied(self) -> frozenset[int]:
        """A copy of the applied decision ids."""
        with self._lock:
            return frozenset(self._applied)

    def mark_applied(self, decision_id: int) -> None:
        """Record a decision id as applied (no ack)."""
        with self._lock:
            self._applied.add(decision_id)

    def unmark_applied(self, decision_id: int) -> None:
        """Forget that a decision id was applied."""
        with self._lock:
            self._applied.discard(decision_id)


class AppliedIds(MutableSet[int]):
    """The inbox's applied decision ids as a set (`Federation.applied_ids`): every operation
    takes the inbox's lock; iterating walks a copy."""

    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox

    def __contains__(self, decision_id: object) -> bool:
        return self._inbox.is_applied(decision_id)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._inbox.applied()))

    def __len__(self) -> int:
        return len(self._inbox.applied())

    def add(self, value: int) -> None:
        """Record `value` as applied."""
        self._inbox.mark_applied(value)

    def discard(self, value: int) -> None:
        """Forget that `value` was applied."""
        self._inbox.unmark_applied(value)

    def __repr__(self) -> str:
        return f"AppliedIds({set(self._inbox.applied())!r})"
