"""A decision's partner snapshot: pinned in the step that writes the decision, never dead on
arrival, and pinned only as far as the decision needs (its layer's segments, until it is acked)."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest
from coord_helpers import EVERY_PUBLISH, frame, tensors, worker_body

from tether_protocol.frame import decode_frame, encode_frame, read_header
from tether_protocol.messages import Policy, SnapshotMeta
from tetherfed_coordinator.keys import glob_escape
from tetherfed_coordinator.rawbody import SEGMENT
from tetherfed_coordinator.scoring import STALE_PARTNER
from tetherfed_coordinator.settings import Settings
from tetherfed_coordinator.store import Store

pytestmark = pytest.mark.anyio
F = "/v1/federations"


@pytest.fixture
def coordinator_settings(coordinator_settings: Settings) -> Settings:
    """No background scoring: each test runs the scorer at the moments it needs."""
    return coordinator_settings.model_copy(update={"scoring_enabled": False})


async def join(c: httpx.AsyncClient, name: str, body: dict[str, Any] | None = None) -> str:
    reg = (await c.post(f"{F}/f/workers", json=body or worker_body(name))).json()
    return str(reg["worker_id"])


async def put(c: httpx.AsyncClient, wid: str, body: bytes) -> int:
    r = await c.put(f"{F}/f/workers/{wid}/tethers", content=body)
    assert r.status_code == 202, r.text
    return int(r.json()["version"])


async def decisions_of(c: httpx.AsyncClient, wid: str) -> list[dict[str, Any]]:
    return list((await c.get(f"{F}/f/workers/{wid}/decisions")).json()["data"])


async def test_a_partner_publishing_between_the_scoring_read_and_the_commit_kills_no_decision(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    scorer = c.app.state.scorer  # type: ignore[attr-defined]
    await c.post(F, json={"name": "f", "policy": EVERY_PUBLISH})
    a, b = await join(c, "a"), await join(c, "b")
    base = tensors(1)
    await put(c, a, frame(a, 1, base))
    await put(c, b, frame(b, 1, tensors(2, base)))
    # Prepare: the round for b reads a's v1, then a publishes v2 before the round commits.
    raced: list[object] = []
    states = scorer._states

    async def read_then_partner_publishes(*args: Any) -> Any:
        out = await states(*args)
        if not raced:
            raced.append(await put(c, a, frame(a, 2, tensors(3, base))))
        return out

    scorer._states = read_then_partner_publishes
    commit = scorer._commit_batch
    replies: list[dict[str, Any]] = []

    async def record(*args: Any) -> dict[str, Any]:
        replies.append(await commit(*args))
        return replies[-1]

    scorer._commit_batch = record
    # Execute
    ids = await scorer.score("f", b)
    # Assert: the round naming a's v1 was refused whole (nothing written), and the rescore
    # names a's v2, which is fetchable; a publish after the commit does not change that.
    assert raced == [2] and replies[0] == {b: STALE_PARTNER}, replies
    assert ids, "the rescored round decided nothing"
    merges = [d for d in await decisions_of(c, b) if d["action"] != "hold"]
    assert [d["id"] for d in merges] == ids
    assert {d["partner_snapshot"]["version"] for d in merges} == {2}
    await put(c, a, frame(a, 3, tensors(4, base)))
    for d in merges:
        r = await c.get(f"{F}/f/workers/{a}/tethers/{d['layer']}?version=2")
        assert r.status_code == 200, r.text
        assert r.headers["X-Tether-Version"] == "2"


async def test_a_round_naming_a_superseded_partner_snapshot_writes_nothing(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    scorer = c.app.state.scorer  # type: ignore[attr-defined]
    await c.post(F, json={"name": "f", "policy": EVERY_PUBLISH})
    a, b = await join(c, "a"), await join(c, "b")
    base = tensors(1)
    await put(c, a, frame(a, 1, base))
    await put(c, b, frame(b, 1, tensors(2, base)))
    snaps = await scorer.cache.active("f", include=[b])
    states = await scorer._states("f", [b], snaps)
    policy = Policy.model_validate(EVERY_PUBLISH)
    rounds = scorer._decide_batch(policy, states, snaps)
    assert any(d.action == "merge" for d in rounds[b].decisions)
    await put(c, a, frame(a, 2, tensors(3, base)))
    replies = await scorer._commit_batch("f", policy, snaps, rounds, {b: 0})
    assert replies[b] == STALE_PARTNER
    assert (await c.get(f"{F}/f")).json()["decisions"] == 0
    assert await decisions_of(c, b) == []
    store: Store = c.app.state.store  # type: ignore[attr-defined]
    assert await store.r.hget(store.keys.worker("f", b), "scored_version") is None


SIDE = 512  # a 512×512 float32 layer is 1 MiB: just over one segment
BIG = [{"name": f"l{i}", "shape": [SIDE, SIDE], "dtype": "float32"} for i in range(4)]


def big_frame(wid: str, step: int, data: dict[str, np.ndarray]) -> bytes:
    return encode_frame(data, SnapshotMeta(worker_id=wid, step=step, epoch=0))


def segments_of(body: bytes, layer: str) -> set[int]:
    """The segment indices a layer's bytes lie in, as the coordinator stores `body`."""
    header, start = read_header(body)
    lo, hi = (start + x for x in header[layer]["data_offsets"])
    return set(range(lo // SEGMENT, (hi - 1) // SEGMENT + 1))


async def stored_segments(store: Store, wid: str, tag: str) -> dict[int, int]:
    """Index → bytes of the worker's segments under `tag` that exist."""
    match = glob_escape(store.keys.segment_base("f", wid) + tag + ":") + "*"
    out = {}
    async for key in store.r.scan_iter(match=match):
        out[int(key.rsplit(":", 1)[1])] = int(await store.r.strlen(key))
    return out


async def test_a_pin_holds_only_the_decided_layers_bytes_until_the_decision_is_acked(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    scorer = c.app.state.scorer  # type: ignore[attr-defined]
    store: Store = c.app.state.store  # type: ignore[attr-defined]
    await c.post(F, json={"name": "f", "policy": EVERY_PUBLISH | {"layers": ["l2"]}})
    body = {"name": "w", "layers": BIG, "meta": {}}
    a, b = await join(c, "a", body), await join(c, "b", body)
    rng = np.random.default_rng(0)
    base = {s["name"]: rng.random((SIDE, SIDE), dtype=np.float32) for s in BIG}
    near = {
        k: np.clip(v + 0.01 * rng.random(v.shape, dtype=np.float32), 0, 1) for k, v in base.items()
    }
    first = big_frame(a, 1, base)
    assert len(first) > 4 * SEGMENT
    await put(c, a, first)
    await put(c, b, big_frame(b, 1, near))
    assert await scorer.score("f", b)
    (merge,) = [d for d in await decisions_of(c, b) if d["action"] != "hold"]
    assert merge["layer"] == "l2" and merge["partner_snapshot"]["version"] == 1
    tag = (await store.r.hget(store.keys.snapshot_meta("f", a), "tag")) or ""
    everything = await stored_segments(store, a, tag)
    # Execute: a publishes again, superseding the snapshot the merge names.
    await put(c, a, big_frame(a, 2, near))
    # Assert: only the decided layer's segments of v1 are kept, and they serve it exactly.
    kept = await stored_segments(store, a, tag)
    assert set(kept) == segments_of(first, "l2") and len(kept) < len(everything)
    assert sum(kept.values()) <= len(base["l2"].tobytes()) + 2 * SEGMENT
    r = await c.get(f"{F}/f/workers/{a}/tethers/l2?version=1")
    assert r.status_code == 200, r.text
    assert (decode_frame(r.content).tensors["l2"] == base["l2"]).all()
    stats = await c.get(f"{F}/f/workers/{a}/tethers/l2?version=1&format=stats")
    assert stats.status_code == 200 and stats.json()["version"] == 1
    other = await c.get(f"{F}/f/workers/{a}/tethers/l0?version=1")
    assert other.status_code == 410
    assert "no decision names its layer 'l0'" in other.json()["detail"], other.text
    # The ack releases the claim: the superseded frame's last segments go at once.
    ack = {"outcome": "applied", "generation": 1}
    assert (await c.post(f"{F}/f/decisions/{merge['id']}/ack", json=ack)).status_code == 201
    assert await stored_segments(store, a, tag) == {}
    gone = await c.get(f"{F}/f/workers/{a}/tethers/l2?version=1")
    assert gone.status_code == 410
    detail = gone.json()["detail"]
    assert detail.startswith("snapshot version 1 of worker") and "no longer stored" in detail
    assert "every decision naming its layer 'l2' has been acked" in detail, detail
    assert (await c.post(f"{F}/f/decisions/{merge['id']}/ack", json=ack)).status_code == 200


async def test_an_ack_while_the_partner_snapshot_is_current_keeps_it_whole(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    scorer = c.app.state.scorer  # type: ignore[attr-defined]
    store: Store = c.app.state.store  # type: ignore[attr-defined]
    await c.post(F, json={"name": "f", "policy": EVERY_PUBLISH | {"layers": ["l2"]}})
    body = {"name": "w", "layers": BIG, "meta": {}}
    a, b = await join(c, "a", body), await join(c, "b", body)
    rng = np.random.default_rng(1)
    base = {s["name"]: rng.random((SIDE, SIDE), dtype=np.float32) for s in BIG}
    await put(c, a, big_frame(a, 1, base))
    await put(c, b, big_frame(b, 1, base))
    assert await scorer.score("f", b)
    (merge,) = [d for d in await decisions_of(c, b) if d["action"] != "hold"]
    tag = (await store.r.hget(store.keys.snapshot_meta("f", a), "tag")) or ""
    before = await stored_segments(store, a, tag)
    ack = {"outcome": "rejected", "reason": "test"}
    assert (await c.post(f"{F}/f/decisions/{merge['id']}/ack", json=ack)).status_code == 201
    assert await stored_segments(store, a, tag) == before  # still a's latest frame
    assert (await c.get(f"{F}/f/workers/{a}/tethers/l0?version=1")).status_code == 200
    # superseded with no decision left to need it: nothing of v1 stays
    await put(c, a, big_frame(a, 2, base))
    assert await stored_segments(store, a, tag) == {}
    gone = await c.get(f"{F}/f/workers/{a}/tethers/l2?version=1")
    assert gone.status_code == 410 and "has been acked" in gone.json()["detail"], gone.text


async def test_a_version_no_decision_named_is_gone_with_that_reason(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    await c.post(F, json={"name": "f", "policy": EVERY_PUBLISH})
    a = await join(c, "a")
    await put(c, a, frame(a, 1))
    await put(c, a, frame(a, 2))
    r = await c.get(f"{F}/f/workers/{a}/tethers/fc1?version=1")
    assert r.status_code == 410
    detail = r.json()["detail"]
    assert detail.startswith("snapshot version 1 of worker") and "(latest: 2)" in detail
    assert "no decision issued in the last 60 s names it" in detail, detail
