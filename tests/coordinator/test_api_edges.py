"""the API's edges as schemathesis found them, against the real app."""

from __future__ import annotations

import httpx
import jsonschema
import pytest
from coord_helpers import worker_body

pytestmark = pytest.mark.anyio
F = "/v1/federations"
HUGE = "217521419154055359365120"  # beyond int64: Redis cannot hold it as an id


async def test_ids_beyond_int64_are_a_422_not_a_500(app_client: httpx.AsyncClient) -> None:
    await app_client.post(F, json={"name": "x"})
    wid = (await app_client.post(f"{F}/x/workers", json=worker_body())).json()["worker_id"]
    ack = {"outcome": "applied", "generation": 1}
    calls = [
        app_client.post(f"{F}/x/decisions/{HUGE}/ack", json=ack),
        app_client.get(f"{F}/x/decisions/{HUGE}/ack"),
        app_client.get(f"{F}/x/decisions?after={HUGE}"),
        app_client.get(f"{F}/x/workers/{wid}/decisions?after={HUGE}"),
        app_client.get(f"{F}/x/workers/{wid}/tethers/fc1?generation={HUGE}"),
    ]
    for call in calls:
        r = await call
        assert r.status_code == 422, (r.request.url, r.status_code, r.text)
    # The stream's Last-Event-ID is a decision id in the schema too: the same 422.
    r = await app_client.get(f"{F}/x/decisions/stream", headers={"last-event-id": HUGE})
    assert r.status_code == 422, r.text


async def test_the_ack_schema_requires_what_the_api_requires(app_client: httpx.AsyncClient) -> None:
    doc = (await app_client.get("/openapi.json")).json()
    schema = {**doc["components"]["schemas"]["AckCreate"], "components": doc["components"]}
    validator = jsonschema.Draft202012Validator(schema)
    assert not validator.is_valid({"outcome": "applied"}), "schema accepts what the API refuses"
    assert not validator.is_valid({"outcome": "rejected"})
    assert validator.is_valid({"outcome": "applied", "generation": 1})
    assert validator.is_valid({"outcome": "rejected", "reason": "stale"})
    r = await app_client.post(f"{F}/x/decisions/1/ack", json={"outcome": "applied"})
    assert r.status_code in (404, 422)


async def test_every_operation_documents_its_error_statuses(app_client: httpx.AsyncClient) -> None:
    doc = (await app_client.get("/openapi.json")).json()
    missing = [
        f"{method.upper()} {path}: {code}"
        for path, operations in doc["paths"].items()
        for method, operation in operations.items()
        for code in ("400", "401", "404", "409", "422", "503")
        if code not in operation["responses"]
    ]
    assert not missing, missing


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", F, "GET, HEAD, POST"),
        ("PUT", f"{F}/x/workers/w", "DELETE, GET, HEAD"),
        ("POST", f"{F}/x", "DELETE, GET, HEAD"),
        ("PATCH", "/healthz", "GET, HEAD"),
    ],
)
async def test_a_405_names_every_method_of_the_path(
    app_client: httpx.AsyncClient, method: str, path: str, allow: str
) -> None:
    r = await app_client.request(method, path)
    assert r.status_code == 405
    assert r.headers["allow"] == allow
    assert r.json() == {"detail": "Method Not Allowed"}
