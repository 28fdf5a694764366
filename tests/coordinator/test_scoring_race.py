"""Two scorers racing on one worker: the commit is a compare-and-set on its scored version."""

from __future__ import annotations

import httpx
import pytest
from coord_helpers import EVERY_PUBLISH, frame, tensors, worker_body

from tether_protocol.messages import Policy
from tetherfed_coordinator.scoring import RACED
from tetherfed_coordinator.settings import Settings

F = "/v1/federations"


@pytest.fixture
def coordinator_settings(coordinator_settings: Settings) -> Settings:
    """No background scoring: this test plays both scorers itself."""
    return coordinator_settings.model_copy(update={"scoring_enabled": False})


@pytest.mark.anyio
async def test_a_round_computed_on_stale_state_is_refused(app_client: httpx.AsyncClient) -> None:
    c = app_client
    scorer = c.app.state.scorer  # type: ignore[attr-defined]
    assert (await c.post(F, json={"name": "f", "policy": EVERY_PUBLISH})).status_code == 201
    a = (await c.post(f"{F}/f/workers", json=worker_body("a"))).json()
    b = (await c.post(f"{F}/f/workers", json=worker_body("b"))).json()
    base = tensors(1)
    for reg in (a, b):
        wid = reg["worker_id"]
        await c.put(f"{F}/f/workers/{wid}/tethers", content=frame(wid, 1, base))
    assert await scorer.score("f", b["worker_id"]), "the first round made no decision"
    # Prepare: b publishes again; a round for it computed as if nothing had been scored yet.
    bw = b["worker_id"]
    await c.put(f"{F}/f/workers/{bw}/tethers", content=frame(bw, 2, base))
    snaps = await scorer.cache.active("f", include=[bw])
    states = await scorer._states("f", [bw], snaps)
    rounds = scorer._decide_batch(Policy.model_validate(EVERY_PUBLISH), states, snaps)
    before = (await c.get(f"{F}/f/decisions")).json()["count"]
    # Execute: commit it with the stale read (version 0).
    replies = await scorer._commit_batch(
        "f", Policy.model_validate(EVERY_PUBLISH), snaps, rounds, {bw: 0}
    )
    # Assert: refused, and nothing written by it; the same round read at the right version commits.
    assert replies[bw] == RACED, f"a stale round was committed: {replies[bw]}"
    assert (await c.get(f"{F}/f/decisions")).json()["count"] == before
    fresh = await scorer._commit_batch(
        "f", Policy.model_validate(EVERY_PUBLISH), snaps, rounds, {bw: 1}
    )
    assert isinstance(fresh[bw], list) and fresh[bw], fresh
