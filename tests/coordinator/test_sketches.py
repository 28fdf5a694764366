"""Sketch scoring through the real app and Redis: full and sketch publishes, decisions that name
the full tether to fetch, asking for a full publish, and refusals that write nothing."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import numpy as np
import pytest
from coord_helpers import keys_of

from tether_protocol.frame import encode_frame
from tether_protocol.messages import SketchPolicy, SnapshotMeta
from tether_protocol.sketch import encode_sketch_frame

pytestmark = pytest.mark.anyio
F = "/v1/federations"
LAYERS = [{"name": "big", "shape": [64, 64]}, {"name": "small", "shape": [4, 2]}]
SKETCH = SketchPolicy(k=256, seed=9, min_values=1024, full_every=4)
POLICY = {
    "measure": "pearson",
    "trigger": "every_publish",
    "cooldown_steps": 0,
    "max_merges_per_epoch": 1000,
    "merge_threshold": 0.5,
    "drift_threshold": -0.5,
    "sketch": SKETCH.model_dump(),
}


def tensors(rng: np.random.Generator, base: dict[str, np.ndarray] | None = None) -> dict:
    out = {s["name"]: rng.random(s["shape"], dtype=np.float32) for s in LAYERS}
    return out if base is None else {k: 0.95 * base[k] + 0.05 * v for k, v in out.items()}


def meta(wid: str, step: int) -> SnapshotMeta:
    return SnapshotMeta(worker_id=wid, step=step, epoch=0, loss=1.0)


async def setup(c: httpx.AsyncClient, policy: dict[str, Any] = POLICY) -> tuple[str, str]:
    assert (await c.post(F, json={"name": "f", "policy": policy})).status_code == 201
    ids = []
    for name in "ab":
        r = await c.post(f"{F}/f/workers", json={"name": name, "layers": LAYERS})
        ids.append(r.json()["worker_id"])
    return ids[0], ids[1]


async def merges_for(c: httpx.AsyncClient, wid: str, n: int) -> list[dict]:
    with anyio.fail_after(15):
        while True:
            data = (await c.get(f"{F}/f/decisions?worker={wid}&action=merge")).json()["data"]
            if len(data) >= n:
                return data
            await anyio.sleep(0.05)


async def test_sketch_publishes_are_scored_and_decisions_name_the_full_tether(
    app_client: httpx.AsyncClient,
) -> None:
    # Prepare: a and b publish full frames of near-identical tethers (b's first is scored on
    # the sketches the coordinator makes of both), then b publishes a sketch.
    c = app_client
    a, b = await setup(c)
    rng = np.random.default_rng(0)
    base = tensors(rng)
    for wid in (a, b):
        r = await c.put(
            f"{F}/f/workers/{wid}/tethers", content=encode_frame(tensors(rng, base), meta(wid, 1))
        )
        assert r.status_code == 202, r.text
    first = await merges_for(c, b, 1)
    # Execute
    sketch = encode_sketch_frame(tensors(rng, base), meta(b, 2), SKETCH)
    r = await c.put(f"{F}/f/workers/{b}/sketch", content=sketch)
    # Assert: the sketch is version 2, scored (a merge on both layers), and the decision points
    # at a's full snapshot; a's sketch publish then flags b to publish in full.
    assert r.status_code == 202 and r.json()["version"] == 2 and not r.json()["full_requested"]
    got = await merges_for(c, b, 4)
    second = [d for d in got if d["own_snapshot"]["version"] == 2]
    assert {d["layer"] for d in first} == {d["layer"] for d in second} == {"big", "small"}
    assert all(d["score"] > 0.9 and d["partner_snapshot"]["version"] == 1 for d in second)
    r = await c.put(
        f"{F}/f/workers/{a}/sketch",
        content=encode_sketch_frame(tensors(rng, base), meta(a, 2), SKETCH),
    )
    assert r.status_code == 202
    for_a = [d for d in await merges_for(c, a, 2) if d["own_snapshot"]["version"] == 2]
    assert {d["partner_snapshot"]["version"] for d in for_a} == {1}, "b's full tether is version 1"
    with anyio.fail_after(15):  # the scorer flags b once it committed a's round
        while not (
            await c.app.state.store.r.hget(c.app.state.store.keys.worker("f", b), "full_wanted")
        ):  # type: ignore[attr-defined]
            await anyio.sleep(0.05)
    r = await c.put(
        f"{F}/f/workers/{b}/sketch",
        content=encode_sketch_frame(tensors(rng, base), meta(b, 3), SKETCH),
    )
    assert r.json()["full_requested"] is True
    # The compatibility endpoint scores the same way (on b's latest sketch, a's sketch).
    big = (await c.get(f"{F}/f/compatibility?layer=big")).json()
    assert big["matrix"][0][1] > 0.9 and set(big["versions"].values()) == {2, 3}


async def test_unrelated_and_related_pairs_decide_as_on_full_tethers(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    a, b = await setup(c)
    rng = np.random.default_rng(1)
    await c.put(f"{F}/f/workers/{a}/tethers", content=encode_frame(tensors(rng), meta(a, 1)))
    await c.put(f"{F}/f/workers/{b}/tethers", content=encode_frame(tensors(rng), meta(b, 1)))
    with anyio.fail_after(15):
        while not (data := (await c.get(f"{F}/f/decisions?worker={b}")).json()["data"]):
            await anyio.sleep(0.05)
    big = next(d for d in data if d["layer"] == "big")
    assert big["action"] == "hold" and abs(big["score"]) < 3 / np.sqrt(SKETCH.k)


async def test_bad_sketch_publishes_are_refused_and_write_nothing(
    app_client: httpx.AsyncClient, redis_url: str, key_prefix: str
) -> None:
    c = app_client
    a, _ = await setup(c)
    rng = np.random.default_rng(2)
    before = keys_of(redis_url, key_prefix)
    other_seed = SKETCH.model_copy(update={"seed": 1})
    cases = {
        400: encode_sketch_frame(tensors(rng), meta(a, 1), other_seed),  # another federation's hash
        422: encode_sketch_frame(
            {"big": tensors(rng)["big"]}, meta(a, 1), SKETCH
        ),  # a layer missing
    }
    for status, body in cases.items():
        r = await c.put(f"{F}/f/workers/{a}/sketch", content=body)
        assert r.status_code == status, r.text
    r = await c.put(
        f"{F}/f/workers/{a}/sketch", content=encode_sketch_frame(tensors(rng), meta("x", 1), SKETCH)
    )
    assert r.status_code == 400 and "names worker" in r.json()["detail"]
    assert keys_of(redis_url, key_prefix) == before
    # A federation without a sketch policy refuses sketch publishes.
    plain = {k: v for k, v in POLICY.items() if k != "sketch"}
    assert (await c.post(F, json={"name": "g", "policy": plain})).status_code == 201
    g = (await c.post(f"{F}/g/workers", json={"name": "a", "layers": LAYERS})).json()["worker_id"]
    r = await c.put(
        f"{F}/g/workers/{g}/sketch", content=encode_sketch_frame(tensors(rng), meta(g, 1), SKETCH)
    )
    assert r.status_code == 409 and "no sketch" in r.json()["detail"]


async def test_a_policy_inside_the_noise_is_refused_by_the_api(
    app_client: httpx.AsyncClient,
) -> None:
    noisy = POLICY | {"merge_threshold": 0.05}
    r = await app_client.post(F, json={"name": "f", "policy": noisy})
    assert r.status_code == 422 and "noise band" in r.text
    forced = noisy | {"sketch": SKETCH.model_dump() | {"force": True}}
    assert (await app_client.post(F, json={"name": "f", "policy": forced})).status_code == 201
