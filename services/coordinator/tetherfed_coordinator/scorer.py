"""`python -m tetherfed_coordinator.scorer`: one scoring process (started by the coordinator).

Reads its settings from TETHER_* (the coordinator passes its own, with the Redis URL and a
consumer name of its own), joins the scoring consumer group and scores until SIGTERM, reporting
how its steps go to Redis every second (`liveness`: the coordinator's /readyz).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

from .liveness import report
from .metrics import ensure_multiproc_dir
from .scoring import Scorer, run_event_loop
from .settings import Settings
from .store import Store, redis_clients
from .topology import aclose


async def run(settings: Settings) -> None:
    """Score until SIGTERM or SIGINT, then stop between steps."""
    if settings.redis_url is None:
        raise SystemExit("the scoring process needs TETHER_REDIS_URL")
    ensure_multiproc_dir()
    clients = redis_clients(settings.redis_url, settings.long_poll_max_s)
    scorer = Scorer(Store(*clients, settings))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, scorer.stopping.set)
    reporting = asyncio.create_task(report(clients[0], settings, scorer.health))
    try:
        await scorer.run()
    finally:
        reporting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporting
        for client in clients:
            await aclose(client)


def main() -> int:
    """Entry point."""
    run_event_loop(run(Settings()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
