"""Shared benchmark plumbing: interleaved timing, medians with spread, and the JSON line format."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil


@dataclass(frozen=True)
class Timing:
    """Median and spread (min, max) of repeated wall-clock measurements, in seconds."""

    median: float
    low: float
    high: float
    samples: list[float]

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        return cls(statistics.median(samples), min(samples), max(samples), samples)


def interleaved(
    ours: Callable[[], object], reference: Callable[[], object], repeats: int, warmup: int = 1
) -> tuple[Timing, Timing]:
    """Time `ours` and `reference` alternately (so drift in machine load hits both alike)."""
    for _ in range(warmup):
        ours()
        reference()
    ours_s, ref_s = [], []
    for i in range(repeats):
        # Alternate which goes first, so neither always runs on a warm cache.
        pair = ((ours, ours_s), (reference, ref_s))
        for fn, sink in pair if i % 2 == 0 else reversed(pair):
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    return Timing.of(ours_s), Timing.of(ref_s)


def line(
    name: str,
    ours: float,
    reference: float | None,
    unit: str,
    ratio: float | None,
    target: str,
    passed: bool,
    params: dict[str, Any],
) -> dict[str, Any]:
    """One benchmark result in the suite's JSON-line shape."""
    return {
        "name": name,
        "ours": round(ours, 6),
        "reference": None if reference is None else round(reference, 6),
        "unit": unit,
        "ratio": None if ratio is None else round(ratio, 4),
        "target": target,
        "passed": passed,
        "params": params,
    }


class CpuMeter:
    """What limits a benchmark: CPU time of the coordinator's processes (API, scorers, embedded
    Redis), of the benchmark's own processes (load generators, workers) and of the whole
    machine, over the measured window. One Python process cannot use more than one core, so
    a process near 1.0 cores is saturated; a machine near all its cores busy is saturated
    whoever uses it (other tenants included: `machine_busy_cores` counts every process)."""

    SATURATED = 0.9

    def __init__(self, coordinator_pid: int, own_pids: list[int] | None = None) -> None:
        self.coordinator_pid, self.own_pids = coordinator_pid, own_pids
        self._start: tuple[float, dict[str, dict[int, float]], float] | None = None

    def _groups(self) -> dict[str, list[Any]]:
        groups: dict[str, list[Any]] = {"api": [], "scorers": [], "redis": [], "bench": []}
        with contextlib.suppress(psutil.Error):
            coord = psutil.Process(self.coordinator_pid)
            groups["api"].append(coord)
            for child in coord.children(recursive=True):
                cmd = " ".join(child.cmdline())
                kind = "scorers" if "scorer" in cmd else "redis" if "redis" in cmd else "api"
                groups[kind].append(child)
        theirs = {p.pid for kind in ("api", "scorers", "redis") for p in groups[kind]}
        me = psutil.Process()
        own = [me, *me.children(recursive=True)]  # the coordinator is our child: leave it out
        if self.own_pids is not None:
            own = [p for p in own if p.pid in self.own_pids or p.pid == me.pid]
        groups["bench"] = [p for p in own if p.pid not in theirs and p.pid != self.coordinator_pid]
        return groups

    def _cpu(self) -> dict[str, dict[int, float]]:
        """Group → pid → CPU seconds (user + system) so far."""
        out: dict[str, dict[int, float]] = {}
        for name, procs in self._groups().items():
            out[name] = {}
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    out[name][p.pid] = t.user + t.system
        return out

    def start(self) -> None:
        t = psutil.cpu_times()
        self._start = (time.perf_counter(), self._cpu(), sum(t) - t.idle - t.iowait)

    def stop(self) -> dict[str, Any]:
        """Cores used per group and by the machine over the window, and what saturated: one of
        the coordinator's processes or one of the benchmark's own at a core, or the machine."""
        assert self._start is not None, "start() first"
        began, before, busy_before = self._start
        wall = max(time.perf_counter() - began, 1e-9)
        after = self._cpu()
        used = {
            k: {pid: max(s - before.get(k, {}).get(pid, 0.0), 0.0) / wall for pid, s in v.items()}
            for k, v in after.items()
        }
        cores = {k: round(sum(v.values()), 2) for k, v in used.items()}
        t = psutil.cpu_times()
        busy = round((sum(t) - t.idle - t.iowait - busy_before) / wall, 2)
        n = psutil.cpu_count() or 1
        busiest = {k: max(v.values(), default=0.0) for k, v in used.items()}
        full = [k for k in ("api", "scorers", "redis") if busiest[k] >= self.SATURATED]
        own = busiest["bench"]
        if full:
            limit = f"a process of {', '.join(full)} at one core (a Python process's GIL)"
        elif own >= self.SATURATED:
            limit = f"the benchmark's own process at {own:.2f} cores (its GIL), not the coordinator"
        elif busy >= self.SATURATED * n:
            limit = f"machine CPU: {busy} of {n} cores busy (every process shares them)"
        else:
            limit = "no CPU saturated: waits (I/O, wake-ups, scheduling) dominate"
        return {
            "cores_used": cores,
            "machine_busy_cores": busy,
            "machine_cores": n,
            "load_average_1m": round(os.getloadavg()[0], 1),
            "limit": limit,
        }
