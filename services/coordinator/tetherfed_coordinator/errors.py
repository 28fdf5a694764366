"""The coordinator's domain errors: what went wrong, with a stable `detail` message.

The store, the publish path and the scoring process raise these; none of them knows about HTTP.
The API maps each kind to a status code in one place (`edges.coordinator_error`) and answers
`{"detail": ...}` with the message unchanged (clients and tests assert on it).
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base of the domain errors; `detail` is the message a client sees."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadInput(CoordinatorError):
    """Malformed input: a frame that does not parse, a body that disagrees with its length."""


class Invalid(CoordinatorError):
    """Well-formed input that is invalid: a frame that disagrees with the registered layer
    table or holds NaN/Inf, an ambiguous telemetry query."""


class TooLarge(CoordinatorError):
    """A body over the configured maximum."""


class NotFound(CoordinatorError):
    """Something the request names does not exist (or is no longer stored)."""


class FederationNotFound(NotFound):
    """An unknown federation."""

    def __init__(self, fed: str) -> None:
        super().__init__(f"federation {fed!r} not found")


class WorkerNotFound(NotFound):
    """An unknown worker of a known federation."""

    def __init__(self, fed: str, wid: str) -> None:
        super().__init__(f"worker {wid!r} not found in federation {fed!r}")


class NoSnapshot(NotFound):
    """A worker that has not published yet."""

    def __init__(self, fed: str, wid: str) -> None:
        super().__init__(f"worker {wid!r} in federation {fed!r} has published no snapshot")


class DecisionNotFound(NotFound):
    """A decision id the federation never issued, or one trimmed from its stream."""

    def __init__(self, fed: str, decision_id: int) -> None:
        super().__init__(f"decision {decision_id} not found in federation {fed!r}")


class Conflict(CoordinatorError):
    """The request conflicts with the current state (e.g. a different ack already recorded)."""


class FederationExists(Conflict):
    """A federation name that is taken."""

    def __init__(self, name: str) -> None:
        super().__init__(f"federation {name!r} already exists")


class WorkerLeft(Conflict):
    """A worker that has left may no longer heartbeat or publish (until it rejoins)."""

    def __init__(self, fed: str, wid: str) -> None:
        super().__init__(f"worker {wid!r} has left federation {fed!r}")


class WorkerBusy(Conflict):
    """Another process runs under this worker id (its session heartbeat within the TTL)."""

    def __init__(self, wid: str, session: str, ttl_s: float) -> None:
        super().__init__(
            f"worker {wid!r} is already running in another process (session {session[:8]}): "
            f"stop that one, or wait {ttl_s:g} s after it stopped"
        )


class Unavailable(CoordinatorError):
    """Redis could not do it right now (refused a write, too few replicas took it, a
    concurrent publish won); the same request may succeed when retried."""
