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
    scoring_seconds: float = 0.0
    scoring_rounds: int = 0
    decisions: Counter[str] = field(default_factory=Counter)

    def render(self, backlog: int, pending: int) -> str:
        """The exposition text; `backlog`/`pending` come from the scoring stream's group."""
        lines = ["# TYPE tetherfed_requests_total counter"]
        for (method, status), n in sorted(self.requests.items()):
            lines.append(f'tetherfed_requests_total{{method="{method}",status="{status}"}} {n}')
        lines += [
            "# TYPE tetherfed_publishes_total counter",
            f"tetherfed_publishes_total {self.publishes}",
            "# TYPE tetherfed_bytes_in_total counter",
            f"tetherfed_bytes_in_total {self.bytes_in}",
            "# TYPE tetherfed_scoring_seconds_total counter",
            f"tetherfed_scoring_seconds_total {self.scoring_seconds:.6f}",
            "# TYPE tetherfed_scoring_rounds_total counter",
            f"tetherfed_scoring_rounds_total {self.scoring_rounds}",
            "# TYPE tetherfed_decisions_total counter",
        ]
        for action in ("merge", "drift", "hold"):
            lines.append(f'tetherfed_decisions_total{{action="{action}"}} {self.decisions[action]}')
        lines += [
            "# TYPE tetherfed_scoring_backlog gauge",
            f"tetherfed_scoring_backlog {backlog}",
            "# TYPE tetherfed_scoring_pending gauge",
            f"tetherfed_scoring_pending {pending}",
        ]
        return "\n".join(lines) + "\n"
