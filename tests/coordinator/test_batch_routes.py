"""The round's batch routes: every ack of a page in one `POST …/acks`, the partner tethers of a
page of decisions in one `GET …/workers/{wid}/decisions/tethers`. Each item answers what its own
route would; a refused item refuses nothing else."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import app_client_for
from coord_helpers import EVERY_PUBLISH, frame, tensors, worker_body

from tether_protocol.frame import MISSING_KEY, decode_frame
from tether_protocol.messages import MAX_ACKS, MAX_PARTNER_FETCH
from tetherfed_coordinator.settings import Settings

pytestmark = pytest.mark.anyio
F = "/v1/federations"
TOKEN = "admin-secret"


@pytest.fixture
def coordinator_settings(coordinator_settings: Settings) -> Settings:
    """No background scoring (each test scores when it needs to); auth on."""
    return coordinator_settings.model_copy(update={"scoring_enabled": False, "token": TOKEN})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def pair(c: httpx.AsyncClient) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Workers a and b publish near-equal tethers; b's round decides a merge per layer.
    Returns a's and b's registrations and a's first snapshot's tensors."""
    assert (
        await c.post(F, json={"name": "f", "policy": EVERY_PUBLISH}, headers=bearer(TOKEN))
    ).status_code == 201
    a = (await c.post(f"{F}/f/workers", json=worker_body("a"), headers=bearer(TOKEN))).json()
    b = (await c.post(f"{F}/f/workers", json=worker_body("b"), headers=bearer(TOKEN))).json()
    base = tensors(1)
    for reg, data in ((a, base), (b, tensors(2, base))):
        wid = reg["worker_id"]
        r = await c.put(
            f"{F}/f/workers/{wid}/tethers",
            content=frame(wid, 1, data),
            headers=bearer(reg["token"]),
        )
        assert r.status_code == 202, r.text
    assert await c.app.state.scorer.score("f", b["worker_id"])  # type: ignore[attr-defined]
    return a, b, base


async def merges_of(c: httpx.AsyncClient, reg: dict[str, Any]) -> list[dict[str, Any]]:
    page = (
        await c.get(f"{F}/f/workers/{reg['worker_id']}/decisions", headers=bearer(reg["token"]))
    ).json()
    return [d for d in page["data"] if d["action"] == "merge"]


async def test_a_batch_of_acks_answers_each_item_as_its_own_route_would(
    coordinator_settings: Settings,
) -> None:
    async for c in app_client_for(coordinator_settings):
        a, b, _ = await pair(c)
        first, second = await merges_of(c, b)
        applied = {"outcome": "applied", "generation": 1}
        body = {
            "data": [
                {"decision_id": first["id"], **applied},
                {"decision_id": second["id"], **applied},
                {"decision_id": 999_999, **applied},
                {"decision_id": first["id"], **applied},
                {"decision_id": second["id"], "outcome": "rejected", "reason": "changed my mind"},
            ]
        }
        r = await c.post(f"{F}/f/acks", json=body, headers=bearer(b["token"]))
        assert r.status_code == 200, r.text
        out = r.json()["data"]
        assert [x["status"] for x in out] == [201, 201, 404, 200, 409]
        assert out[0]["ack"]["outcome"] == "applied" and out[0]["detail"] is None
        assert "decision 999999 not found" in out[2]["detail"]
        assert "already acked as applied" in out[4]["detail"]
        for d in (first, second):  # recorded as the single route records them
            one = await c.get(f"{F}/f/decisions/{d['id']}/ack", headers=bearer(TOKEN))
            assert one.json()["outcome"] == "applied"
        # Another worker's token acks nothing of b's: 403 per item, nothing recorded.
        a_merges = await merges_of(c, a)
        theirs = await c.post(
            f"{F}/f/acks",
            json={"data": [{"decision_id": first["id"], **applied}]},
            headers=bearer(a["token"]),
        )
        assert [x["status"] for x in theirs.json()["data"]] == [403]
        assert a_merges == []  # a published first: its round decided nothing yet


async def test_a_bad_batch_of_acks_is_refused_whole_and_records_nothing(
    coordinator_settings: Settings,
) -> None:
    async for c in app_client_for(coordinator_settings):
        _, b, _ = await pair(c)
        (first, _) = await merges_of(c, b)
        auth = bearer(b["token"])
        good = {"decision_id": first["id"], "outcome": "applied", "generation": 1}
        cases = [
            ({"data": []}, 422),
            ({"data": [good] * (MAX_ACKS + 1)}, 422),
            ({"data": [good, {"decision_id": first["id"], "outcome": "rejected"}]}, 422),
            ({"data": [{**good, "decision_id": 0}]}, 422),
            ({"data": [{**good, "generation": True}]}, 422),
        ]
        for body, status in cases:
            r = await c.post(f"{F}/f/acks", json=body, headers=auth)
            assert r.status_code == status, (body if len(str(body)) < 300 else "big", r.text)
        assert (await c.post(f"{F}/f/acks", json={"data": [good]})).status_code == 401
        nope = await c.post(f"{F}/nope/acks", json={"data": [good]}, headers=bearer(TOKEN))
        assert nope.status_code in {401, 403, 404}
        missing = await c.get(f"{F}/f/decisions/{first['id']}/ack", headers=bearer(TOKEN))
        assert missing.status_code == 404, "a refused batch recorded an ack"


async def test_a_page_of_decisions_gets_its_partner_tethers_in_one_frame(
    coordinator_settings: Settings,
) -> None:
    async for c in app_client_for(coordinator_settings):
        a, b, base = await pair(c)
        merges = await merges_of(c, b)
        url = f"{F}/f/workers/{b['worker_id']}/decisions/tethers"
        auth = bearer(b["token"])
        # a publishes again: the decisions still get the snapshot they name (v1, pinned).
        r = await c.put(
            f"{F}/f/workers/{a['worker_id']}/tethers",
            content=frame(a["worker_id"], 2, tensors(7)),
            headers=bearer(a["token"]),
        )
        assert r.status_code == 202
        ids = [d["id"] for d in merges]
        r = await c.get(url, params={"decision": [*ids, ids[0], 999_999]}, headers=auth)
        assert r.status_code == 200, r.text
        got = decode_frame(r.content, require_meta=False)
        assert sorted(got.tensors) == sorted(str(i) for i in ids)
        for d in merges:
            np.testing.assert_array_equal(got.tensors[str(d["id"])], base[d["layer"]])
        missing = json.loads(got.extra_metadata[MISSING_KEY])
        assert list(missing) == ["999999"] and "not found" in missing["999999"]
        # Once acked, the pinned layers are gone: each decision is left out with the reason.
        acks = [{"decision_id": i, "outcome": "applied", "generation": 1} for i in ids]
        assert (await c.post(f"{F}/f/acks", json={"data": acks}, headers=auth)).status_code == 200
        answer = await c.get(url, params={"decision": ids}, headers=auth)
        gone = decode_frame(answer.content, require_meta=False)
        assert gone.tensors == {}
        reasons = json.loads(gone.extra_metadata[MISSING_KEY])
        assert set(reasons) == {str(i) for i in ids}
        assert all("no longer stored" in why for why in reasons.values()), reasons
        # Another worker's token may not read b's decisions; bad ids are a 422.
        other = await c.get(url, params={"decision": ids}, headers=bearer(a["token"]))
        assert other.status_code == 403
        for bad in ([], [0], [2**63], list(range(1, MAX_PARTNER_FETCH + 2))):
            r = await c.get(url, params={"decision": bad}, headers=auth)
            assert r.status_code == 422, (bad, r.text)


async def test_decisions_of_another_worker_or_without_a_partner_are_left_out_with_why(
    coordinator_settings: Settings,
) -> None:
    async for c in app_client_for(coordinator_settings):
        a, b, _ = await pair(c)
        merges = await merges_of(c, b)
        # As admin, ask for b's decisions under a's name: none of them is a's.
        url = f"{F}/f/workers/{a['worker_id']}/decisions/tethers"
        r = await c.get(url, params={"decision": [merges[0]["id"]]}, headers=bearer(TOKEN))
        got = decode_frame(r.content, require_meta=False)
        assert got.tensors == {}
        why = json.loads(got.extra_metadata[MISSING_KEY])[str(merges[0]["id"])]
        assert f"addressed to worker {b['worker_id']!r}" in why
