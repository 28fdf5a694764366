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


@pytest.mark.parametrize("header", ["null", "", "-1", "1.5", "9223372036854775808", " 12a"])
async def test_a_last_event_id_that_is_no_decision_id_is_refused_as_the_schema_says(
    app_client: httpx.AsyncClient, header: str
) -> None:
    """The schema states the header's format (a decision id: an integer in [0, 2**63-1]), so
    the server's 422 for `Last-Event-ID: null` is what the document shows, not a 400 the
    schema (once "any string") did not allow for."""
    doc = (await app_client.get("/openapi.json")).json()
    stream = doc["paths"][f"{F}/{{fed}}/decisions/stream"]["get"]
    (param,) = [p for p in stream["parameters"] if p["name"].lower() == "last-event-id"]
    integer = next(s for s in param["schema"]["anyOf"] if s.get("type") == "integer")
    assert integer["minimum"] == 0 and integer["maximum"] == 2**63 - 1
    await app_client.post(F, json={"name": "x"})
    r = await app_client.get(f"{F}/x/decisions/stream", headers={"last-event-id": header})
    assert r.status_code == 422, r.text


async def test_a_duplicated_layer_name_is_refused_and_the_schema_says_so(
    app_client: httpx.AsyncClient,
) -> None:
    """JSON Schema cannot state "unique by name" (uniqueItems compares whole items): the field's
    description states it, and the 422 names the layer."""
    doc = (await app_client.get("/openapi.json")).json()["components"]["schemas"]
    assert "appears once" in doc["WorkerCreate"]["properties"]["layers"]["description"]
    await app_client.post(F, json={"name": "x"})
    layer = {"name": "fc1", "shape": [2]}
    r = await app_client.post(f"{F}/x/workers", json={"name": "w", "layers": [layer, layer]})
    assert r.status_code == 422 and "'fc1' appears twice" in r.text, r.text


async def test_a_boolean_is_no_number(app_client: httpx.AsyncClient) -> None:
    """The schema says number (or integer) where a boolean is sent: the server must refuse it."""
    r = await app_client.post(F, json={"name": "x", "policy": {"sync_timeout_s": True}})
    assert r.status_code == 422, r.text
    r = await app_client.post(F, json={"name": "y", "policy": {"merge_threshold": True}})
    assert r.status_code == 422 and "must be a number, not a boolean" in r.text, r.text
    assert (await app_client.post(F, json={"name": "ok"})).status_code == 201
    layer = {"name": "fc1", "shape": [True, 2]}
    r = await app_client.post(f"{F}/ok/workers", json={"name": "w", "layers": [layer]})
    assert r.status_code == 422 and "must be a number, not a boolean" in r.text, r.text
    r = await app_client.post(F, json={"name": "z", "policy": {"sketch": {"force": True}}})
    assert r.status_code == 201, r.text  # a boolean where the schema says boolean
