"""Streaming publish against real Redis: a bad frame mid-stream or an oversize body leaves no key
(not even the temporary upload key); a good one is stored byte for byte with its generations."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest
from coord_helpers import keys_of

from tether_protocol.frame import decode_frame, encode_frame, encode_parts
from tether_protocol.messages import LayerSpec, SnapshotMeta
from tetherfed import AsyncClient, Client, RetryPolicy
from tetherfed_coordinator.keys import Keys
from tetherfed_coordinator.rawbody import SEGMENT
from tetherfed_coordinator.store import stored_frame
from tetherfed_coordinator.topology import sync_client

F = "/v1/federations"
BIG = [LayerSpec(name="head", shape=[4, 4]), LayerSpec(name="body", shape=[512, 1024])]


def big_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {spec.name: rng.random(spec.shape, dtype=np.float32) for spec in BIG}


def register(api: Client) -> str:
    api.create_federation("f", policy={"retain_generations": 2})
    return api.register_worker("f", "w", BIG).worker_id


@pytest.fixture
def api(coordinator_process: Callable[..., object]) -> Iterator[Client]:
    proc = coordinator_process(TETHER_MAX_FRAME_BYTES=str(4 << 20))
    with Client(proc.url, retry=RetryPolicy(tries=1)) as client:  # type: ignore[attr-defined]
        yield client


def test_nan_late_in_a_streamed_frame_leaves_no_key(
    api: Client, redis_url: str, key_prefix: str
) -> None:
    wid = register(api)
    data = big_tensors()
    data["body"][-1, -1] = np.nan  # in the last chunk, long after the header was accepted
    parts = encode_parts(data, SnapshotMeta(worker_id=wid, step=1, epoch=0))
    before = keys_of(redis_url, key_prefix)

    with pytest.raises(Exception) as caught:
        api.publish("f", wid, parts)

    assert getattr(caught.value, "status", None) == 422, f"expected 422, got {caught.value!r}"
    assert "layer 'body' contains NaN or Inf" in str(caught.value)
    assert keys_of(redis_url, key_prefix) == before, "a rejected publish left a key behind"


def test_good_frame_is_stored_byte_for_byte_with_generations(
    api: Client, redis_url: str, key_prefix: str
) -> None:
    wid = register(api)
    api.publish(
        "f", wid, encode_parts(big_tensors(1), SnapshotMeta(worker_id=wid, step=1, epoch=0))
    )
    data = big_tensors(2)
    meta = SnapshotMeta(worker_id=wid, step=2, epoch=0, generations={"body": 1})
    body = encode_frame(data, meta)

    accepted = api.publish("f", wid, body)  # bytes bodies stream in slices too

    assert accepted.version == 2 and accepted.bytes == len(body)
    client = sync_client(redis_url)
    try:
        stored = stored_frame(client, Keys(key_prefix), "f", wid)
        assert stored is not None and stored[0] == body, "the stored frame differs from the body"
        assert len(stored[1]) == -(-len(body) // SEGMENT), "not stored in segments"
        assert all(client.ttl(k) == -1 for k in stored[1]), "a segment kept the upload TTL"
        segments = {k for k in keys_of(redis_url, key_prefix) if b":seg:" in k}
        assert segments == set(stored[1]), "the first publish's segments were not unlinked"
        kept = client.get(Keys(key_prefix).generation_tensor("f", wid, "body", 1))
    finally:
        client.close()
    assert kept is not None, "generation 1 of 'body' was not retained"
    np.testing.assert_array_equal(decode_frame(kept).tensors["body"], data["body"])


def test_chunked_body_over_the_cap_is_413_with_no_key(
    api: Client, redis_url: str, key_prefix: str
) -> None:
    wid = register(api)
    before = keys_of(redis_url, key_prefix)

    def chunks() -> Iterator[bytes]:
        for _ in range(6):
            yield b"\x00" * (1 << 20)

    r = httpx.put(f"{api._http.base_url}{F}/f/workers/{wid}/tethers", content=chunks())

    assert r.status_code == 413, r.text
    assert r.json()["detail"] == f"frame exceeds the maximum of {4 << 20} bytes"
    assert keys_of(redis_url, key_prefix) == before


@pytest.mark.anyio
async def test_async_sdk_publishes_parts_and_bytes(app_client: httpx.AsyncClient) -> None:
    api = AsyncClient("http://coordinator", transport=app_client._transport)  # type: ignore[arg-type]
    await api.create_federation("f")
    wid = (await api.register_worker("f", "w", BIG)).worker_id
    parts = encode_parts(big_tensors(), SnapshotMeta(worker_id=wid, step=1, epoch=0))

    first = await api.publish("f", wid, parts)
    second = await api.publish("f", wid, b"".join(parts))

    assert (first.version, second.version) == (1, 2)
    head = await api.tether("f", wid, "head")
    np.testing.assert_array_equal(head, big_tensors()["head"])
    await api.aclose()
