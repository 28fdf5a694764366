"""Generation lineage keeps a record for every generation, also those between two publishes."""

from __future__ import annotations

import httpx
import pytest
from coord_helpers import EVERY_PUBLISH, frame, worker_body

F = "/v1/federations"


@pytest.mark.anyio
async def test_generations_skipped_between_publishes_get_records(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    assert (await c.post(F, json={"name": "f", "policy": EVERY_PUBLISH})).status_code == 201
    wid = (await c.post(f"{F}/f/workers", json=worker_body("a"))).json()["worker_id"]
    url = f"{F}/f/workers/{wid}/tethers"
    assert (await c.put(url, content=frame(wid, 1, generations={"fc1": 0}))).status_code == 202
    assert (await c.put(url, content=frame(wid, 2, generations={"fc1": 3}))).status_code == 202
    lineage = (await c.get(f"{url}/fc1/generations")).json()["data"]
    assert [g["generation"] for g in lineage] == [1, 2, 3]
    assert [g["retained"] for g in lineage] == [False, False, True]
    assert all(g["parents"][0]["version"] == 1 for g in lineage), "own parent is the last publish"
