"""On the coordinator's side: every federation carries an incarnation, a
decision's partner snapshot stays readable by version after the partner publishes again,
and a worker's latest round that decided nothing says why."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from conftest import app_client_for
from coord_helpers import EVERY_PUBLISH, frame, tensors, worker_body

from tether_protocol.frame import decode_frame
from tether_protocol.messages import INCARNATION_HEADER
from tetherfed_coordinator.keys import glob_escape
from tetherfed_coordinator.settings import Settings

pytestmark = pytest.mark.anyio
F = "/v1/federations"


@pytest.fixture
async def short_pins(coordinator_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A coordinator whose pinned partner snapshots live 0.3 s."""
    settings = coordinator_settings.model_copy(update={"snapshot_pin_s": 0.3})
    async for client in app_client_for(settings):
        yield client


async def scored(c: httpx.AsyncClient) -> None:
    store = c.app.state.store  # type: ignore[attr-defined]
    with anyio.fail_after(15):
        while await store.scoring_backlog() != (0, 0):
            await anyio.sleep(0.02)


async def test_a_federation_created_anew_has_a_new_incarnation_on_worker_answers(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    first = (await c.post(F, json={"name": "f"})).json()["incarnation"]
    reg = (await c.post(f"{F}/f/workers", json=worker_body("a"))).json()
    assert reg["incarnation"] == first
    wid = reg["worker_id"]
    beat = await c.post(f"{F}/f/workers/{wid}/heartbeat", json={"step": 1, "epoch": 0})
    assert beat.headers[INCARNATION_HEADER] == first
    polled = await c.get(f"{F}/f/workers/{wid}/decisions")
    assert polled.headers[INCARNATION_HEADER] == first
    published = await c.put(f"{F}/f/workers/{wid}/tethers", content=frame(wid, 1))
    assert published.status_code == 202 and published.headers[INCARNATION_HEADER] == first
    assert (await c.delete(f"{F}/f")).status_code == 204
    again = (await c.post(F, json={"name": "f"})).json()["incarnation"]
    assert again != first, "a federation created anew must be told apart from the old one"
    assert (await c.get(f"{F}/f")).json()["incarnation"] == again


async def pair_with_decision(c: httpx.AsyncClient) -> tuple[str, str, dict]:
    """a publishes (v1), then b publishes close to it: a merge for b naming a's v1."""
    await c.post(F, json={"name": "f", "policy": EVERY_PUBLISH})
    a = (await c.post(f"{F}/f/workers", json=worker_body("a"))).json()["worker_id"]
    b = (await c.post(f"{F}/f/workers", json=worker_body("b"))).json()["worker_id"]
    base = tensors(1)
    assert (await c.put(f"{F}/f/workers/{a}/tethers", content=frame(a, 1, base))).status_code == 202
    await scored(c)
    await c.put(f"{F}/f/workers/{b}/tethers", content=frame(b, 1, tensors(2, base)))
    polled = (await c.get(f"{F}/f/workers/{b}/decisions?wait=10")).json()
    merge = polled["data"][0]
    assert merge["action"] == "merge" and merge["partner_snapshot"] == {
        "worker_id": a,
        "version": 1,
        "step": 1,
    }
    return a, b, merge


async def test_the_partner_snapshot_a_decision_names_stays_readable_after_a_newer_publish(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    a, _, merge = await pair_with_decision(c)
    scored_values = tensors(1)["fc1"]
    # the partner publishes again between scoring and apply
    assert (
        await c.put(f"{F}/f/workers/{a}/tethers", content=frame(a, 2, tensors(7)))
    ).status_code == 202
    latest = decode_frame((await c.get(f"{F}/f/workers/{a}/tethers/fc1")).content).tensors["fc1"]
    assert not (latest == scored_values).all()
    r = await c.get(f"{F}/f/workers/{a}/tethers/{merge['layer']}?version=1")
    assert r.status_code == 200 and r.headers["X-Tether-Version"] == "1"
    if merge["layer"] == "fc1":
        assert (decode_frame(r.content).tensors["fc1"] == scored_values).all()
    r = await c.get(f"{F}/f/workers/{a}/tethers/fc1?version=9")
    assert r.status_code == 404 and "no snapshot version 9 yet" in r.json()["detail"]


async def test_a_superseded_partner_snapshot_whose_pin_lapsed_is_gone_with_a_clear_reason(
    short_pins: httpx.AsyncClient,
) -> None:
    c = short_pins
    a, _, _ = await pair_with_decision(c)
    # a's v1 is no decision's partner once a newer publish replaced it and the pin lapsed
    await c.put(f"{F}/f/workers/{a}/tethers", content=frame(a, 2, tensors(7)))
    with anyio.fail_after(15):
        while (r := await c.get(f"{F}/f/workers/{a}/tethers/fc1?version=1")).status_code == 200:
            await anyio.sleep(0.1)
    assert r.status_code == 410, r.text
    assert "snapshot version 1 of worker" in r.json()["detail"]
    assert "no longer stored" in r.json()["detail"]
    store = c.app.state.store  # type: ignore[attr-defined]
    match = glob_escape(store.keys.segment_base("f", a)) + "*"
    with anyio.fail_after(15):  # the superseded segments expired with the pin: nothing leaks
        while len(await store.r.keys(match)) > 1:  # the current (one-segment) frame's
            await anyio.sleep(0.1)


async def test_a_worker_with_nothing_to_apply_sees_why_and_no_decision_is_counted(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    policy = EVERY_PUBLISH | {"warmup_steps": 100}
    await c.post(F, json={"name": "f", "policy": policy})
    wid = (await c.post(f"{F}/f/workers", json=worker_body("a"))).json()["worker_id"]
    for step in (1, 2, 3):
        await c.put(f"{F}/f/workers/{wid}/tethers", content=frame(wid, step))
    await scored(c)
    polled = (await c.get(f"{F}/f/workers/{wid}/decisions")).json()
    assert polled["count"] == 0
    assert polled["hold"]["code"] == "warmup" and polled["hold"]["version"] == 3
    assert "warm-up: step 3 < 100" in polled["hold"]["reason"]
    worker = (await c.get(f"{F}/f/workers/{wid}")).json()
    assert worker["hold"] == polled["hold"]
    assert (await c.get(f"{F}/f")).json()["decisions"] == 0, "holds flood no stream"
