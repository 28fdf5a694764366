"""`fedavg_within = "group"` on the coordinator: the scorer reads each worker's registered group
and FedAvg merges pair workers of one group only."""

from __future__ import annotations

import httpx
import pytest
from coord_helpers import LAYERS, frame
from test_api import scored

pytestmark = pytest.mark.anyio
F = "/v1/federations"
ORACLE = {"fedavg_every": 2, "fedavg_within": "group", "cooldown_steps": 0}


async def test_fedavg_merges_stay_inside_groups(app_client: httpx.AsyncClient) -> None:
    c = app_client
    assert (await c.post(F, json={"name": "f", "policy": ORACLE})).status_code == 201
    group = {}
    for name, g in (("a", "x"), ("b", "y"), ("c", "x"), ("d", "y")):
        body = {"name": name, "layers": LAYERS, "meta": {"group": g}}
        r = await c.post(f"{F}/f/workers", json=body)
        assert r.status_code == 201, r.text
        group[r.json()["worker_id"]] = g
    for step in (2, 4):  # each a multiple of fedavg_every: every publish averages
        for wid in group:
            r = await c.put(f"{F}/f/workers/{wid}/tethers", content=frame(wid, step))
            assert r.status_code == 202, r.text
        await scored(c)
    merges = (await c.get(f"{F}/f/decisions?action=merge&limit=100")).json()["data"]
    assert merges, "fedavg within groups decided no merge"
    for d in merges:
        assert group[d["worker_id"]] == group[d["partner_id"]], d
    # at step 4 every worker sees its group's other member
    assert {d["worker_id"] for d in merges} == set(group)
