"""Retries with exponential backoff and full jitter, bounded in tries and in time."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from ._errors import ServerError, TetherError, TransportError


@dataclass(frozen=True)
class RetryPolicy:
    """How idempotent calls are retried: up to `tries` attempts within `deadline_s` seconds.

    Attempt k (from 0) sleeps uniformly in [0, min(cap_s, base_s · 2^k)] before the next try
    ("full jitter"), which spreads a crowd of workers reconnecting after an outage.
    """

    tries: int = 4
    base_s: float = 0.1
    cap_s: float = 2.0
    deadline_s: float = 10.0

    def delay(self, attempt: int) -> float:
        """Seconds to sleep after failed attempt number `attempt` (0-based)."""
        return random.uniform(0.0, min(self.cap_s, self.base_s * 2.0**attempt))

    def should_retry(self, error: TetherError, attempt: int, started: float) -> bool:
        """Whether to try again after `error` (transport failures and 5xx only)."""
        if not isinstance(error, TransportError | ServerError):
            return False
        return attempt + 1 < self.tries and time.monotonic() - started < self.deadline_s


NO_RETRY = RetryPolicy(tries=1)
