"""Redis deployments beyond one server: URLs, hash-tagged keys, a real Cluster and
a real Sentinel group with a forced failover (servers from redis_servers.py, on loopback)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
from conftest import app_client_for
from coord_helpers import EVERY_PUBLISH, LAYERS, frame, tensors, worker_body
from redis.crc import key_slot
from redis_servers import ClusterServers, SentinelServers

from tether_protocol.frame import encode_frame
from tether_protocol.messages import SnapshotMeta
from tetherfed_coordinator.keys import Keys
from tetherfed_coordinator.settings import Settings
from tetherfed_coordinator.topology import close, parse_redis_url, sync_client

F = "/v1/federations"


# ---------------------------------------------------------------- URLs and keys (no servers)
def test_sentinel_url_names_sentinels_service_and_db() -> None:
    target = parse_redis_url("redis+sentinel://:pw@h1:26379,h2/mymaster/3?sentinel_password=s")
    assert target.kind == "sentinel"
    assert target.nodes == (("h1", 26379), ("h2", 26379))
    assert (target.service, target.db, target.password) == ("mymaster", 3, "pw")
    assert target.sentinel_password == "s"


def test_cluster_url_names_its_nodes() -> None:
    target = parse_redis_url("redis+cluster://a:7000,b:7001")
    assert target.kind == "cluster" and target.nodes == (("a", 7000), ("b", 7001))
    assert parse_redis_url("redis://localhost:6379/2").kind == "server"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://h:1", "unknown Redis URL scheme"),
        ("redis+sentinel://h1:26379", "names its service"),
        ("redis+sentinel://h1:26379/svc/x", "names its service"),
        ("redis+cluster://", "names no host"),
        ("redis+cluster://h:port", "bad host:port"),
    ],
)
def test_bad_urls_fail_at_start_up_naming_the_problem(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Settings(redis_url=url)


def test_settings_refuse_braces_in_the_prefix_and_wait_on_a_cluster() -> None:
    with pytest.raises(ValueError, match="key_prefix"):
        Settings(key_prefix="t{x}:")
    with pytest.raises(ValueError, match="not a Redis Cluster"):
        Settings(redis_url="redis+cluster://h:7000", wait_replicas=1)


def test_every_key_of_a_federation_hashes_to_one_slot() -> None:
    keys = Keys("tetherfed:")
    per_fed = [
        keys.federation("f1"),
        keys.workers("f1"),
        keys.tokens("f1"),
        keys.decision_seq("f1"),
        keys.decisions("f1"),
        keys.acks("f1"),
        keys.fence("f1"),
        keys.worker("f1", "w-1"),
        keys.alive("f1", "w-1"),
        keys.segment("f1", "w-1", "tag", 3),
        keys.legacy_snapshot("f1", "w-1"),
        keys.snapshot_meta("f1", "w-1"),
        keys.worker_decisions("f1", "w-1"),
        keys.merges("f1", "w-1"),
        keys.cooldowns("f1", "w-1"),
        keys.applied("f1", "w-1"),
        keys.generations("f1", "w-1", "enc.{x}"),
        keys.retained("f1", "w-1", "fc"),
        keys.generation_tensor("f1", "w-1", "fc", 2),
    ]
    slots = {key_slot(k.encode()) for k in per_fed}
    assert slots == {key_slot(b"f1")}, "a federation's keys span several slots"
    assert key_slot(keys.federation("f2").encode()) != key_slot(b"f1")


# ---------------------------------------------------------------- a real Cluster
def _settings(url: str, **extra: Any) -> Settings:
    return Settings(
        redis_url=url,
        key_prefix=f"tftest:{uuid.uuid4().hex[:12]}:",
        heartbeat_ttl_s=30.0,
        scoring_block_ms=50,
        reclaim_idle_ms=300,
        long_poll_max_s=10.0,
        consumer_name=f"test-{uuid.uuid4().hex[:6]}",
        scorer_processes=0,
        **extra,
    )


@pytest.fixture
async def cluster_client(redis_cluster: ClusterServers) -> AsyncIterator[httpx.AsyncClient]:
    """The app on the session's Redis Cluster."""
    async for client in app_client_for(_settings(redis_cluster.url)):
        yield client


def _prefix_keys(url: str, prefix: str) -> list[bytes]:
    client = sync_client(url)
    try:
        return list(client.scan_iter(match=prefix + "*", count=1000))
    finally:
        client.close()


async def _register(c: httpx.AsyncClient, fed: str, name: str) -> str:
    r = await c.post(f"{F}/{fed}/workers", json=worker_body(name))
    assert r.status_code == 201, r.text
    return str(r.json()["worker_id"])


BIG = {"name": "big", "shape": [512, 1024], "dtype": "float32"}  # 2 MiB: three segments


def _big_frame(wid: str, seed: int, base: dict[str, np.ndarray]) -> bytes:
    data = tensors(seed, base) | {"big": base["big"] + np.float32(0.01 * seed)}
    return encode_frame(data, SnapshotMeta(worker_id=wid, step=seed, epoch=0))


@pytest.mark.anyio
async def test_a_round_on_a_cluster_publish_score_decide_ack(
    cluster_client: httpx.AsyncClient, redis_cluster: ClusterServers
) -> None:
    c = cluster_client
    assert (await c.post(F, json={"name": "f", "policy": EVERY_PUBLISH})).status_code == 201
    wids = []
    for name in ("a", "b"):
        body = worker_body(name) | {"layers": [*LAYERS, BIG]}
        wids.append((await c.post(f"{F}/f/workers", json=body)).json()["worker_id"])
    a, b = wids
    base = tensors(1) | {"big": 0.5 * np.random.default_rng(0).random((512, 1024), np.float32)}
    # Frames over a segment stream in over one connection borrowed from their slot's node.
    assert (await c.put(f"{F}/f/workers/{a}/tethers", content=_big_frame(a, 1, base))).is_success
    r = await c.put(f"{F}/f/workers/{b}/tethers", content=_big_frame(b, 2, base))
    assert r.is_success, r.text
    polled = (await c.get(f"{F}/f/workers/{b}/decisions?after=0&wait=10")).json()["data"]
    assert polled and {d["action"] for d in polled} == {"merge"}, polled
    assert {d["layer"] for d in polled} == {"fc1", "fc2", "big"}
    ack = {"outcome": "rejected", "reason": "test"}
    r = await c.post(f"{F}/f/decisions/{polled[0]['id']}/ack", json=ack)
    assert r.status_code == 201, r.text
    stored = (await c.get(f"{F}/f/decisions/{polled[0]['id']}/ack")).json()
    assert stored["outcome"] == "rejected" and stored["worker_id"] == b
    tether = await c.get(f"{F}/f/workers/{b}/tethers/big")
    assert tether.status_code == 200, "the multi-segment snapshot does not read back"
    prefix = c.app.state.settings.key_prefix  # type: ignore[attr-defined]
    fed_keys = [k for k in _prefix_keys(redis_cluster.url, prefix) if b"{f}" in k]
    assert len(fed_keys) > 10 and len({key_slot(k) for k in fed_keys}) == 1, fed_keys


@pytest.mark.anyio
async def test_federations_on_every_primary_are_listed_and_deleted(
    cluster_client: httpx.AsyncClient, redis_cluster: ClusterServers
) -> None:
    c = cluster_client
    names = [f"fed{i}" for i in range(12)]
    share = -(-16384 // len(redis_cluster.ports))
    nodes = {key_slot(name.encode()) // share for name in names}
    assert nodes == set(range(len(redis_cluster.ports))), "the names miss a primary"
    for name in names:
        assert (await c.post(F, json={"name": name, "policy": EVERY_PUBLISH})).status_code == 201
        wid = await _register(c, name, "w")
        assert (await c.put(f"{F}/{name}/workers/{wid}/tethers", content=frame(wid))).is_success
    listed = [f["name"] for f in (await c.get(F)).json()["data"]]
    assert listed == sorted(names)
    prefix = c.app.state.settings.key_prefix  # type: ignore[attr-defined]
    for name in names:
        assert (await c.delete(f"{F}/{name}")).status_code == 204
    left = [k for k in _prefix_keys(redis_cluster.url, prefix) if b"{fed" in k]
    assert left == [], f"keys of deleted federations left behind: {left[:5]}"


# ---------------------------------------------------------------- a real Sentinel group
async def _call(c: httpx.AsyncClient, method: str, url: str, **kw: Any) -> httpx.Response:
    """A request retried while the coordinator answers 503 (Redis failing over), as the SDK
    does; any other answer is returned."""
    for _ in range(100):
        r = await c.request(method, url, **kw)
        if r.status_code != 503:
            return r
        await anyio.sleep(0.2)
    raise AssertionError(f"{method} {url} answered 503 for 20 s: {r.text}")


async def _round(c: httpx.AsyncClient, a: str, b: str, step: int, after: int) -> list[dict]:
    """a then b publish at `step` (a new epoch each, so merge caps never bind); b's decisions
    after id `after`."""
    base = tensors(1)
    for wid, data in ((a, base), (b, tensors(step + 1, base))):
        body = frame(wid, step, data, epoch=step)
        r = await _call(c, "PUT", f"{F}/f/workers/{wid}/tethers", content=body)
        assert r.is_success, r.text
    r = await _call(c, "GET", f"{F}/f/workers/{b}/decisions?after={after}&wait=5")
    assert r.is_success, r.text
    return list(r.json()["data"])


@pytest.mark.anyio
async def test_a_sentinel_failover_mid_run_loses_no_acknowledged_decision(
    redis_sentinel: SentinelServers,
) -> None:
    settings = _settings(redis_sentinel.url, wait_replicas=1)
    acked: dict[int, dict] = {}
    late: set[int] = set()  # acked after the failover completed
    failed_over = anyio.Event()
    async for c in app_client_for(settings):
        assert (await c.post(F, json={"name": "f", "policy": EVERY_PUBLISH})).status_code == 201
        a, b = await _register(c, "f", "a"), await _register(c, "f", "b")
        after, step, after_failover = 0, 0, 0
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(90):
                while after_failover < 3:
                    step += 1
                    if step == 3:
                        tg.start_soon(_failover, redis_sentinel, failed_over)
                    for d in await _round(c, a, b, step, after):
                        ack = {"outcome": "rejected", "reason": f"test {step}"}
                        r = await _call(c, "POST", f"{F}/f/decisions/{d['id']}/ack", json=ack)
                        assert r.status_code in (200, 201), r.text
                        acked[d["id"]] = d
                        after = max(after, d["id"])
                        if failed_over.is_set():
                            late.add(d["id"])
                    after_failover += failed_over.is_set() and bool(acked)
    assert redis_sentinel.master_port() != redis_sentinel.primary, "no failover happened"
    assert late, "no decision was made and acked on the new primary"
    _assert_kept(redis_sentinel.url, settings.key_prefix, acked)


async def _failover(servers: SentinelServers, done: anyio.Event) -> None:
    await anyio.to_thread.run_sync(servers.failover)
    done.set()


def _assert_kept(url: str, prefix: str, acked: dict[int, dict]) -> None:
    """Every acked decision is on the new primary as delivered, with its ack; no round of a
    (worker, snapshot version) was decided twice."""
    keys, client = Keys(prefix), sync_client(url, decode_responses=True)
    try:
        stream = {
            int(sid.split("-")[0]): json.loads(f["d"])
            for sid, f in client.xrange(keys.decisions("f"))
        }
        acks = client.hgetall(keys.acks("f"))
    finally:
        close(client)
    assert len(acked) >= 4, f"too few decisions to judge: {sorted(acked)}"
    lost = sorted(set(acked) - set(stream))
    assert not lost, f"acked decisions missing after the failover: {lost}"
    assert all(stream[i] == acked[i] for i in acked), "a decision changed in the failover"
    assert set(acked) <= {int(i) for i in acks}, "acks missing after the failover"
    rounds = [(d["worker_id"], d["layer"], d["own_snapshot"]["version"]) for d in stream.values()]
    assert len(rounds) == len(set(rounds)), "a snapshot version was decided twice"


@pytest.mark.anyio
async def test_federations_stored_before_hash_tags_are_renamed(
    app_client: httpx.AsyncClient,
) -> None:
    store = app_client.app.state.store  # type: ignore[attr-defined]
    keys = store.keys
    created = (await app_client.post(F, json={"name": "old", "policy": EVERY_PUBLISH})).json()
    wid = await _register(app_client, "old", "w")
    for key in [k async for k in store.r.scan_iter(match=keys.federation("old") + "*")]:
        await store.r.rename(
            key, keys.legacy_federation("old") + key[len(keys.federation("old")) :]
        )

    assert (await app_client.get(f"{F}/old")).status_code == 404  # as an upgrade finds it
    assert await store.migrate_legacy() == 1

    assert (await app_client.get(f"{F}/old")).json()["created_at"] == created["created_at"]
    assert (await app_client.get(f"{F}/old/workers/{wid}")).status_code == 200
    assert not [k async for k in store.r.scan_iter(match=keys.legacy_federation("old") + "*")]
    assert await store.migrate_legacy() == 0
