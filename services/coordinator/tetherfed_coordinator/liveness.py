"""Whether this coordinator can make decisions: its scorers run and their steps succeed, and its
Redis keeps what it is given.

`/readyz` answered 200 while no decision could be made: a scoring process crash-looping at
start-up, or every scoring step failing (Redis evicting the coordinator's keys, out of memory).
Each scorer keeps a `ScorerHealth`; a scoring thread's is read in place, a scoring process
reports its own to Redis every `REPORT_S` (hash `<prefix>scorers`, one field per consumer).
`problem()` names what is wrong, or None.

Redis must not evict the coordinator's keys: a federation, a worker record or the decision
counter has no TTL and cannot be rebuilt. `check_eviction` refuses to start on a server whose
`maxmemory-policy` is `allkeys-*` (any key may go), unless `TETHER_ALLOW_EVICTION` is set (then
it warns). `volatile-*` only evicts keys with a TTL; the coordinator's are soft (a worker's
liveness, which its next heartbeat restores; a pinned partner snapshot, whose decision is then
acked rejected; an upload in progress, which fails with 503 and is published again), so it is
accepted with a warning; `noeviction` refuses writes when memory is full (503s, nothing lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from .settings import Settings

log = logging.getLogger(__name__)

REPORT_S = 1.0  # a scoring process reports this often
STALE_S = 10.0  # a scoring process silent this long is not scoring (dead, crash-looping, stuck)
FAILING = 3  # failed scoring steps, none scoring anything between them: scoring is failing
RECENT_S = 60.0  # ... the last of them this recent


@dataclass
class ScorerHealth:
    """How one scorer's steps went: failures since the last step that scored something, the
    time of the last failure, and its error. Idle steps (nothing to score) change nothing: a
    scorer failing on every entry it gets is failing however idle it is between them."""

    failures: int = 0
    failed_at: float = 0.0  # time.time()
    error: str = ""

    def succeeded(self) -> None:
        self.failures, self.error = 0, ""

    def failed(self, exc: BaseException) -> None:
        self.failures, self.failed_at = self.failures + 1, time.time()
        self.error = f"{type(exc).__name__}: {exc}"[:500]

    def problem(self) -> str | None:
        """Why this scorer makes no decisions, or None. Failures older than `RECENT_S` do not
        count: with no work left to fail on, the next publish tells."""
        if self.failures >= FAILING and time.time() - self.failed_at < RECENT_S:
            return f"its last {self.failures} scoring steps failed ({self.error})"
        return None


def scorers_key(settings: Settings) -> str:
    """The hash scoring processes report to (one field per consumer name)."""
    return f"{settings.key_prefix}scorers"


async def report(r: Any, settings: Settings, health: ScorerHealth) -> None:
    """Report `health` (with the time of the report) every `REPORT_S` until cancelled; a failed
    report is skipped (a silent scorer reads as not scoring). The field stays when the scorer
    stops (its report ages; one started again under the name replaces it): deleting it on the
    way out would wait on a Redis that may be gone, the retries keeping a dying scorer alive."""
    key, field = scorers_key(settings), settings.consumer_name
    while True:
        try:
            await r.hset(key, field, json.dumps(asdict(health) | {"reported": time.time()}))
        except (aioredis.RedisError, OSError) as exc:
            log.warning("scorer health report failed: %s", exc)
        await asyncio.sleep(REPORT_S)


async def report_once(r: Any, settings: Settings, health: ScorerHealth) -> None:
    """One report, given at most a second (a scorer on its way out)."""
    payload = json.dumps(asdict(health) | {"reported": time.time()})
    with contextlib.suppress(aioredis.RedisError, OSError, TimeoutError):
        await asyncio.wait_for(r.hset(scorers_key(settings), settings.consumer_name, payload), 1)


async def resumed(r: Any, settings: Settings) -> ScorerHealth:
    """The health a scoring process started again under the same consumer name carries on
    from: its predecessor's recent failures, so one dying on every entry it gets reads as
    failing rather than starting afresh each time."""
    try:
        found = await r.hget(scorers_key(settings), settings.consumer_name)
        before = json.loads(found) if found else {}
        before.pop("reported", None)
        health = ScorerHealth(**before)
    except (aioredis.RedisError, OSError, ValueError, TypeError):
        return ScorerHealth()
    return health if time.time() - health.failed_at < RECENT_S else ScorerHealth()


async def problem(r: Any, settings: Settings, scoring: object) -> str | None:
    """Why this coordinator cannot make decisions now, or None (scoring off: never)."""
    if scoring is None:
        return None
    consumers = getattr(scoring, "consumers", None)
    if consumers is None:  # on a thread of this process
        own: ScorerHealth | None = scoring.health()  # type: ignore[attr-defined]
        return "the scoring thread has stopped" if own is None else own.problem()
    names: list[str] = consumers()
    procs = getattr(scoring, "procs", [None] * len(names))
    raw = await r.hmget(scorers_key(settings), names)
    now, why = time.time(), []
    for name, proc, found in zip(names, procs, raw, strict=True):
        if proc is not None and proc.poll() is not None:
            why.append(f"scoring process {name} exited with code {proc.returncode}")
        elif found is None:
            why.append(f"scoring process {name} has not reported")
            continue
        health = json.loads(found)
        silent = now - float(health.pop("reported", 0))
        if silent > STALE_S:
            why.append(f"scoring process {name} silent for {silent:.0f} s")
        elif (trouble := ScorerHealth(**health).problem()) is None:
            return None  # one scorer working is enough: it takes every entry
        else:
            why.append(f"scoring process {name}: {trouble}")
    return "; ".join(why)


EVICTING = ("allkeys-lru", "allkeys-lfu", "allkeys-random")


def _policies(reply: Any) -> set[str]:
    """Every maxmemory-policy in a CONFIG GET reply (a dict, or one per cluster node)."""
    if isinstance(reply, dict):
        found = set()
        for key, value in reply.items():
            if key in ("maxmemory-policy", b"maxmemory-policy"):
                found.add(value.decode() if isinstance(value, bytes) else str(value))
            elif isinstance(value, (dict, list)):
                found |= _policies(value)
        return found
    if isinstance(reply, list):
        return {p for item in reply for p in _policies(item)}
    return set()


async def check_eviction(r: Any, settings: Settings) -> None:
    """Refuse (RuntimeError) a Redis that may evict any key, unless `allow_eviction`; warn about
    one that may evict keys with a TTL, and when the policy cannot be read."""
    try:
        if isinstance(r, RedisCluster):  # every primary's own setting
            reply = await r.config_get("maxmemory-policy", target_nodes=RedisCluster.PRIMARIES)
        else:
            reply = await r.config_get("maxmemory-policy")
    except aioredis.ResponseError as exc:  # CONFIG renamed or forbidden (managed Redis)
        log.warning(
            "cannot read Redis's maxmemory-policy (%s): make sure it is noeviction or "
            "volatile-*; a policy that evicts any key loses federations and workers",
            exc,
        )
        return
    policies = _policies(reply)
    evicting = sorted(p for p in policies if p in EVICTING)
    if evicting:
        message = (
            f"Redis has maxmemory-policy {', '.join(evicting)}: when full it evicts any key, "
            "the coordinator's federations, worker records and decision counter included "
            "(workers then get 404 and every scoring round fails). Set it to noeviction "
            "(CONFIG SET maxmemory-policy noeviction, or in redis.conf), or run with "
            "TETHER_ALLOW_EVICTION=1 to start anyway"
        )
        if not settings.allow_eviction:
            raise RuntimeError(message)
        log.warning("%s (started anyway: TETHER_ALLOW_EVICTION is set)", message)
    elif any(p.startswith("volatile-") for p in policies):
        log.warning(
            "Redis has maxmemory-policy %s: when full it evicts keys with a TTL (worker "
            "liveness, pinned snapshots, uploads in progress); noeviction keeps them",
            ", ".join(sorted(policies)),
        )
