"""A worker that left can come back under its id (a run resumed from a checkpoint)."""

from __future__ import annotations

import httpx
import pytest
from coord_helpers import EVERY_PUBLISH, frame, worker_body

F = "/v1/federations"


@pytest.mark.anyio
async def test_rejoin_after_leave_restores_publishing(app_client: httpx.AsyncClient) -> None:
    c = app_client
    assert (await c.post(F, json={"name": "f", "policy": EVERY_PUBLISH})).status_code == 201
    wid = (await c.post(f"{F}/f/workers", json=worker_body("a"))).json()["worker_id"]
    assert (await c.delete(f"{F}/f/workers/{wid}")).status_code == 204
    refused = await c.put(f"{F}/f/workers/{wid}/tethers", content=frame(wid))
    assert refused.status_code == 409
    back = await c.post(f"{F}/f/workers/{wid}/rejoin")
    assert back.status_code == 200 and back.json()["status"] == "active"
    assert (await c.put(f"{F}/f/workers/{wid}/tethers", content=frame(wid))).status_code == 202
    assert (await c.post(f"{F}/f/workers/nope/rejoin")).status_code == 404
