"""Prometheus metrics through prometheus_client, correct across the API and scoring processes.

A coordinator is one API process plus its scoring, either on a thread of the API process or in
`TETHER_SCORER_PROCESSES` processes. The API process keeps its metrics (`ApiMetrics`) in its own
registry; scoring metrics (`ScoringMetrics`) live where the scoring runs:

- on the thread: in a registry of the API process, exposed with the API's;
- in processes: prometheus_client's multiprocess mode. The coordinator makes one directory per
  coordinator at start-up (`PROMETHEUS_MULTIPROC_DIR`, passed to the scoring processes only, so
  the API process itself stays in ordinary mode), each scoring process writes its values there,
  `/metrics` adds them up with `MultiProcessCollector`, and the directory goes at shutdown.
  Its name carries the coordinator's PID, so the directory of a coordinator that was killed
  (kill -9: no shutdown) is removed by the next coordinator that starts on the machine. A
  scoring process started again after a temp cleaner removed the directory makes it anew
  (`ensure_multiproc_dir`; before, it died at start-up, again and again).

So each coordinator replica's `/metrics` covers its own API and scoring; Prometheus sums
replicas. Histograms use the same buckets everywhere, from 0.5 ms to 10 s.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DIR_PREFIX = "tetherfed-metrics-"
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ApiMetrics:
    """What the API process counts: requests, publishes and their handling time, and the
    scoring stream's backlog (set at each scrape)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "tetherfed_requests",
            "HTTP requests by method and status.",
            ["method", "status"],
            registry=registry,
        )
        self.publishes = Counter(
            "tetherfed_publishes", "Publishes accepted (full and sketch).", registry=registry
        )
        self.bytes_in = Counter(
            "tetherfed_bytes_in", "Bytes of accepted publish bodies.", registry=registry
        )
        self.publish_seconds = Histogram(
            "tetherfed_publish_seconds",
            "Publish handling, from the request reaching the handler to its 202 (body received, "
            "validated and stored included).",
            ["kind"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.backlog = Gauge(
            "tetherfed_scoring_backlog", "Entries in the scoring stream.", registry=registry
        )
        self.pending = Gauge(
            "tetherfed_scoring_pending",
            "Scoring entries delivered to a scorer and not yet acknowledged.",
            registry=registry,
        )


class ScoringMetrics:
    """What a scorer counts: rounds, their time, decisions, and publish → decision latency."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.rounds = Counter(
            "tetherfed_scoring_rounds",
            "Publishers scored (one policy round each).",
            registry=registry,
        )
        self.seconds = Counter(
            "tetherfed_scoring_seconds",
            "Time spent computing scores and decisions.",
            registry=registry,
        )
        self.round_seconds = Histogram(
            "tetherfed_scoring_round_seconds",
            "One scoring pass over a batch of a federation's publishes: snapshots loaded, "
            "scored, decided and committed.",
            buckets=BUCKETS,
            registry=registry,
        )
        self.decisions = Counter(
            "tetherfed_decisions",
            "Decisions committed, by action.",
            ["action"],
            registry=registry,
        )
        for action in ("merge", "drift", "hold"):
            self.decisions.labels(action)
        self.publish_to_decision = Histogram(
            "tetherfed_publish_to_decision_seconds",
            "From a publish's commit in Redis (its scoring entry's id) to the commit of the "
            "round that scored it.",
            buckets=BUCKETS,
            registry=registry,
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphaned_dirs(root: str | None = None) -> list[str]:
    """Remove the metrics directories (`tetherfed-metrics-<pid>-*` under `root`, default the
    temp dir) of coordinators that no longer run; returns their paths."""
    root = root or tempfile.gettempdir()
    removed = []
    with os.scandir(root) as entries:
        for entry in entries:
            pid = entry.name.removeprefix(DIR_PREFIX).split("-", 1)[0]
            if entry.name.startswith(DIR_PREFIX) and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
    return removed


def ensure_multiproc_dir() -> None:
    """Make the directory `PROMETHEUS_MULTIPROC_DIR` names when it is missing (a temp cleaner
    removed it, or it was set to one that does not exist yet): prometheus_client opens its
    files there when a metric is made and failed with a bare FileNotFoundError. SystemExit
    naming the directory when it cannot be made."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path or os.path.isdir(path):
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise SystemExit(
            f"{MULTIPROC_ENV}={path} is missing and cannot be made ({exc}); point it at a "
            "writable directory or unset it"
        ) from None


class Metrics:
    """A coordinator's metrics: the API's, and scoring's when it runs on a thread of this
    process; `render()` adds what scoring processes wrote to `multiproc_dir`."""

    def __init__(self) -> None:
        ensure_multiproc_dir()  # when preset for this process, its metrics are kept there
        self.registry = CollectorRegistry()
        self.api = ApiMetrics(self.registry)
        self._scoring_registry = CollectorRegistry()
        self.scoring = ScoringMetrics(self._scoring_registry)
        self.multiproc_dir: str | None = None

    def start_multiprocess(self) -> dict[str, str]:
        """Make this coordinator's directory for its scoring processes' metrics; returns the
        environment they need. Scoring on this process's thread stops being exposed (the
        processes do the scoring)."""
        remove_orphaned_dirs()
        self.multiproc_dir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")
        return {MULTIPROC_ENV: self.multiproc_dir}

    def stop_multiprocess(self) -> None:
        """Remove the directory (after the scoring processes stopped)."""
        if self.multiproc_dir is not None:
            shutil.rmtree(self.multiproc_dir, ignore_errors=True)

    def render(self, backlog: int, pending: int) -> bytes:
        """The exposition text (Prometheus text format 0.0.4)."""
        self.api.backlog.set(backlog)
        self.api.pending.set(pending)
        text = generate_latest(self.registry)
        if self.multiproc_dir is None:
            return text + generate_latest(self._scoring_registry)
        merged = CollectorRegistry()
        if os.path.isdir(self.multiproc_dir):
            # prometheus_client does not annotate this constructor.
            MultiProcessCollector(merged, path=self.multiproc_dir)  # type: ignore[no-untyped-call]
        return text + generate_latest(merged)
