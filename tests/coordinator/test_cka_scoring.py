"""The coordinator scores `cka` on the probe Grams workers publish beside their tethers."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from coord_helpers import frame, tensors, worker_body
from test_api import scored

from tether_protocol.compat import linear_cka, probe_gram
from tether_protocol.frame import probe_gram_name

pytestmark = pytest.mark.anyio
F = "/v1/federations"
CKA_RANK = {
    "measure": "cka",
    "trigger": "every_publish",
    "cooldown_steps": 0,
    "relative": "rank",
    "merge_threshold": 0.9,
    "drift_threshold": 0.1,
}


def features(seed: int, inputs: np.ndarray, width: int = 6) -> np.ndarray:
    return np.maximum(inputs @ np.random.default_rng(seed).normal(size=(inputs.shape[1], width)), 0)


async def test_cka_compatibility_and_decisions_follow_the_probe_grams(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    assert (await c.post(F, json={"name": "f", "policy": CKA_RANK})).status_code == 201
    ids = [(await c.post(f"{F}/f/workers", json=worker_body(n))).json()["worker_id"] for n in "abc"]
    probe = np.random.default_rng(0).normal(size=(32, 3))
    base = features(1, probe)
    acts = {  # a and b compute the same function up to a permutation of units; c another one
        ids[0]: base,
        ids[1]: base[:, ::-1] * 3.0,
        ids[2]: features(7, probe**2),
    }
    for step in (1, 2):  # at step 2 every round sees all three (a lone partner never merges)
        for i, wid in enumerate(ids):
            grams = {
                probe_gram_name("fc1"): probe_gram(acts[wid]),
                probe_gram_name("fc2"): np.eye(32),
            }
            body = frame(wid, step, {**tensors(i), **grams})
            r = await c.put(f"{F}/f/workers/{wid}/tethers", content=body)
            assert r.status_code == 202 and r.json()["layers"] == 2, r.text
        await scored(c)
    matrix = (await c.get(f"{F}/f/compatibility?layer=fc1")).json()
    order = matrix["workers"]
    a, b, cc = (order.index(w) for w in ids)
    assert matrix["measure"] == "cka" and matrix["matrix"][a][b] == pytest.approx(1.0, abs=1e-5)
    expected = linear_cka(acts[ids[0]], acts[ids[2]])
    assert matrix["matrix"][a][cc] == pytest.approx(expected, abs=1e-4)
    stats = (await c.get(f"{F}/f/workers/{ids[0]}/tethers")).json()
    assert [d["layer"] for d in stats["data"]] == ["fc1", "fc2"]  # Grams are not tethers
    merges = (await c.get(f"{F}/f/decisions?layer=fc1&action=merge")).json()["data"]
    pairs = {frozenset((d["worker_id"], d["partner_id"])) for d in merges}
    assert pairs == {frozenset(ids[:2])}, f"only a and b should merge on fc1, got {merges}"
    assert {d["worker_id"] for d in merges} == set(ids[:2])  # each merged with the other


async def test_a_worker_without_probe_grams_is_not_comparable_under_cka(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    assert (await c.post(F, json={"name": "f", "policy": CKA_RANK})).status_code == 201
    ids = [(await c.post(f"{F}/f/workers", json=worker_body(n))).json()["worker_id"] for n in "ab"]
    for i, wid in enumerate(ids):
        r = await c.put(f"{F}/f/workers/{wid}/tethers", content=frame(wid, 1, tensors(i)))
        assert r.status_code == 202
    assert (await c.get(f"{F}/f/compatibility?layer=fc1")).status_code == 404
