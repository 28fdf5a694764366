"""Shared benchmark plumbing: interleaved timing, medians with spread, and the JSON line format."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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
