"""Many workers on sketches: 1,000 simulated workers × 4 layers of 64 × 64 (every layer
sketched, k = 256) publishing sketch frames at 10 Hz each for 60 s from 4 generator processes,
against one coordinator with its scoring processes (issue #17). How the load is made, measured
and judged: `bench.swarm`. Quick: 20 workers, 1 generator process, 3 s.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from tether_protocol.messages import SketchPolicy

from .swarm import Swarm
from .swarm import run as run_swarm

SKETCH = SketchPolicy(k=256, seed=1, min_values=64 * 64, full_every=1_000_000)


def run(quick: bool = False) -> dict[str, Any]:
    workers, seconds, generators = (20, 3.0, 1) if quick else (1000, 60.0, 4)
    swarm = Swarm("load-1000", workers, 10.0, seconds, generators, sketch=SKETCH)
    return run_swarm(swarm)


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv)))
