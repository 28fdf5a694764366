"""REST API against the real app (in-process ASGI) and real Redis."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
from coord_helpers import EVERY_PUBLISH, LAYERS, frame, keys_of, tensors, worker_body
from safetensors.numpy import load as st_load

from tether_protocol.frame import encode_frame
from tether_protocol.messages import SnapshotMeta
from tetherfed_coordinator.app import create_app
from tetherfed_coordinator.settings import Settings

pytestmark = pytest.mark.anyio
F = "/v1/federations"


async def setup_pair(c: httpx.AsyncClient, policy: Any = None) -> tuple[dict, dict]:
    r = await c.post(F, json={"name": "f", "policy": policy or EVERY_PUBLISH})
    assert r.status_code == 201, r.text
    a = (await c.post(f"{F}/f/workers", json=worker_body("a"))).json()
    b = (await c.post(f"{F}/f/workers", json=worker_body("b"))).json()
    return a, b


async def wait_decisions(c: httpx.AsyncClient, n: int, query: str = "") -> list[dict]:
    with anyio.fail_after(15):
        while True:
            data = (await c.get(f"{F}/f/decisions?{query}")).json()["data"]
            if len(data) >= n:
                return data
            await anyio.sleep(0.05)


async def test_health_readiness_metrics_openapi(app_client: httpx.AsyncClient) -> None:
    c = app_client
    assert (await c.get("/healthz")).json() == {"status": "ok"}
    assert (await c.get("/readyz")).status_code == 200
    metrics = (await c.get("/metrics")).text
    for name in (
        "tetherfed_requests_total",
        "tetherfed_publishes_total",
        "tetherfed_bytes_in_total",
        "tetherfed_scoring_seconds_total",
        "tetherfed_decisions_total",
        "tetherfed_scoring_backlog",
    ):
        assert name in metrics, f"expected {name} in /metrics"
    schema = (await c.get("/openapi.json")).json()
    assert schema["openapi"].startswith("3.")
    assert "/v1/federations/{fed}/workers/{wid}/tethers" in schema["paths"]
    put = schema["paths"]["/v1/federations/{fed}/workers/{wid}/tethers"]["put"]
    assert "application/octet-stream" in put["requestBody"]["content"]
    assert (await c.get("/docs")).status_code == 200


async def test_openapi_schema_is_valid(app_client: httpx.AsyncClient) -> None:
    schema = (await app_client.get("/openapi.json")).json()
    refs = json.dumps(schema).count('"$ref"')
    assert refs and all(
        ref.split("/")[-1] in schema["components"]["schemas"] for ref in _refs(schema)
    ), "every $ref must resolve"
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            assert op.get("responses"), f"{method.upper()} {path} documents no responses"


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


async def test_federation_crud(app_client: httpx.AsyncClient) -> None:
    c = app_client
    assert (await c.post(F, json={"name": "f", "policy": "seed"})).status_code == 201
    dup = await c.post(F, json={"name": "f"})
    assert dup.status_code == 409 and dup.json()["detail"] == "federation 'f' already exists"
    bad = await c.post(
        F, json={"name": "g", "policy": {"merge_threshold": 0.1, "drift_threshold": 0.4}}
    )
    assert bad.status_code == 422
    assert (await c.get(F)).json()["count"] == 1
    got = (await c.get(f"{F}/f")).json()
    assert got["policy"]["measure"] == "dot" and got["workers"] == 0
    missing = await c.get(f"{F}/nope")
    assert missing.status_code == 404 and missing.json()["detail"] == "federation 'nope' not found"
    patched = await c.patch(f"{F}/f/policy", json={"merge_threshold": 80.0})
    assert patched.status_code == 200 and patched.json()["merge_threshold"] == 80.0
    invalid = await c.patch(f"{F}/f/policy", json={"measure": "pearson"})
    assert invalid.status_code == 422 and "outside [-1, 1]" in invalid.json()["detail"]
    assert (await c.get(f"{F}/f")).json()["policy"]["measure"] == "dot", (
        "invalid patch changed state"
    )
    assert (await c.patch(f"{F}/nope/policy", json={})).status_code == 404
    assert (await c.delete(f"{F}/f")).status_code == 204
    assert (await c.get(f"{F}/f")).status_code == 404
    assert (await c.delete(f"{F}/f")).status_code == 404


async def test_delete_federation_removes_keys(
    app_client: httpx.AsyncClient, redis_url: str, key_prefix: str
) -> None:
    a, _ = await setup_pair(app_client)
    await app_client.put(f"{F}/f/workers/{a['worker_id']}/tethers", content=frame(a["worker_id"]))
    assert any(b"{f}" in k for k in keys_of(redis_url, key_prefix))
    assert (await app_client.delete(f"{F}/f")).status_code == 204
    left = {k for k in keys_of(redis_url, key_prefix) if b"{f}" in k}
    assert not left, f"expected no federation keys after delete, found {left}"


async def test_workers(app_client: httpx.AsyncClient) -> None:
    c = app_client
    assert (await c.post(f"{F}/nope/workers", json=worker_body())).status_code == 404
    a, _ = await setup_pair(c)
    wid = a["worker_id"]
    assert wid.startswith("a-") and a["token"]
    listed = (await c.get(f"{F}/f/workers")).json()
    assert listed["count"] == 2 and {w["status"] for w in listed["data"]} == {"active"}
    hb = await c.post(
        f"{F}/f/workers/{wid}/heartbeat",
        json={"step": 7, "epoch": 1, "loss": 0.5, "grad_norm": 1.0},
    )
    assert hb.status_code == 204
    one = (await c.get(f"{F}/f/workers/{wid}")).json()
    assert (one["step"], one["epoch"], one["loss"]) == (7, 1, 0.5)
    missing = await c.get(f"{F}/f/workers/zz")
    assert missing.json()["detail"] == "worker 'zz' not found in federation 'f'"
    assert (
        await c.post(f"{F}/f/workers/zz/heartbeat", json={"step": 1, "epoch": 0})
    ).status_code == 404
    bad = await c.post(f"{F}/f/workers", json={"name": "x", "layers": [LAYERS[0], LAYERS[0]]})
    assert bad.status_code == 422
    assert (await c.delete(f"{F}/f/workers/{wid}")).status_code == 204
    assert (await c.get(f"{F}/f/workers/{wid}")).json()["status"] == "left"
    again = await c.post(f"{F}/f/workers/{wid}/heartbeat", json={"step": 8, "epoch": 1})
    assert again.status_code == 409
    assert (await c.put(f"{F}/f/workers/{wid}/tethers", content=frame(wid))).status_code == 409


def _bad_frames(wid: str) -> dict[str, tuple[bytes, int, str]]:
    good = frame(wid)
    nan = tensors(1)
    nan["fc1"][0, 0] = np.nan
    inf = tensors(1)
    inf["fc2"][1, 1] = np.inf
    wrong_shape = tensors(1) | {"fc1": np.zeros((4, 8), np.float32)}
    meta = SnapshotMeta(worker_id=wid, step=1, epoch=0)
    return {
        "nan": (frame(wid, data=nan), 422, "layer 'fc1' contains NaN or Inf"),
        "inf": (frame(wid, data=inf), 422, "layer 'fc2' contains NaN or Inf"),
        "shape": (
            frame(wid, data=wrong_shape),
            422,
            "layer 'fc1' has shape [4, 8]; registered [8, 4]",
        ),
        "dtype": (
            encode_frame(tensors(1), meta.model_copy(update={"wire_dtype": "float16"}), "float16"),
            422,
            "registered float32",
        ),
        "missing layer": (frame(wid, data={"fc1": tensors(1)["fc1"]}), 422, "missing ['fc2']"),
        "truncated": (good[:-10], 400, "truncated or padded"),
        "short": (b"\x01\x02", 400, "8-byte header length"),
        "garbage header": (b"\x08" + b"\x00" * 7 + b"not json", 400, "header is not valid JSON"),
        "other worker": (frame("someone-else"), 400, "names worker 'someone-else'"),
        "no metadata": (encode_frame(tensors(1)), 400, "no snapshot metadata"),
    }


async def test_bad_frames_leave_state_unchanged(
    app_client: httpx.AsyncClient, redis_url: str, key_prefix: str
) -> None:
    a, _ = await setup_pair(app_client)
    wid = a["worker_id"]
    before = keys_of(redis_url, key_prefix)
    for label, (body, status, detail) in _bad_frames(wid).items():
        r = await app_client.put(f"{F}/f/workers/{wid}/tethers", content=body)
        assert r.status_code == status, f"{label}: expected {status}, got {r.status_code} {r.text}"
        assert detail in r.json()["detail"], f"{label}: {r.json()['detail']!r} lacks {detail!r}"
    assert keys_of(redis_url, key_prefix) == before, "a rejected publish wrote keys"
    assert (await app_client.get(f"{F}/f/workers/{wid}")).json()["snapshot_version"] == 0
    r = await app_client.put(f"{F}/f/workers/zz/tethers", content=frame("zz"))
    assert r.status_code == 404 and "worker 'zz' not found" in r.json()["detail"]
    r = await app_client.put(f"{F}/g/workers/{wid}/tethers", content=frame(wid))
    assert r.status_code == 404 and r.json()["detail"] == "federation 'g' not found"


@pytest.fixture
async def small_client(coordinator_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    settings = coordinator_settings.model_copy(
        update={"max_frame_bytes": 1000, "heartbeat_ttl_s": 0.6}
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://c") as client:
            yield client


async def test_oversize_rejected_while_streaming(small_client: httpx.AsyncClient) -> None:
    a, _ = await setup_pair(small_client)
    wid = a["worker_id"]
    big = frame(
        wid, data={"fc1": np.zeros((8, 4), np.float32), "fc2": np.zeros((4, 2), np.float32)}
    )
    big += b" " * 1000
    r = await small_client.put(f"{F}/f/workers/{wid}/tethers", content=big)
    assert r.status_code == 413 and r.json()["detail"] == "frame exceeds the maximum of 1000 bytes"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 300

    r = await small_client.put(f"{F}/f/workers/{wid}/tethers", content=chunks())
    assert r.status_code == 413
    assert (await small_client.get(f"{F}/f/workers/{wid}")).json()["snapshot_version"] == 0


async def test_lost_worker_leaves_scoring_and_returns(small_client: httpx.AsyncClient) -> None:
    c = small_client
    a, b = await setup_pair(c)
    await anyio.sleep(0.8)
    statuses = {w["worker_id"]: w["status"] for w in (await c.get(f"{F}/f/workers")).json()["data"]}
    assert statuses == {a["worker_id"]: "lost", b["worker_id"]: "lost"}
    base = tensors(3)
    await c.put(f"{F}/f/workers/{a['worker_id']}/tethers", content=frame(a["worker_id"], 1, base))
    await anyio.sleep(0.8)  # a is lost again; b publishes and finds no active peer
    await c.put(
        f"{F}/f/workers/{b['worker_id']}/tethers",
        content=frame(b["worker_id"], 1, tensors(4, base)),
    )
    await anyio.sleep(0.5)
    assert (await c.get(f"{F}/f/decisions")).json()["count"] == 0
    await c.post(f"{F}/f/workers/{a['worker_id']}/heartbeat", json={"step": 1, "epoch": 0})
    assert (await c.get(f"{F}/f/workers/{a['worker_id']}")).json()["status"] == "active"
    await c.put(
        f"{F}/f/workers/{b['worker_id']}/tethers",
        content=frame(b["worker_id"], 2, tensors(5, base)),
    )
    data = await wait_decisions(c, 2)
    assert {d["partner_id"] for d in data} == {a["worker_id"]}


async def test_tethers_read(app_client: httpx.AsyncClient) -> None:
    c = app_client
    a, _ = await setup_pair(c)
    wid = a["worker_id"]
    assert (await c.get(f"{F}/f/workers/{wid}/tethers")).status_code == 404
    data = tensors(9)
    r = await c.put(f"{F}/f/workers/{wid}/tethers", content=frame(wid, 3, data))
    assert r.status_code == 202 and r.json() == {
        "worker_id": wid,
        "version": 1,
        "step": 3,
        "layers": 2,
        "bytes": len(frame(wid, 3, data)),
    }
    summary = (await c.get(f"{F}/f/workers/{wid}/tethers")).json()
    fc1 = summary["data"][0]
    assert fc1["layer"] == "fc1" and sum(fc1["histogram"]) == 32 and len(fc1["histogram"]) == 32
    assert fc1["mean"] == pytest.approx(float(data["fc1"].mean()), rel=1e-5)
    raw = await c.get(f"{F}/f/workers/{wid}/tethers/fc1")
    assert raw.headers["content-type"] == "application/octet-stream"
    np.testing.assert_array_equal(st_load(raw.content)["fc1"], data["fc1"])
    stats = (await c.get(f"{F}/f/workers/{wid}/tethers/fc2?format=stats")).json()
    assert stats["shape"] == [4, 2] and stats["version"] == 1
    assert (await c.get(f"{F}/f/workers/{wid}/tethers/nope")).status_code == 404
    assert (await c.get(f"{F}/f/workers/{wid}/tethers/nope/generations")).status_code == 404


async def test_compatibility(app_client: httpx.AsyncClient) -> None:
    c = app_client
    a, b = await setup_pair(c)
    base = tensors(1)
    await c.put(f"{F}/f/workers/{a['worker_id']}/tethers", content=frame(a["worker_id"], 1, base))
    await c.put(
        f"{F}/f/workers/{b['worker_id']}/tethers",
        content=frame(b["worker_id"], 1, tensors(2, base)),
    )
    one = (await c.get(f"{F}/f/compatibility?layer=fc1")).json()
    assert (
        one["workers"] == sorted([a["worker_id"], b["worker_id"]]) and one["measure"] == "pearson"
    )
    assert one["matrix"][0][1] > 0.99 and set(one["versions"].values()) == {1}
    every = (await c.get(f"{F}/f/compatibility")).json()
    assert [d["layer"] for d in every["data"]] == ["fc1", "fc2"]
    assert (await c.get(f"{F}/f/compatibility?layer=zz")).status_code == 404
    assert (await c.get(f"{F}/nope/compatibility")).status_code == 404
    assert (await c.get(f"{F}/f/compatibility?workers=left")).status_code == 422
    # b leaves: it is out of the active matrix, but a finished run's last matrix stays readable
    assert (await c.delete(f"{F}/f/workers/{b['worker_id']}")).status_code == 204
    active = (await c.get(f"{F}/f/compatibility?layer=fc1")).json()
    assert b["worker_id"] not in active.get("workers", [])
    ended = (await c.get(f"{F}/f/compatibility?layer=fc1&workers=all")).json()
    assert ended["workers"] == one["workers"] and ended["matrix"] == one["matrix"]


async def scored(c: httpx.AsyncClient) -> None:
    """Until every publish so far has been scored (the scoring stream's backlog is empty)."""
    store = c.app.state.store  # type: ignore[attr-defined]
    with anyio.fail_after(15):
        while await store.scoring_backlog() != (0, 0):
            await anyio.sleep(0.02)


async def test_decisions_long_poll_acks_generations(app_client: httpx.AsyncClient) -> None:
    c = app_client
    a, b = await setup_pair(c)
    aw, bw = a["worker_id"], b["worker_id"]
    base = tensors(1)
    await c.put(f"{F}/f/workers/{aw}/tethers", content=frame(aw, 1, base))
    await scored(c)  # else a's round may see b's frame too, and decide for a as well
    await c.put(f"{F}/f/workers/{bw}/tethers", content=frame(bw, 1, tensors(2, base)))
    polled = (await c.get(f"{F}/f/workers/{bw}/decisions?after=0&wait=10")).json()
    assert polled["count"] >= 1 and polled["data"][0]["action"] == "merge"
    first = polled["data"][0]
    assert first["worker_id"] == bw and first["partner_snapshot"]["worker_id"] == aw
    by_worker = (await c.get(f"{F}/f/decisions?worker={bw}")).json()["data"]
    assert by_worker and {d["worker_id"] for d in by_worker} == {bw}
    assert (await c.get(f"{F}/f/decisions?layer=fc2&action=merge")).json()["data"][0][
        "layer"
    ] == "fc2"
    empty = (await c.get(f"{F}/f/workers/{aw}/decisions?after=0&wait=0.2")).json()
    assert {k: empty[k] for k in ("data", "count", "last_id")} == {
        "data": [],
        "count": 0,
        "last_id": 0,
    }
    # a was scored alone: the poll says why it got nothing
    assert empty["hold"]["code"] == "no_partner" and empty["hold"]["version"] == 1
    ack = {"outcome": "applied", "generation": 1}
    r = await c.post(f"{F}/f/decisions/{first['id']}/ack", json=ack)
    assert r.status_code == 201 and r.json()["worker_id"] == bw
    assert (await c.post(f"{F}/f/decisions/{first['id']}/ack", json=ack)).status_code == 200
    other = await c.post(
        f"{F}/f/decisions/{first['id']}/ack", json={"outcome": "rejected", "reason": "x"}
    )
    assert other.status_code == 409
    assert (await c.post(f"{F}/f/decisions/999/ack", json=ack)).status_code == 404
    assert (await c.post(f"{F}/f/decisions/1/ack", json={"outcome": "applied"})).status_code == 422
    assert (await c.get(f"{F}/f/decisions/{first['id']}/ack")).json()["outcome"] == "applied"
    merged = {k: (v + 0.5) / 2 for k, v in tensors(2, base).items()}  # tethers lie in [0, 1]
    gens = {first["layer"]: 1}
    await c.put(f"{F}/f/workers/{bw}/tethers", content=frame(bw, 2, merged, generations=gens))
    lineage = (await c.get(f"{F}/f/workers/{bw}/tethers/{first['layer']}/generations")).json()
    rec = lineage["data"][0]
    assert lineage["count"] == 1 and rec["generation"] == 1 and rec["decision_id"] == first["id"]
    assert rec["parents"][0]["version"] == 1 and rec["parents"][1]["worker_id"] == aw
    assert rec["retained"] is True
    assert (await c.get(f"{F}/f/workers/{bw}")).json()["generation"] == 1
    kept = await c.get(f"{F}/f/workers/{bw}/tethers/{first['layer']}?generation=1")
    assert kept.status_code == 200
    assert (await c.get(f"{F}/f/workers/{bw}/tethers/fc1?generation=7")).status_code == 404


async def test_scoring_is_idempotent_and_reclaims(app_client: httpx.AsyncClient) -> None:
    c = app_client
    app = c.app  # type: ignore[attr-defined]
    store, scorer = app.state.store, app.state.scorer
    a, b = await setup_pair(c)
    aw, bw = a["worker_id"], b["worker_id"]
    base = tensors(1)
    await c.put(f"{F}/f/workers/{aw}/tethers", content=frame(aw, 1, base))
    await scored(c)  # a's entry is done: the dead scorer below takes b's
    # A "dead" scorer takes the next entry and never acks it.
    dead = store.keys.scoring()
    await c.put(f"{F}/f/workers/{bw}/tethers", content=frame(bw, 1, tensors(2, base)))
    await store.r.xreadgroup("scorers", "dead-consumer", {dead: ">"}, count=10)
    data = await wait_decisions(c, 2)  # reclaimed by the live scorer after reclaim_idle_ms
    assert {d["own_snapshot"]["worker_id"] for d in data} == {bw}
    assert await scorer.score("f", bw) is None, "rescoring the same snapshot emitted decisions"
    await anyio.sleep(0.3)
    assert (await c.get(f"{F}/f/decisions")).json()["count"] == len(data)
    assert await store.scoring_backlog() == (0, 0)
