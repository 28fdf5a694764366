"""`Policy.merge_scope` end to end: two real `Federation`s against a real coordinator process
on real Redis. Under the fedavg baseline (weighted merges, the same apply path as any merge) a
worker's weights (scope weights) or whole model (scope model) become the average of both
workers'; a worker with another layer table is refused, naming the layer."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tetherfed import Client, Federation, RefusedError, tether
from tetherfed.tethers import INIT_DIGEST_KEY, layer_parts

pytestmark = pytest.mark.integration
TIMEOUT_S = 90.0  # a bound on the wall clock for decisions to come back (a loaded machine)


def net(seed: int, out: int = 4) -> nn.Module:
    """fc1 → BatchNorm → fc2, tethers from one seed (weights from `seed`)."""
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(16, 8))
    model.add_module("bn", nn.BatchNorm1d(8))
    model.add_module("fc2", nn.Linear(8, out))
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.weight.uniform_(0.5, 1.5)
    return tether(model, "static", seed=7)


@pytest.fixture
def coordinator(coordinator_process: Any) -> Any:
    return coordinator_process()


@pytest.fixture
def api(coordinator: Any) -> Iterator[Client]:
    with Client(coordinator.url) as client:
        yield client


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("scope", ["weights", "model"])
def test_fedavg_under_a_merge_scope_averages_the_weights(
    api: Client, coordinator: Any, scope: str, caplog: pytest.LogCaptureFixture
) -> None:
    policy = {"fedavg_every": 2, "merge_scope": scope, "max_staleness_steps": None}
    api.create_federation("avg", policy=policy)  # type: ignore[arg-type]
    mine, theirs = net(0), net(1)
    start, partner_state = state(mine), state(theirs)
    url = coordinator.url
    a = Federation(url, "avg", mine, name="a", heartbeat_s=0.5, poll_wait_s=0.2)
    b = Federation(url, "avg", theirs, name="b", heartbeat_s=0.5, poll_wait_s=0.2)
    caplog.set_level(logging.WARNING, logger="tetherfed.federation")
    try:
        assert a.wait_registered(15) and b.wait_registered(15)
        # b publishes its first snapshot, then never steps again: its weights stay as they
        # are, and every averaging of a's names b's version 1
        b.step(loss=1.0)
        deadline = time.monotonic() + TIMEOUT_S
        while b.stats.published < 1:
            assert time.monotonic() < deadline, "b did not publish"
            time.sleep(0.05)
        parts = layer_parts(mine, scope)  # type: ignore[arg-type]
        key_of = {id(t): k for k, t in mine.state_dict(keep_vars=True).items()}
        merged: set[str] = set()
        while merged != {"fc1", "fc2"}:
            assert time.monotonic() < deadline, f"merged only {merged} within {TIMEOUT_S} s"
            before = state(mine)
            report = a.step(loss=1.0)  # no training: only merges change the model
            for d in report.applied:
                assert d.operator == "weighted" and d.params == {"alpha": 0.5}
                assert d.partner_snapshot is not None and d.partner_snapshot.version == 1
                tether_key = f"{d.layer}.parametrizations.weight.0.tether"
                keys = [tether_key] + [key_of[id(p.tensor())] for p in parts[d.layer]]
                for key in keys:  # each tensor the layer carries: the mean of both
                    want = (before[key] + partner_state[key]) / 2
                    torch.testing.assert_close(mine.state_dict()[key], want, rtol=1e-6, atol=1e-6)
                merged.add(d.layer)
            time.sleep(0.05)
        # Assert: what the scope does not carry never moved
        for key, value in mine.state_dict().items():
            if key.endswith("num_batches_tracked"):
                assert torch.equal(value, start[key])
            elif scope == "weights" and key.startswith("bn."):
                assert torch.equal(value, start[key]), f"{key} moved under scope weights"
        records = {w.name: w for w in api.list_workers("avg").data}
        assert records["a"].meta[INIT_DIGEST_KEY] == a.init_digest != b.init_digest
        assert "averaging independently initialised weights means nothing" in caplog.text
    finally:
        a.close()
        b.close()


def test_a_worker_with_another_layer_table_is_refused_naming_the_layer(
    api: Client, coordinator: Any
) -> None:
    api.create_federation("arch", policy={"merge_scope": "weights"})  # type: ignore[arg-type]
    a = Federation(coordinator.url, "arch", net(0), name="a", heartbeat_s=0.5)
    other = Federation(coordinator.url, "arch", net(0, out=5), name="other", heartbeat_s=0.5)
    try:
        assert a.wait_registered(15)
        assert not other.wait_registered(15)
        assert other.refusal is not None
        assert "merge_scope weights needs one layer table: layer 'fc2' has shape [5, 8]" in str(
            other.refusal
        )
        with pytest.raises(RefusedError, match="layer 'fc2'"):
            other.step(loss=1.0)
    finally:
        other.close()
        a.close()
