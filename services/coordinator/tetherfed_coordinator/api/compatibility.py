"""Compatibility matrices, computed on demand from the latest snapshots of active workers (or of
every worker, so a finished run's last matrix stays readable)."""

from __future__ import annotations

from typing import Annotated, Literal

import anyio.to_thread
from fastapi import APIRouter, HTTPException, Query

from tether_protocol.messages import CompatibilitiesPublic, CompatibilityPublic, utcnow

from ..scoring import matrices
from ..store import SnapshotCache
from ..workerfacts import WorkerFacts, attach_origins
from .deps import ReaderAuth, StoreDep

router = APIRouter(prefix="/v1/federations/{fed}/compatibility", tags=["compatibility"])


@router.get("", dependencies=[ReaderAuth])
async def compatibility(
    fed: str,
    store: StoreDep,
    layer: str | None = None,
    workers: Annotated[
        Literal["active", "all"],
        Query(
            description="`active`: the workers being scored now (what decisions use); `all`: "
            "every worker's latest snapshot, lost and left ones too (a finished run's last matrix)"
        ),
    ] = "active",
) -> CompatibilityPublic | CompatibilitiesPublic:
    """All-pairs compatibility: `?layer=L` gives that layer's matrix; without it, every layer's.
    Null marks pairs that are not comparable."""
    policy = await store.policy(fed)
    # Under a sketch policy a worker's latest publish may be a sketch: score what decisions do.
    snaps = await SnapshotCache(store).active(
        fed, sketches=policy.sketch is not None, ended=workers == "all"
    )
    if policy.measure == "update_cosine":  # updates since each worker's origin
        facts = WorkerFacts(store)
        await facts.load(fed, snaps, origins=True, groups=False)
        attach_origins(snaps, facts.origins(fed))
    found = await anyio.to_thread.run_sync(lambda: matrices(snaps, policy.measure, policy.sketch))
    if layer is not None:
        if layer not in found:
            raise HTTPException(
                404,
                f"no {'' if workers == 'all' else 'active '}worker of federation {fed!r} "
                f"publishes layer {layer!r}",
            )
        found = {layer: found[layer]}
    now = utcnow()
    data = [
        CompatibilityPublic(
            layer=name,
            measure=m.measure,
            workers=m.workers,
            matrix=m.as_lists(),
            versions={w: snaps[w].version for w in m.workers},
            computed_at=now,
        )
        for name, m in found.items()
    ]
    if layer is not None:
        return data[0]
    return CompatibilitiesPublic(data=data, count=len(data))
