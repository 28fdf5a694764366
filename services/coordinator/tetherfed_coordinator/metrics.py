"""In-process Prometheus counters (per replica; Prometheus sums replicas)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Metrics:
    """Counters and sums exposed at GET /metrics in the Prometheus text format."""

    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    publishes: int = 0
    bytes_in: int = 0

    def render(self, backlog: int, pending: int, stats: dict[str, str]) -> str:
        """The exposition text. Requests, publishes and bytes are this replica's; scoring
        rounds and time and decisions (`stats`) are coordinator-wide counters kept in Redis;
        `backlog`/`pending` come from the scoring stream's group."""
        lines = ["# TYPE tetherfed_requests_total counter"]
        for (method, status), n in sorted(self.requests.items()):
            lines.append(f'tetherfed_requests_total{{method="{method}",status="{status}"}} {n}')
        lines += [
            "# TYPE tetherfed_publishes_total counter",
            f"tetherfed_publishes_total {self.publishes}",
            "# TYPE tetherfed_bytes_in_total counter",
            f"tetherfed_bytes_in_total {self.bytes_in}",
            "# TYPE tetherfed_scoring_seconds_total counter",
            f"tetherfed_scoring_seconds_total {float(stats.get('scoring_seconds', 0)):.6f}",
            "# TYPE tetherfed_scoring_rounds_total counter",
            f"tetherfed_scoring_rounds_total {int(stats.get('scoring_rounds', 0))}",
            "# TYPE tetherfed_decisions_total counter",
        ]
        for action in ("merge", "drift", "hold"):
            n = int(stats.get(f"decisions:{action}", 0))
            lines.append(f'tetherfed_decisions_total{{action="{action}"}} {n}')
        lines += [
            "# TYPE tetherfed_scoring_backlog gauge",
            f"tetherfed_scoring_backlog {backlog}",
            "# TYPE tetherfed_scoring_pending gauge",
            f"tetherfed_scoring_pending {pending}",
        ]
        return "\n".join(lines) + "\n"
