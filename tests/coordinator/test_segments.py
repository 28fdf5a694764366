"""Segmented snapshot storage against real Redis: readers racing publishers always get one whole
frame, a commit whose segments vanished changes nothing, and the previous snapshot's segments go."""

from __future__ import annotations

import anyio
import httpx
import numpy as np
import pytest

from tether_protocol.frame import decode_frame, encode_frame
from tether_protocol.messages import LayerSpec, SnapshotMeta
from tetherfed_coordinator.ingest import Upload
from tetherfed_coordinator.keys import glob_escape
from tetherfed_coordinator.rawbody import SEGMENT
from tetherfed_coordinator.store import Store, frame_keys

F = "/v1/federations"
LAYERS = [LayerSpec(name="w", shape=[640, 1024])]  # 2.5 MiB: three segments


def frame(wid: str, step: int, value: float) -> bytes:
    # Tethers lie in [0, 1]: `value` is scaled into it (exactly, by a power of two).
    data = {"w": np.full(LAYERS[0].shape, value / 1024, dtype=np.float32)}
    return encode_frame(data, SnapshotMeta(worker_id=wid, step=step, epoch=0))


async def setup(client: httpx.AsyncClient) -> str:
    await client.post(f"{F}", json={"name": "f"})
    r = await client.post(
        f"{F}/f/workers", json={"name": "w", "layers": [s.model_dump() for s in LAYERS]}
    )
    assert r.status_code == 201, r.text
    wid: str = r.json()["worker_id"]
    return wid


async def publish(client: httpx.AsyncClient, wid: str, content: bytes) -> None:
    r = await client.put(f"{F}/f/workers/{wid}/tethers", content=content)
    assert r.status_code == 202, r.text


@pytest.mark.anyio
async def test_readers_racing_publishes_always_get_one_whole_frame(
    app_client: httpx.AsyncClient,
) -> None:
    store: Store = app_client.app.state.store  # type: ignore[attr-defined]
    wid = await setup(app_client)
    publishes = 40
    await publish(app_client, wid, frame(wid, 0, 0.0))
    seen: list[float] = []

    async def publisher() -> None:
        for step in range(1, publishes + 1):
            await publish(app_client, wid, frame(wid, step, float(step)))

    async def reader(done: anyio.Event) -> None:
        while not done.is_set():
            snap = await store.snapshot("f", wid)
            values = np.frombuffer(snap.buf, np.float32, offset=snap.entries["w"].start)
            assert values.min() == values.max() == snap.step / 1024, "a read mixed two publishes"
            seen.append(float(values[0]))
            await anyio.sleep(0)

    done = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(reader, done)
        await publisher()
        done.set()
    assert len(set(seen)) > 1, "the reader never overlapped a publish"


@pytest.mark.anyio
async def test_a_commit_whose_segments_expired_changes_nothing(
    app_client: httpx.AsyncClient,
) -> None:
    store: Store = app_client.app.state.store  # type: ignore[attr-defined]
    wid = await setup(app_client)
    good = frame(wid, 1, 1.0)
    await publish(app_client, wid, good)
    keys = store.keys
    meta_before = await store.r.hgetall(keys.snapshot_meta("f", wid))
    await store.r.set(keys.segment("f", wid, "partial", 0), b"x", px=60_000)  # segment 1 missing

    old_meta = await store.r.hgetall(keys.snapshot_meta("f", wid))
    names = [
        keys.worker("f", wid),
        keys.snapshot_meta("f", wid),
        keys.alive("f", wid),
        keys.federation("f"),
        keys.legacy_snapshot("f", wid),
        keys.pin("f", wid, 1),
        keys.segment("f", wid, "partial", 0),
        keys.segment("f", wid, "partial", 1),
        *frame_keys(keys, "f", wid, old_meta),
    ]
    version = await store.r.eval(
        store.publish_script,
        len(names),
        *names,
        2,
        0,
        "",
        "",
        SnapshotMeta(worker_id=wid, step=2, epoch=0).model_dump_json(),
        "2026-01-01T00:00:00+00:00",
        5000,
        "partial",
        2,
        old_meta["tag"],
    )

    assert version == -3
    assert await store.r.hgetall(keys.snapshot_meta("f", wid)) == meta_before
    assert await store.r.ttl(keys.segment("f", wid, "partial", 0)) > 0, "a segment was persisted"
    assert (await store.snapshot("f", wid)).buf == good


@pytest.mark.anyio
async def test_a_publish_replaces_the_previous_segments(app_client: httpx.AsyncClient) -> None:
    store: Store = app_client.app.state.store  # type: ignore[attr-defined]
    wid = await setup(app_client)
    for step in (1, 2):
        content = frame(wid, step, float(step))
        await publish(app_client, wid, content)
    tag = await store.r.hget(store.keys.snapshot_meta("f", wid), "tag")
    pattern = glob_escape(store.keys.segment_base("f", wid)) + "*"
    segments = {k async for k in store.r.scan_iter(match=pattern)}
    count = -(-len(content) // SEGMENT)
    assert segments == {store.keys.segment("f", wid, tag, i) for i in range(count)}, segments
    assert (await store.snapshot("f", wid)).buf == content


@pytest.mark.anyio
async def test_a_full_segment_costs_redis_about_its_size(app_client: httpx.AsyncClient) -> None:
    # Exactly 1 MiB values land in jemalloc's 1.25 MiB size class; a segment a page shorter fits
    # the 1 MiB class with its header. glibc's malloc (the embedded server's) has no such classes,
    # so only a jemalloc server (REDIS_URL=… on this machine's Redis 7) can tell the sizes apart.
    store: Store = app_client.app.state.store  # type: ignore[attr-defined]
    allocator = (await store.r.info("memory"))["mem_allocator"]
    if not allocator.startswith("jemalloc"):
        pytest.skip(f"Redis allocates with {allocator}, not jemalloc")
    wid = await setup(app_client)
    content = frame(wid, 1, 1.0)
    await publish(app_client, wid, content)
    tag = await store.r.hget(store.keys.snapshot_meta("f", wid), "tag")
    full = len(content) // SEGMENT
    assert full >= 2
    for i in range(full):
        used = await store.r.memory_usage(store.keys.segment("f", wid, tag, i), samples=0)
        assert used <= 1.01 * SEGMENT, f"segment {i} takes {used} bytes of Redis memory"


@pytest.mark.anyio
@pytest.mark.parametrize("committed", [True, False])
async def test_an_aborted_upload_keeps_segments_only_if_its_commit_ran(
    app_client: httpx.AsyncClient, committed: bool
) -> None:
    store: Store = app_client.app.state.store  # type: ignore[attr-defined]
    wid = await setup(app_client)
    content = frame(wid, 1, 1.0)
    await publish(app_client, wid, content)
    tag = await store.r.hget(store.keys.snapshot_meta("f", wid), "tag")
    count = -(-len(content) // SEGMENT)
    if not committed:  # an upload that never became the snapshot
        tag = "orphan"
        for i in range(count):
            await store.rb.set(store.keys.segment("f", wid, tag, i), b"x", px=60_000)
    upload = await Upload.open(store, "f", wid, tag)
    upload.count = count
    try:
        await upload.abort()
    finally:
        await upload.release()
    left = [await store.r.exists(store.keys.segment("f", wid, tag, i)) for i in range(count)]
    assert left == [int(committed)] * count
    assert (await store.snapshot("f", wid)).buf == content


@pytest.mark.anyio
async def test_a_frame_stored_whole_by_an_older_version_is_read_then_replaced(
    app_client: httpx.AsyncClient,
) -> None:
    store: Store = app_client.app.state.store  # type: ignore[attr-defined]
    wid = await setup(app_client)
    await publish(app_client, wid, frame(wid, 1, 1.0))
    keys, old = store.keys, frame(wid, 1, 7.0)
    meta = await store.r.hgetall(keys.snapshot_meta("f", wid))
    for field in ("tag", "segments"):  # what a snapshot stored whole looked like
        meta.pop(field)
    await store.r.delete(keys.snapshot_meta("f", wid))
    await store.r.hset(keys.snapshot_meta("f", wid), mapping=meta)
    await store.rb.set(keys.legacy_snapshot("f", wid), old)

    assert (await store.snapshot("f", wid)).buf == old
    await publish(app_client, wid, frame(wid, 2, 2.0))
    assert not await store.r.exists(keys.legacy_snapshot("f", wid)), "the whole frame was kept"
    assert (await store.snapshot("f", wid)).buf == frame(wid, 2, 2.0)


@pytest.mark.anyio
async def test_a_layer_is_served_from_the_segments_that_hold_it(
    app_client: httpx.AsyncClient,
) -> None:
    # Layers straddling segment boundaries, one inside the first segment, one past the first:
    # GET of a layer reads only the segments that hold it and returns exactly its values.
    store: Store = app_client.app.state.store  # type: ignore[attr-defined]
    layers = [
        LayerSpec(name="a", shape=[100]),
        LayerSpec(name="big", shape=[700, 1024]),
        LayerSpec(name="mid", shape=[3, 5]),
        LayerSpec(name="tail", shape=[300, 1024]),
    ]
    await app_client.post(f"{F}", json={"name": "f"})
    r = await app_client.post(
        f"{F}/f/workers", json={"name": "w", "layers": [s.model_dump() for s in layers]}
    )
    wid = r.json()["worker_id"]
    rng = np.random.default_rng(3)
    data = {s.name: rng.random(s.shape, dtype=np.float32) for s in layers}
    body = encode_frame(data, SnapshotMeta(worker_id=wid, step=1, epoch=0))
    await publish(app_client, wid, body)
    meta = await store.r.hgetall(store.keys.snapshot_meta("f", wid))
    assert int(meta["segments"]) >= 4  # the layers do span segments
    for spec in layers:
        part = await store.snapshot_layer("f", wid, spec.name)
        assert list(part.entries) == [spec.name]
        nbytes = data[spec.name].nbytes
        assert len(part.buf) < min(len(body), nbytes + 2 * SEGMENT)  # never the whole frame
        got = await app_client.get(f"{F}/f/workers/{wid}/tethers/{spec.name}")
        assert got.status_code == 200
        frame_back = decode_frame(got.content, require_meta=False)
        np.testing.assert_array_equal(frame_back.tensors[spec.name], data[spec.name])
    assert (await store.snapshot_layer("f", wid, "nope")).entries == {}
