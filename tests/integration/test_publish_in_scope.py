"""Layers the policy does not look at stay home: a worker publishes only `policy.layers`' layers
(the coordinator requires those and still takes the others), so a policy on one layer of a large
model ships that layer, not the model. A real coordinator process on real Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from torch import nn

from tether_protocol.frame import encode_frame
from tether_protocol.messages import LayerSpec, SnapshotMeta
from tetherfed import BadRequestError, Client, Federation, tether

pytestmark = pytest.mark.integration
TIMEOUT_S = 60.0  # a bound on the wall clock for a publish to land (a loaded machine)


@pytest.fixture
def url(coordinator_process: Any) -> str:
    return str(coordinator_process().url)


@pytest.fixture
def api(url: str) -> Iterator[Client]:
    with Client(url) as client:
        yield client


def test_a_worker_publishes_only_the_layers_in_scope(api: Client, url: str) -> None:
    api.create_federation("last", policy={"layers": "last"})  # type: ignore[arg-type]
    model = tether(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)), "static")
    with Federation(url, "last", model, publish_every=1, io_budget=1.0) as fed:
        assert fed.wait_registered(TIMEOUT_S)
        wid = fed.worker_id
        assert wid is not None
        deadline = time.monotonic() + TIMEOUT_S
        while api.get_worker("last", wid).snapshot_version == 0:
            assert time.monotonic() < deadline, "no publish landed"
            fed.step(loss=1.0)
            time.sleep(0.05)
    summary = api.tethers("last", wid)
    assert [layer.layer for layer in summary.data] == ["2"], "only the last layer travels"


def test_the_coordinator_requires_the_layers_in_scope_and_takes_the_rest(api: Client) -> None:
    api.create_federation("mid", policy={"layers": ["b"]})  # type: ignore[arg-type]
    specs = [LayerSpec(name="a", shape=[4]), LayerSpec(name="b", shape=[2])]
    wid = api.register_worker("mid", "w", specs).worker_id

    def publish(step: int, **tensors: np.ndarray) -> Any:
        meta = SnapshotMeta(worker_id=wid, step=step, epoch=0)
        return api.publish("mid", wid, encode_frame(tensors, meta))

    half = np.full(4, 0.5, np.float32)
    assert publish(1, b=np.full(2, 0.5, np.float32)).layers == 1  # the scope alone
    assert publish(2, a=half, b=np.full(2, 0.5, np.float32)).layers == 2  # everything
    with pytest.raises(BadRequestError, match=r"missing \['b'\]"):
        publish(3, a=half)  # the layer the policy scores is missing
    assert api.tethers("mid", wid).version == 2, "a refused publish writes nothing"
