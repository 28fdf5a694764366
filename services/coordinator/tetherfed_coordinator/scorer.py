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

from .liveness import report, report_once, resumed
from .metrics import ensure_multiproc_dir
from .scoring import Scorer, run_event_loop
from .settings import Settings
from .store import Store, redis_clients
from .topology import aclose

STOP_GRACE_S = 2.0  # after SIGTERM, a step still running this long is cancelled


async def run(settings: Settings) -> None:
    """Score until SIGTERM or SIGINT, then stop between steps."""
    if settings.redis_url is None:
        raise SystemExit("the scoring process needs TETHER_REDIS_URL")
    ensure_multiproc_dir()
    clients = redis_clients(settings.redis_url, settings.long_poll_max_s)
    scorer = Scorer(Store(*clients, settings))
    scorer.health = await resumed(clients[0], settings)
    loop = asyncio.get_running_loop()
    running = asyncio.current_task()
    assert running is not None

    def stop() -> None:
        # Between steps if one ends soon; else cancelled: a step retrying a Redis that went
        # away with the coordinator would keep this process alive for its ~15 s of retries.
        # Cancelling is safe: commits are atomic scripts, unacked entries are reclaimed.
        scorer.stopping.set()
        loop.call_later(STOP_GRACE_S, running.cancel)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    reporting = asyncio.create_task(report(clients[0], settings, scorer.health))
    try:
        await scorer.run()
    finally:
        reporting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporting
        await report_once(clients[0], settings, scorer.health)  # how its last step went
        for client in clients:
            await aclose(client)


def main() -> int:
    """Entry point."""
    with contextlib.suppress(asyncio.CancelledError):  # stopped mid-step (`STOP_GRACE_S`)
        run_event_loop(run(Settings()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
