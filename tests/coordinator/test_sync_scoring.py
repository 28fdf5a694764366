"""Synchronous rounds on the coordinator (`tetherfed_coordinator.rounds`): a publish at a round
step waits for its peers' snapshots of that step before it is scored, within sync_timeout_s, and
the deferral survives the scorer that held it."""

from __future__ import annotations

import time

import anyio
import httpx
import pytest
from coord_helpers import frame, tensors, worker_body

from tether_protocol.messages import Policy
from tetherfed_coordinator.rounds import Deferred, deferral, missing_peers, round_step
from tetherfed_coordinator.scoring import GROUP, Scorer
from tetherfed_coordinator.settings import Settings

F = "/v1/federations"
SYNC = Policy(sync_every=5, sync_timeout_s=10.0)


# -- the decision, as a pure function ---------------------------------------------------------
def test_round_steps_are_positive_multiples_of_sync_every() -> None:
    assert [s for s in range(12) if round_step(SYNC, s)] == [5, 10]
    assert not round_step(Policy(), 5), "asynchronous rounds: no round step"


def test_a_round_waits_for_active_peers_below_its_step_until_the_timeout() -> None:
    peers = {"a": 5, "b": 5, "c": 4, "d": None, "e": 10}
    assert missing_peers(5, "a", peers) == ["c", "d"], "behind, or no snapshot yet"
    assert deferral(SYNC, 5, "a", peers, waited_s=1.0) == ["c", "d"]
    assert deferral(SYNC, 5, "a", peers, waited_s=10.0) == [], "timed out: score it now"
    assert deferral(SYNC, 6, "a", peers, waited_s=1.0) == [], "not a round step"
    assert deferral(Policy(), 5, "a", peers, waited_s=1.0) == [], "asynchronous rounds"
    assert deferral(SYNC, 5, "a", {"a": 5, "b": 5}, waited_s=0.0) == [], "everyone is there"
    assert deferral(SYNC, 5, "a", {"a": 5}, waited_s=0.0) == [], "no active peer: alone"


def test_deferred_entries_join_each_batch_once_oldest_first() -> None:
    deferred = Deferred()
    deferred.keep([("5-0", {"fed": "f", "worker": "a"})])
    joined = deferred.join([("7-0", {"fed": "f", "worker": "b"}), ("5-0", {"fed": "f"})])
    assert [e for e, _ in joined] == ["5-0", "7-0"]
    assert len(deferred) == 1 and deferred.ids() == ["5-0"]


# -- the scorer -------------------------------------------------------------------------------
@pytest.fixture
def coordinator_settings(coordinator_settings: Settings) -> Settings:
    """No background scoring: the test drives the scorers itself."""
    return coordinator_settings.model_copy(update={"scoring_enabled": False})


POLICY = {
    "fedavg_every": 5,
    "sync_every": 5,
    "sync_timeout_s": 1.5,
    "max_staleness_steps": 0,  # a partner at another step is stale: only step-k rounds merge
}


async def setup(c: httpx.AsyncClient) -> tuple[str, str]:
    assert (await c.post(F, json={"name": "f", "policy": POLICY})).status_code == 201
    a = (await c.post(f"{F}/f/workers", json=worker_body("a"))).json()["worker_id"]
    b = (await c.post(f"{F}/f/workers", json=worker_body("b"))).json()["worker_id"]
    return a, b


async def publish(c: httpx.AsyncClient, wid: str, step: int) -> None:
    response = await c.put(f"{F}/f/workers/{wid}/tethers", content=frame(wid, step, tensors(step)))
    assert response.status_code == 202, response.text


async def decisions(c: httpx.AsyncClient, wid: str) -> list[dict[str, object]]:
    return (await c.get(f"{F}/f/decisions", params={"worker": wid})).json()["data"]  # type: ignore[no-any-return]


async def pending(scorer: Scorer) -> int:
    info = await scorer.store.r.xpending(scorer.store.keys.scoring(), GROUP)
    return int(info["pending"])


@pytest.mark.anyio
async def test_a_round_is_scored_once_its_peers_reached_its_step(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    scorer: Scorer = c.app.state.scorer  # type: ignore[attr-defined]
    await scorer.ensure_group()
    a, b = await setup(c)
    await publish(c, a, 5)
    await scorer.step(block_ms=10)
    assert await decisions(c, a) == [], "a's round waits for b's step-5 snapshot"
    assert len(scorer.deferred) == 1 and await pending(scorer) == 1, "kept pending, unacked"
    await publish(c, b, 5)
    await scorer.step(block_ms=10)
    for wid, partner in ((a, b), (b, a)):
        found = await decisions(c, wid)
        assert [d["action"] for d in found] == ["merge"] * 2, found  # fc1 and fc2
        for d in found:
            assert d["own_snapshot"]["step"] == 5  # type: ignore[index]
            assert d["partner_snapshot"] == {"worker_id": partner, "version": 1, "step": 5}
    assert not scorer.deferred and await pending(scorer) == 0


@pytest.mark.anyio
async def test_on_timeout_the_round_is_scored_with_whoever_is_there(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    scorer: Scorer = c.app.state.scorer  # type: ignore[attr-defined]
    await scorer.ensure_group()
    a, _b = await setup(c)  # b registered, active, but never publishes
    await publish(c, a, 5)
    started = time.monotonic()
    await scorer.step(block_ms=10)
    assert scorer.deferred, "a's round waits for b"
    while scorer.deferred:
        assert time.monotonic() - started < 30, "the deferred round was never scored"
        await anyio.sleep(0.05)
        await scorer.step(block_ms=10)
    assert time.monotonic() - started >= 1.0, "scored before sync_timeout_s"
    hold = (await c.get(f"{F}/f/workers/{a}")).json()["hold"]
    assert hold["version"] == 1, "the round of a's snapshot was scored, alone: a hold"
    assert await decisions(c, a) == []
    assert await pending(scorer) == 0


@pytest.mark.anyio
async def test_a_deferred_round_survives_the_scorer_that_held_it(
    app_client: httpx.AsyncClient,
) -> None:
    c = app_client
    first: Scorer = c.app.state.scorer  # type: ignore[attr-defined]
    await first.ensure_group()
    a, b = await setup(c)
    await publish(c, a, 5)
    await first.step(block_ms=10)
    assert len(first.deferred) == 1
    # The first scorer dies (never steps again); another process takes over.
    second = Scorer(first.store)
    second.consumer = "second"
    await publish(c, b, 5)
    await second.step(block_ms=10)  # b's round: a reached step 5, so it is scored now
    assert len(await decisions(c, b)) == 2 and await decisions(c, a) == []
    deadline = time.monotonic() + 30
    while not await decisions(c, a):  # a's entry: reclaimed once idle for reclaim_idle_ms
        assert time.monotonic() < deadline, "the dead scorer's deferred round was never scored"
        second._last_reclaim = 0.0  # look for idle entries on every step
        await second.step(block_ms=10)
        await anyio.sleep(0.05)
    assert all(d["partner_snapshot"]["step"] == 5 for d in await decisions(c, a))  # type: ignore[index]
    assert await pending(first) == 0
