"""The OpenAPI document says what the server accepts: requests valid by the schema are not
refused for it, and requests the schema refuses are not taken."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.anyio
F = "/v1/federations"


async def test_a_null_patch_field_leaves_the_policy_unchanged(
    app_client: httpx.AsyncClient,
) -> None:
    await app_client.post(F, json={"name": "x"})
    r = await app_client.patch(f"{F}/x/policy", json={"measure": None, "cooldown_steps": 3})
    assert r.status_code == 200, r.text
    assert r.json()["measure"] == "pearson" and r.json()["cooldown_steps"] == 3
    r = await app_client.patch(f"{F}/x/policy", json={"drift_threshold": None})
    assert r.status_code == 200 and r.json()["drift_threshold"] is None  # null: never drift


async def test_what_the_schema_refuses_is_refused(app_client: httpx.AsyncClient) -> None:
    doc = (await app_client.get("/openapi.json")).json()["components"]["schemas"]
    assert doc["SketchPolicy"]["properties"]["force"]["type"] == "boolean"
    r = await app_client.post(F, json={"name": "x", "policy": {"sketch": {"force": 0}}})
    assert r.status_code == 422, r.text
    listed = doc["Policy"]["properties"]["layers"]["anyOf"][0]
    assert listed["minItems"] == 1
    r = await app_client.post(F, json={"name": "x", "policy": {"layers": []}})
    assert r.status_code == 422, r.text
