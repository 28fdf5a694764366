"""The coordinator scores `update_cosine` on each worker's update since its origin (its first
publish under the measure), kept for good in Redis beside the worker's keys."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from coord_helpers import LAYERS, frame, keys_of, worker_body
from test_api import scored

from tether_protocol.messages import SketchPolicy, SnapshotMeta
from tether_protocol.sketch import LayerSketch, sketch_layer
from tetherfed_coordinator.keys import Keys
from tetherfed_coordinator.scoring import update_views
from tetherfed_coordinator.store import Snapshot, snapshot_from
from tetherfed_coordinator.topology import sync_client
from tetherfed_coordinator.workerfacts import ORIGIN

pytestmark = pytest.mark.anyio
F = "/v1/federations"
UPDATES = {
    "measure": "update_cosine",
    "trigger": "every_publish",
    "cooldown_steps": 0,
    "merge_threshold": 0.5,
    "drift_threshold": -0.5,
}


def _cos(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.dot(x.ravel(), y.ravel()) / (np.linalg.norm(x) * np.linalg.norm(y)))


def _origin_frame(url: str, keys: Keys, wid: str) -> bytes | None:
    client = sync_client(url)
    try:
        meta = client.hgetall(keys.origin("f", wid))
        if not meta:
            return None
        count = int(meta[b"segments"])
        return b"".join(client.mget([keys.origin_segment("f", wid, i) for i in range(count)]))
    finally:
        client.close()


async def _publish(c: httpx.AsyncClient, wid: str, step: int, data: dict[str, np.ndarray]) -> None:
    r = await c.put(f"{F}/f/workers/{wid}/tethers", content=frame(wid, step, data))
    assert r.status_code == 202, r.text


async def test_scores_are_cosines_of_updates_since_each_origin(
    app_client: httpx.AsyncClient, redis_url: str, key_prefix: str
) -> None:
    c, keys = app_client, Keys(key_prefix)
    assert (await c.post(F, json={"name": "f", "policy": UPDATES})).status_code == 201
    ids = [(await c.post(f"{F}/f/workers", json=worker_body(n))).json()["worker_id"] for n in "abc"]
    rng = np.random.default_rng(0)
    shapes = {spec["name"]: tuple(spec["shape"]) for spec in LAYERS}
    init = {n: rng.uniform(0.3, 0.7, s).astype(np.float32) for n, s in shapes.items()}
    learned = {n: rng.normal(0, 0.05, s) for n, s in shapes.items()}  # a and b learn this
    other = {n: rng.normal(0, 0.05, s) for n, s in shapes.items()}  # c learns something else

    def moved(delta: dict[str, np.ndarray], noise: float) -> dict[str, np.ndarray]:
        return {
            n: (init[n] + delta[n] + rng.normal(0, noise, shapes[n])).astype(np.float32)
            for n in shapes
        }

    # Shared init: every first publish is the same tether, so every update is zero.
    firsts = {}
    for wid in ids:
        firsts[wid] = frame(wid, 1, init)
        await _publish(c, wid, 1, init)
    await scored(c)
    first = (await c.get(f"{F}/f/compatibility?layer=fc1")).json()
    assert first["measure"] == "update_cosine"
    assert all(v is None for row in first["matrix"] for v in row), "a zero update is comparable"

    second = {ids[0]: moved(learned, 0.005), ids[1]: moved(learned, 0.005), ids[2]: moved(other, 0)}
    for wid in ids:
        await _publish(c, wid, 2, second[wid])
    await scored(c)

    got = (await c.get(f"{F}/f/compatibility?layer=fc1")).json()
    at = {w: got["workers"].index(w) for w in ids}
    update = {w: second[w]["fc1"] - init["fc1"] for w in ids}
    for x, y in ((0, 1), (0, 2), (1, 2)):
        a, b = ids[x], ids[y]
        assert got["matrix"][at[a]][at[b]] == pytest.approx(_cos(update[a], update[b]), abs=1e-4)
    assert got["matrix"][at[ids[0]]][at[ids[1]]] > 0.9
    merges = (await c.get(f"{F}/f/decisions?action=merge")).json()["data"]
    assert merges, "a and b learned the same update: some round should merge them"
    assert {frozenset((d["worker_id"], d["partner_id"])) for d in merges} == {frozenset(ids[:2])}
    assert all(d["measure"] == "update_cosine" for d in merges)

    # A later publish keeps the origin: a's update is still measured from its first publish.
    third = moved(other, 0.0)
    await _publish(c, ids[0], 3, third)
    await scored(c)
    later = (await c.get(f"{F}/f/compatibility?layer=fc1")).json()
    a, cc = later["workers"].index(ids[0]), later["workers"].index(ids[2])
    expected = _cos(third["fc1"] - init["fc1"], update[ids[2]])
    assert later["matrix"][a][cc] == pytest.approx(expected, abs=1e-4) and expected > 0.99
    for wid in ids:
        assert _origin_frame(redis_url, keys, wid) == firsts[wid]

    # Leaving keeps the worker's keys (its history, and its origin for a rejoin); deleting the
    # federation removes them.
    assert (await c.delete(f"{F}/f/workers/{ids[0]}")).status_code == 204
    assert _origin_frame(redis_url, keys, ids[0]) == firsts[ids[0]]
    assert (await c.delete(f"{F}/f")).status_code == 204
    assert not {k for k in keys_of(redis_url, key_prefix) if b":origin" in k}


async def test_the_origin_is_the_first_publish_under_the_measure(
    app_client: httpx.AsyncClient, redis_url: str, key_prefix: str
) -> None:
    """No origin is kept under other measures; after a switch to update_cosine a worker's next
    publish becomes its origin, and later ones leave it."""
    c, keys = app_client, Keys(key_prefix)
    pearson = UPDATES | {"measure": "pearson"}
    assert (await c.post(F, json={"name": "f", "policy": pearson})).status_code == 201
    wid = (await c.post(f"{F}/f/workers", json=worker_body("a"))).json()["worker_id"]
    await c.put(f"{F}/f/workers/{wid}/tethers", content=frame(wid, 1))
    assert _origin_frame(redis_url, keys, wid) is None
    r = await c.patch(f"{F}/f/policy", json={"measure": "update_cosine"})
    assert r.status_code == 200, r.text
    body = frame(wid, 2)
    await c.put(f"{F}/f/workers/{wid}/tethers", content=body)
    await c.put(f"{F}/f/workers/{wid}/tethers", content=frame(wid, 3))
    assert _origin_frame(redis_url, keys, wid) == body


def _snapshot(wid: str, version: int, data: dict[str, np.ndarray]) -> Snapshot:
    body = frame(wid, version, data)
    about = SnapshotMeta(worker_id=wid, step=version, epoch=0).model_dump_json()
    meta = {"version": str(version), "step": str(version), "epoch": "0", "meta": about}
    snap = snapshot_from(wid, meta, [body])
    assert snap is not None
    return snap


async def test_update_views_of_tethers_and_of_sketches() -> None:
    """Full layers: T − T⁰; sketched layers: S(T) − S(T⁰) = S(T − T⁰) (a count sketch is
    linear); no origin: nothing comparable."""
    rng = np.random.default_rng(4)
    shapes = {spec["name"]: tuple(spec["shape"]) for spec in LAYERS}
    init = {n: rng.uniform(0.3, 0.7, s).astype(np.float32) for n, s in shapes.items()}
    now = {n: (t + rng.normal(0, 0.05, t.shape)).astype(np.float32) for n, t in init.items()}
    snap, origin = _snapshot("a", 2, now), _snapshot("a", 1, init)
    assert update_views(snap, None) == {}
    snap.memo[ORIGIN] = origin
    full = update_views(snap, None)
    for n in shapes:
        np.testing.assert_array_equal(full[n], now[n] - init[n])
    spec = SketchPolicy(min_values=30, k=16)  # fc1 (32 values) sketched, fc2 (8) not
    views = update_views(snap, spec)
    sketch = views["fc1"]
    assert isinstance(sketch, LayerSketch)
    direct = sketch_layer(now["fc1"] - init["fc1"], spec, "fc1")
    np.testing.assert_allclose(sketch.values, direct.values, atol=1e-5)
    assert sketch.total == pytest.approx(direct.total, abs=1e-5)
    np.testing.assert_array_equal(views["fc2"], now["fc2"] - init["fc2"])
