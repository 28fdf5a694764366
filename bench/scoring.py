"""All-pairs compatibility of M stacked tethers vs a single `X @ X.T` of the same matrix.

Target: time ratio ≤ 1.2 (a Python loop over pairs measured about 26× here). `ours` scores the
stacked matrix (normalization, float64 accumulation and pearson's centring included); the figure
for M separate tensors, which are gathered block by block instead of stacked, is reported too.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

from tether_protocol.compat import all_pairs, gram_scores

from .common import interleaved, line

TARGET = 1.2


def run(quick: bool = False, measure: str = "pearson") -> dict[str, Any]:
    """Benchmark all-pairs scoring; quick mode uses a small matrix and few repeats."""
    workers, values = (8, 65_536) if quick else (32, 1_048_576)
    rng = np.random.default_rng(0)
    stacked = rng.random((workers, values), dtype=np.float32)
    tensors = {f"w{i}": stacked[i] for i in range(workers)}  # views: no copy on our side either

    repeats = 3 if quick else 9
    ours, ref = interleaved(
        lambda: gram_scores(stacked, measure),  # type: ignore[arg-type]
        lambda: stacked @ stacked.T,
        repeats=repeats,
    )
    separate, ref2 = interleaved(
        lambda: all_pairs(tensors, measure),  # type: ignore[arg-type]
        lambda: stacked @ stacked.T,
        repeats=repeats,
    )
    ratio = ours.median / ref.median
    return line(
        "scoring",
        ours=ours.median,
        reference=ref.median,
        unit="s",
        ratio=ratio,
        target=f"<= {TARGET}",
        passed=ratio <= TARGET,
        params={
            "workers": workers,
            "values": values,
            "measure": measure,
            "ours_spread_s": [ours.low, ours.high],
            "reference_spread_s": [ref.low, ref.high],
            "separate_tensors_ratio": round(separate.median / ref2.median, 4),
        },
    )


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv)))
