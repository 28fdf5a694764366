"""Strings that UTF-8 cannot encode (a lone surrogate: `"\\ud800"` is a legal JSON escape) are
refused wherever a request carries text, the 422 that refuses them encodes, and a worker record
an earlier version stored with one is still served."""

from __future__ import annotations

import json

import httpx
import pytest
from coord_helpers import worker_body

pytestmark = pytest.mark.anyio
F = "/v1/federations"
LONE = ["\\ud800", "\\udfff", "a\\udc80b", "\\ud83d"]  # JSON escapes; "\\ud83d\\ude00" is fine


async def send(client: httpx.AsyncClient, method: str, path: str, raw: str) -> httpx.Response:
    """A JSON body written by hand: json.dumps would escape the surrogate the same way, but
    this keeps the request exactly what a client put on the wire."""
    headers = {"content-type": "application/json"}
    return await client.request(method, path, content=raw.encode(), headers=headers)


def assert_refused(r: httpx.Response, what: str) -> None:
    assert r.status_code == 422, (what, r.status_code, r.text)
    r.json()  # the body is valid UTF-8 JSON
    assert "\\\\u" in r.text or "lone surrogate" in r.text or "unicode" in r.text, r.text


async def test_every_request_text_with_a_lone_surrogate_is_a_422_that_encodes(
    app_client: httpx.AsyncClient,
) -> None:
    await app_client.post(F, json={"name": "x"})
    wid = (await app_client.post(f"{F}/x/workers", json=worker_body())).json()["worker_id"]
    layers = '[{"name": "fc1", "shape": [4, 2]}]'
    for bad in LONE:
        cases = {
            "meta value": (
                "POST",
                f"{F}/x/workers",
                f'{{"name": "w", "layers": {layers}, "meta": {{"k": "{bad}"}}}}',
            ),
            "meta key": (
                "POST",
                f"{F}/x/workers",
                f'{{"name": "w", "layers": {layers}, "meta": {{"{bad}": 1}}}}',
            ),
            "layer name": (
                "POST",
                f"{F}/x/workers",
                f'{{"name": "w", "layers": [{{"name": "{bad}", "shape": [1]}}]}}',
            ),
            "worker name": ("POST", f"{F}/x/workers", f'{{"name": "{bad}", "layers": {layers}}}'),
            "policy layers": ("POST", F, f'{{"name": "y", "policy": {{"layers": ["{bad}"]}}}}'),
            "patched layers": ("PATCH", f"{F}/x/policy", f'{{"layers": ["{bad}"]}}'),
            "patched measure": ("PATCH", f"{F}/x/policy", f'{{"measure": "{bad}"}}'),
            "ack reason": (
                "POST",
                f"{F}/x/decisions/1/ack",
                f'{{"outcome": "rejected", "reason": "{bad}"}}',
            ),
            "session": (
                "POST",
                f"{F}/x/workers/{wid}/heartbeat",
                f'{{"step": 1, "epoch": 0, "session": "{bad}"}}',
            ),
            "telemetry layer": (
                "POST",
                f"{F}/x/workers/{wid}/telemetry",
                f'{{"data": [{{"metric": "gzip_ratio", "layer": "{bad}", '
                f'"step": 1, "epoch": 0, "value": 1.0}}]}}',
            ),
            "unknown field": ("POST", F, f'{{"name": "z", "{bad}": 1}}'),
        }
        for what, (method, path, raw) in cases.items():
            assert_refused(await send(app_client, method, path, raw), f"{what} {bad}")
    # Nothing was stored: the workers still read, the policy still has its layers.
    r = await app_client.get(f"{F}/x/workers")
    assert r.status_code == 200 and r.json()["count"] == 1, r.text
    assert (await app_client.get(f"{F}/x")).json()["policy"]["layers"] == "all"
    assert (await app_client.get(f"{F}/y")).status_code == 404
    # A surrogate pair is a character like any other.
    raw = f'{{"name": "w2", "layers": {layers}, "meta": {{"emoji": "\\ud83d\\ude00 é"}}}}'
    r = await send(app_client, "POST", f"{F}/x/workers", raw)
    assert r.status_code == 201, r.text
    r = await app_client.get(f"{F}/x/workers/{r.json()['worker_id']}")
    assert r.json()["meta"] == {"emoji": "😀 é"}


async def test_a_worker_stored_with_a_lone_surrogate_is_still_served(
    app_client: httpx.AsyncClient,
) -> None:
    """State an earlier version stored: the surrogate is spelled out in what is served."""
    store = app_client.app.state.store  # type: ignore[attr-defined]
    await app_client.post(F, json={"name": "x"})
    wid = (await app_client.post(f"{F}/x/workers", json=worker_body())).json()["worker_id"]
    poisoned = json.dumps({"host": "\ud800", "\udfff": 1})  # ASCII: how it was stored
    await store.r.hset(store.keys.worker("x", wid), "meta", poisoned)
    for path in (f"{F}/x/workers", f"{F}/x/workers/{wid}"):
        r = await app_client.get(path)
        assert r.status_code == 200, (path, r.text)
    assert r.json()["meta"] == {"host": "\\ud800", "\\udfff": 1}
    assert (await app_client.delete(f"{F}/x/workers/{wid}")).status_code == 204
    assert (await app_client.get(f"{F}/x/workers")).status_code == 200
