"""`Policy.merge_scope` at the coordinator: parts published next to their tether are validated,
kept out of scoring, served with the layer (latest or pinned), and pinned with it; and weights
or model refuse workers (and policy changes) whose layer tables differ."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest
from coord_helpers import EVERY_PUBLISH, LAYERS, frame, tensors, worker_body

from tether_protocol.frame import decode_frame, encode_frame, split_entries, with_parts
from tether_protocol.messages import SnapshotMeta
from tetherfed_coordinator.keys import glob_escape
from tetherfed_coordinator.rawbody import SEGMENT
from tetherfed_coordinator.settings import Settings
from tetherfed_coordinator.store import Store

pytestmark = pytest.mark.anyio
F = "/v1/federations"
WEIGHTS = EVERY_PUBLISH | {"merge_scope": "weights"}


@pytest.fixture
def coordinator_settings(coordinator_settings: Settings) -> Settings:
    """No background scoring: each test runs the scorer when it needs."""
    return coordinator_settings.model_copy(update={"scoring_enabled": False})


async def join(c: httpx.AsyncClient, name: str, body: dict[str, Any] | None = None) -> str:
    r = await c.post(f"{F}/f/workers", json=body or worker_body(name))
    assert r.status_code == 201, r.text
    return str(r.json()["worker_id"])


async def put(c: httpx.AsyncClient, wid: str, body: bytes) -> httpx.Response:
    return await c.put(f"{F}/f/workers/{wid}/tethers", content=body)


SIDE = 512  # a 512×512 float32 tensor is 1 MiB: just over one segment
BIG = [{"name": f"l{i}", "shape": [SIDE, SIDE], "dtype": "float32"} for i in range(4)]


def big_parts(seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Each layer's weight (values far outside [0, 1]) and bias."""
    rng = np.random.default_rng(seed)
    return {
        s["name"]: {
            f"{s['name']}@weight": 5 * rng.standard_normal((SIDE, SIDE)).astype(np.float32),
            f"{s['name']}@bias": rng.standard_normal(SIDE).astype(np.float32) - 3,
        }
        for s in BIG
    }


def with_meta(wid: str, step: int, data: dict[str, Any]) -> bytes:
    return encode_frame(data, SnapshotMeta(worker_id=wid, step=step, epoch=0))


async def stored_segments(store: Store, wid: str, tag: str) -> set[int]:
    match = glob_escape(store.keys.segment_base("f", wid) + tag + ":") + "*"
    return {int(key.rsplit(":", 1)[1]) async for key in store.r.scan_iter(match=match)}


async def test_a_pinned_superseded_snapshot_serves_its_layer_with_its_parts(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    scorer = c.app.state.scorer  # type: ignore[attr-defined]
    store: Store = c.app.state.store  # type: ignore[attr-defined]
    await c.post(F, json={"name": "f", "policy": WEIGHTS | {"layers": ["l2"]}})
    body = {"name": "w", "layers": BIG, "meta": {}}
    a, b = await join(c, "a", body), await join(c, "b", body)
    rng = np.random.default_rng(0)
    base = {s["name"]: rng.random((SIDE, SIDE), dtype=np.float32) for s in BIG}
    near = {
        k: np.clip(v + 0.01 * rng.random(v.shape, dtype=np.float32), 0, 1) for k, v in base.items()
    }
    first = with_meta(a, 1, with_parts(base, big_parts(1)))
    assert len(first) > 8 * SEGMENT
    assert (await put(c, a, first)).status_code == 202
    assert (await put(c, b, with_meta(b, 1, with_parts(near, big_parts(2))))).status_code == 202
    # scoring sees tethers only
    snaps = await store.active_snapshots("f")
    assert set(snaps[a].entries) == {"l0", "l1", "l2", "l3"}
    assert list(snaps[a].parts["l2"]) == ["l2@weight", "l2@bias"]
    assert await scorer.score("f", b)
    (merge,) = [
        d
        for d in (await c.get(f"{F}/f/workers/{b}/decisions")).json()["data"]
        if d["action"] != "hold"
    ]
    assert merge["layer"] == "l2" and merge["partner_snapshot"]["version"] == 1
    # the latest snapshot serves the layer with its parts
    latest = decode_frame((await c.get(f"{F}/f/workers/{a}/tethers/l2")).content)
    assert list(latest.tensors) == ["l2", "l2@weight", "l2@bias"]
    tag = (await store.r.hget(store.keys.snapshot_meta("f", a), "tag")) or ""
    everything = await stored_segments(store, a, tag)
    where = json.loads(await store.r.hget(store.keys.pin("f", a, 1), "L:l2") or "{}")
    assert [p["name"] for p in where["parts"]] == ["l2@weight", "l2@bias"]
    # Execute: a publishes again, superseding the snapshot the merge names
    assert (await put(c, a, with_meta(a, 2, with_parts(near, big_parts(3))))).status_code == 202
    # Assert: the pin keeps the tether's and its parts' segments only, and serves them exactly
    kept = await stored_segments(store, a, tag)
    assert kept == set(range(where["lo"], where["hi"] + 1)) and len(kept) < len(everything)
    assert where["hi"] * SEGMENT >= where["parts"][-1]["stop"] - SEGMENT
    r = await c.get(f"{F}/f/workers/{a}/tethers/l2?version=1")
    assert r.status_code == 200, r.text
    pinned = decode_frame(r.content)
    assert list(pinned.tensors) == ["l2", "l2@weight", "l2@bias"]
    np.testing.assert_array_equal(pinned.tensors["l2"], base["l2"])
    for name, value in big_parts(1)["l2"].items():
        np.testing.assert_array_equal(pinned.tensors[name], value)
    assert split_entries(pinned.entries).parts["l2"].keys() == {"l2@weight", "l2@bias"}


async def test_parts_are_validated_on_publish(app_client: httpx.AsyncClient) -> None:
    c = app_client
    await c.post(F, json={"name": "f", "policy": WEIGHTS})
    a = await join(c, "a")
    outside = {"fc1": {"fc1@weight": np.full((8, 4), -4.0, np.float32)}}
    assert (await put(c, a, frame(a, 1, with_parts(tensors(1), outside)))).status_code == 202
    unknown = tensors(1) | {"fc9@weight": np.ones(3, np.float32)}
    r = await put(c, a, frame(a, 2, unknown))
    assert r.status_code == 422 and "fc9@weight" in r.json()["detail"], r.text
    nan = {"fc2": {"fc2@bias": np.array([0.0, np.nan], np.float32)}}
    r = await put(c, a, frame(a, 2, with_parts(tensors(1), nan)))
    assert r.status_code == 422 and "'fc2@bias' contains NaN or Inf" in r.json()["detail"], r.text
    bad_tether = tensors(1)
    bad_tether["fc1"][0, 0] = -4.0  # a tether is still range-checked
    r = await put(c, a, frame(a, 2, bad_tether))
    assert r.status_code == 422 and "'fc1'" in r.json()["detail"], r.text
    snap = (await c.get(f"{F}/f/workers/{a}/tethers")).json()
    assert snap["version"] == 1 and [d["layer"] for d in snap["data"]] == ["fc1", "fc2"]


async def test_weights_scope_refuses_a_different_layer_table_naming_the_layer(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    await c.post(F, json={"name": "f", "policy": WEIGHTS})
    a = await join(c, "a")
    other = [LAYERS[0], {"name": "fc2", "shape": [4, 3], "dtype": "float32"}]
    r = await c.post(f"{F}/f/workers", json={"name": "b", "layers": other})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == (
        f"merge_scope weights needs one layer table: layer 'fc2' has shape [4, 3] at this "
        f"worker, [4, 2] at worker {a!r}"
    )
    r = await c.post(f"{F}/f/workers", json={"name": "b", "layers": LAYERS[:1]})
    assert r.status_code == 422 and "layer 'fc2' of worker" in r.json()["detail"], r.text
    assert len((await c.get(f"{F}/f/workers")).json()["data"]) == 1  # nothing written
    await join(c, "same")  # the same table joins
    # a dtype is not the architecture
    wire = [dict(spec, dtype="float16") for spec in LAYERS]
    await join(c, "half", {"name": "half", "layers": wire})


async def test_a_policy_change_to_weights_is_refused_while_tables_differ(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    await c.post(F, json={"name": "f", "policy": EVERY_PUBLISH})
    await join(c, "a")
    b = await join(c, "b", {"name": "b", "layers": [*LAYERS, {"name": "fc3", "shape": [2]}]})
    r = await c.patch(f"{F}/f/policy", json={"merge_scope": "model"})
    assert r.status_code == 409, r.text
    assert "merge_scope model needs one layer table: layer 'fc3'" in r.json()["detail"]
    assert f"worker {b!r}" in r.json()["detail"]
    assert (await c.get(f"{F}/f")).json()["policy"]["merge_scope"] == "tethers"
    assert (await c.delete(f"{F}/f/workers/{b}")).status_code == 204  # b leaves
    r = await c.patch(f"{F}/f/policy", json={"merge_scope": "model"})
    assert r.status_code == 200 and r.json()["merge_scope"] == "model", r.text
