"""The merge gate and probe Grams, with the worker library against a real coordinator process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from tether_protocol.frame import encode_frame
from tether_protocol.messages import LayerSpec, SnapshotMeta
from tetherfed import Client, Federation, Probe, build_model, load_task, tether, tethered_layers

pytestmark = pytest.mark.integration
F = "/v1/federations"


def trained_sin_model(steps: int = 300) -> tuple[torch.nn.Module, Any]:
    """A relu-chain on `sin`, trained alone so that halving its weights clearly hurts."""
    task = load_task("sin", seed=0)
    model = tether(build_model("relu-chain-888", task, seed=0), "static", seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = task.train.tensors
    for step in range(steps):
        batch = slice((step * 64) % 4936, (step * 64) % 4936 + 64)
        loss = task.loss_fn(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, task


@pytest.fixture
def coordinator(coordinator_process: Any) -> Any:
    return coordinator_process()


@pytest.fixture
def api(coordinator: Any) -> Iterator[Client]:
    with Client(coordinator.url) as client:
        yield client


def stage_partner(url: str, fed: str, name: str, tethers: dict[str, np.ndarray]) -> str:
    """Register a partner worker and publish the given tethers as its snapshot."""
    with Client(url) as client:
        layers = [LayerSpec(name=k, shape=list(v.shape)) for k, v in tethers.items()]
        reg = client.register_worker(fed, name, layers)
        client.authorize(reg.token)
        meta = SnapshotMeta(worker_id=reg.worker_id, step=1, epoch=0)
        client.publish(fed, reg.worker_id, encode_frame(tethers, meta))
        return reg.worker_id


def step_until(fed: Federation, done: Any, timeout_s: float = 30.0) -> list[Any]:
    reports = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not done(reports):
        reports.append(fed.step(loss=0.0, epoch=0, grad_norm=1.0))
        time.sleep(0.02)
    return reports


def test_gate_rolls_back_a_bad_partner_and_keeps_a_good_one(api: Client, coordinator: Any) -> None:
    policy = {
        "measure": "dot",
        "merge_threshold": 0.0,
        "drift_threshold": None,
        "pairing": "all",
        "trigger": "every_publish",
        "cooldown_steps": 1000,
        "max_staleness_steps": None,
        "layers": ["fc2"],
        "gate": {"probe_loss_rise": 0.01},
    }
    api.create_federation("gated", policy=policy)  # type: ignore[arg-type]
    model, task = trained_sin_model()
    own = {n: tp.current().detach().numpy().copy() for n, tp in tethered_layers(model).items()}
    good = stage_partner(coordinator.url, "gated", "good", own)  # merging changes nothing
    bad = stage_partner(  # averaging with 0.01 halves the layer's effective weights
        coordinator.url, "gated", "bad", {n: np.full_like(t, 0.01) for n, t in own.items()}
    )
    probe = Probe(model, task, torch.device("cpu"), seed=0)
    before = probe.loss()
    fed = Federation(coordinator.url, "gated", model, name="me", poll_wait_s=0.1, probe=probe)
    try:
        assert fed.wait_registered(15)
        reports = step_until(fed, lambda rs: sum(len(r.gate) for r in rs) >= 2)
    finally:
        fed.close()
    checks = {c.decision.partner_id: c for r in reports for c in r.gate}
    assert set(checks) == {good, bad}, f"expected a gate check per partner, got {checks}"
    assert checks[good].kept and checks[good].rise <= 0.01
    assert not checks[bad].kept and checks[bad].rise > 0.01, checks[bad]
    after = tethered_layers(model)["fc2"].current().detach().numpy()
    np.testing.assert_array_equal(after, own["fc2"])  # rolled back exactly
    assert probe.loss() == pytest.approx(before, rel=1e-6)
    assert fed.generations["fc2"] == 1  # the kept merge only
    with httpx.Client(base_url=coordinator.url) as http:
        acks = {
            c.decision.partner_id: http.get(f"{F}/gated/decisions/{c.decision.id}/ack").json()
            for c in checks.values()
        }
    assert acks[good]["outcome"] == "applied" and acks[good]["probe_loss_after"] is not None
    assert acks[bad]["outcome"] == "rejected" and "merge gate" in acks[bad]["reason"]
    assert acks[bad]["probe_loss_after"] > acks[bad]["probe_loss_before"] * 1.01


def test_workers_publish_probe_grams_scored_by_cka(api: Client, coordinator: Any) -> None:
    policy = {
        "measure": "cka",
        "trigger": "every_publish",
        "relative": "rank",
        "merge_threshold": 0.9,
        "drift_threshold": 0.1,
        "probe_size": 32,
    }
    api.create_federation("cka", policy=policy)  # type: ignore[arg-type]
    task = load_task("sin", seed=0)
    models = [tether(build_model("relu-chain-888", task, seed=s), "static", seed=s) for s in (1, 2)]
    probes = [Probe(m, task, torch.device("cpu"), seed=0) for m in models]
    feds = [
        Federation(coordinator.url, "cka", m, name=f"w{i}", poll_wait_s=0.1, probe=p)
        for i, (m, p) in enumerate(zip(models, probes, strict=True))
    ]
    try:
        assert all(f.wait_registered(15) for f in feds)
        deadline = time.monotonic() + 20
        matrix: dict[str, Any] = {}
        while time.monotonic() < deadline and not matrix:
            for f in feds:
                f.step(loss=1.0, epoch=0, grad_norm=1.0)
            found = httpx.get(f"{coordinator.url}{F}/cka/compatibility?layer=fc2")
            matrix = (
                found.json()
                if found.status_code == 200 and len(found.json()["workers"]) == 2
                else {}
            )
            time.sleep(0.05)
    finally:
        for f in feds:
            f.close()
    assert matrix, "no cka compatibility appeared"
    grams = [p.grams(0, 32)["fc2"] for p in probes]
    expected = float(np.sum(grams[0] * grams[1]))  # unit-norm centred Grams: CKA is their dot
    assert matrix["measure"] == "cka"
    assert matrix["matrix"][0][1] == pytest.approx(expected, abs=1e-4)
