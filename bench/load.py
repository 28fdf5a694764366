"""Sustained load on full frames: 64 simulated workers × 4 layers of 64 × 64 publishing full
tether frames at 10 Hz each for 60 s from 2 generator processes, against one coordinator with
its scoring process. How the load is made, measured and judged: `bench.swarm`. Quick: 8
workers at 5 Hz for 5 s from 1 generator process.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from .swarm import Swarm
from .swarm import run as run_swarm


def run(quick: bool = False) -> dict[str, Any]:
    swarm = Swarm("load", 8, 5.0, 5.0, 1) if quick else Swarm("load", 64, 10.0, 60.0, 2)
    return run_swarm(swarm)


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv)))
