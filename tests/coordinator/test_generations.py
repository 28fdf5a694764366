"""Generation lineage keeps a record for every generation, also those between two publishes."""

from __future__ import annotations

import httpx
import numpy as np
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


@pytest.mark.anyio
async def test_the_lineage_route_is_in_openapi_and_a_registered_name_wins_over_its_suffix(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    paths = (await c.get("/openapi.json")).json()["paths"]
    lineage = paths["/v1/federations/{fed}/workers/{wid}/tethers/{layer}/generations"]["get"]
    assert lineage["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/GenerationsPublic"
    )
    assert (await c.post(F, json={"name": "f", "policy": EVERY_PUBLISH})).status_code == 201
    # One layer named like the other's lineage route: "a" and "a/generations".
    layers = [
        {"name": "a", "shape": [2, 2], "dtype": "float32"},
        {"name": "a/generations", "shape": [3], "dtype": "float32"},
    ]
    body = {"name": "w", "layers": layers, "meta": {}}
    wid = (await c.post(f"{F}/f/workers", json=body)).json()["worker_id"]
    url = f"{F}/f/workers/{wid}/tethers"
    data = {"a": np.full((2, 2), 0.5, np.float32), "a/generations": np.full(3, 0.25, np.float32)}
    assert (await c.put(url, content=frame(wid, 1, data=data))).status_code == 202
    own = await c.get(f"{url}/a/generations", params={"format": "stats"})
    assert own.status_code == 200 and own.json()["layer"] == "a/generations", own.text
    assert (await c.get(f"{url}/a/generations/generations")).json()["layer"] == "a/generations"
    missing = await c.get(f"{url}/b/generations")
    assert missing.status_code == 404 and "no layer 'b'" in missing.json()["detail"]
