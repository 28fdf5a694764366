"""The worker library against a real coordinator process on real Redis."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from torch import nn

import tetherfed
from tetherfed import Client, Federation, tether

pytestmark = pytest.mark.integration

EVERY = {
    "measure": "pearson",
    "trigger": "every_publish",
    "cooldown_steps": 0,
    "merge_threshold": 0.5,
    "drift_threshold": -0.5,
    "max_merges_per_epoch": 1000,
    "max_staleness_steps": None,
}


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(16, 8))
    model.add_module("act", nn.ReLU())
    model.add_module("fc2", nn.Linear(8, 4))
    return model


def train(
    fed: Federation,
    model: nn.Module,
    steps: int,
    until: Callable[[], bool] | None = None,
    timeout: float = 20.0,
) -> int:
    """Train on random data, calling fed.step; stop after `steps` or when `until()` holds."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    deadline = time.monotonic() + timeout
    done = 0
    while time.monotonic() < deadline and (done < steps or (until is not None and not until())):
        x, y = torch.randn(8, 16), torch.randn(8, 4)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        fed.step(loss=loss.item(), epoch=0, grad_norm=1.0)
        done += 1
        time.sleep(0.002)
        if until is None and done >= steps:
            break
    return done


# How long a test steps its workers waiting for a decision to come back: a bound on the wall
# clock (generous for a loaded machine), never a number of steps: decisions come at the
# coordinator's pace, not the training loop's.
DECISION_TIMEOUT_S = 90.0


def step_until(what: str, step: Callable[[], None], done: Callable[[], bool]) -> None:
    """Call `step` (one training step of every worker) until `done()`; fail naming `what` after
    DECISION_TIMEOUT_S."""
    deadline = time.monotonic() + DECISION_TIMEOUT_S
    while not done():
        assert time.monotonic() < deadline, f"{what}: not within {DECISION_TIMEOUT_S:.0f} s"
        step()
        time.sleep(0.05)


@pytest.fixture
def coordinator(coordinator_process: Callable[..., Any]) -> Any:
    return coordinator_process()


@pytest.fixture
def api(coordinator: Any) -> Iterator[Client]:
    with Client(coordinator.url) as client:
        yield client


def federations(url: str, fed: str, models: list[nn.Module], **kw: Any) -> list[Federation]:
    feds = [
        Federation(url, fed, m, name=f"w{i}", heartbeat_s=0.5, poll_wait_s=0.2, **kw)
        for i, m in enumerate(models)
    ]
    for f in feds:
        assert f.wait_registered(15), "worker did not register"
    return feds


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_identical_static_tethers_merge_and_acks_are_visible(
    api: Client, coordinator: Any, device: str
) -> None:
    api.create_federation("same", policy=EVERY)  # type: ignore[arg-type]
    models = [tether(mlp(i), "static", seed=7).to(device) for i in range(2)]
    feds = federations(coordinator.url, "same", models)
    try:
        applied: list[int] = []
        merged = [0] * len(feds)

        def step() -> None:
            for i, f in enumerate(feds):
                report = f.step(loss=1.0, epoch=0, grad_norm=1.0)
                applied.extend(d.id for d in report.applied)
                merged[i] += sum(d.action == "merge" for d in report.applied)

        step_until(
            "no merge was applied although the tethers are identical", step, lambda: bool(applied)
        )
        # each Federation counts the merges it applied, and their rate per 100 of its steps
        assert [f.stats.merges_applied for f in feds] == merged and sum(merged) >= 1
        for f in feds:
            rate = 100.0 * f.stats.merges_applied / f.stats.steps
            assert f.stats.merges_per_100_steps == pytest.approx(rate)
        merges = api.decisions("same", action="merge")
        assert merges.count >= 1
        assert all(
            d.action == "merge" and d.score is not None and d.score > 0.99 for d in merges.data
        )
        assert sum(sum(f.generations.values()) for f in feds) >= 1
    finally:
        for f in feds:
            f.close()
    workers = api.list_workers("same")
    assert {w.status for w in workers.data} == {"left"}


def test_anti_correlated_tethers_drift_under_pearson(api: Client, coordinator: Any) -> None:
    policy = EVERY | {"drift_operator": "repel", "drift_beta": 0.1}
    api.create_federation("anti", policy=policy)  # type: ignore[arg-type]
    a, b = tether(mlp(0), "static", seed=1), tether(mlp(1), "static", seed=1)
    for name, tp in tetherfed.tethered_layers(b).items():
        tp.set_(1.0 - tetherfed.tethered_layers(a)[name].current())
    feds = federations(coordinator.url, "anti", [a, b])
    before = tetherfed.tethered_layers(a)["fc1"].current().clone()
    try:
        drifted: list[Any] = []

        def step() -> None:
            drifted.extend(
                d for d in feds[0].step(loss=1.0, epoch=0).applied if d.action == "drift"
            )
            feds[1].step(loss=1.0, epoch=0)

        step_until("anti-correlated tethers did not drift", step, lambda: bool(drifted))
        after = tetherfed.tethered_layers(a)[drifted[0].layer].current()
        layer_before = before if drifted[0].layer == "fc1" else after
        assert drifted[0].score is not None and drifted[0].score < -0.99
        if drifted[0].layer == "fc1":
            assert not torch.equal(after, layer_before), "repel left the tether unchanged"
        assert float(after.min()) >= 0.0 and float(after.max()) <= 1.0
    finally:
        for f in feds:
            f.close()


def test_a_decision_delivered_twice_is_applied_once(api: Client, coordinator: Any) -> None:
    api.create_federation("twice", policy=EVERY | {"max_merges_per_epoch": 1})  # type: ignore[arg-type]
    models = [tether(mlp(i), "static", seed=3) for i in range(2)]
    feds = federations(coordinator.url, "twice", models)
    try:
        first: list[int] = []

        def step() -> None:
            first.extend(d.id for d in feds[0].step(loss=1.0, epoch=0).applied)
            feds[1].step(loss=1.0, epoch=0)

        # one merge per layer is all the policy allows this epoch
        merged = lambda: set(feds[0].generations.values()) == {1}  # noqa: E731
        step_until(f"a merge on every layer: {feds[0].generations}", step, merged)
        generations = dict(feds[0].generations)
        tethers = {
            n: tp.current().clone() for n, tp in tetherfed.tethered_layers(models[0]).items()
        }
        # Record what each poll of feds[0] returns, to know when every decision came again.
        delivered: set[int] = set()
        poll = feds[0]._client.worker_decisions

        def poll_and_note(*args: Any, **kwargs: Any) -> Any:
            page = poll(*args, **kwargs)
            delivered.update(d.id for d in page.data)
            return page

        feds[0]._client.worker_decisions = poll_and_note  # type: ignore[method-assign]
        again: list[int] = []

        def step_again() -> None:
            if not set(first) <= delivered:
                # the next poll delivers every decision again (set until it has: a poll already
                # under way when it is set may move the cursor on)
                feds[0]._cursor = 0
            again.extend(d.id for d in feds[0].step(loss=1.0, epoch=0).applied)

        step_until(
            "the applied decisions were not delivered again",
            step_again,
            lambda: set(first) <= delivered,
        )
        step_again()  # whatever the poll queued is taken (or skipped) at this step
        assert not [i for i in again if i in first], "a decision was applied twice"
        assert feds[0].generations == generations
        for n, tp in tetherfed.tethered_layers(models[0]).items():
            assert torch.equal(tp.current(), tethers[n])
    finally:
        for f in feds:
            f.close()


def test_training_survives_a_coordinator_outage_and_resumes(
    api: Client, coordinator: Any, coordinator_process: Callable[..., Any]
) -> None:
    api.create_federation("outage", policy=EVERY)  # type: ignore[arg-type]
    model = tether(mlp(0), "static", seed=0)
    (fed,) = federations(coordinator.url, "outage", [model])
    try:
        wid = str(fed.worker_id)
        train(
            fed, model, steps=20, until=lambda: api.get_worker("outage", wid).snapshot_version > 0
        )
        coordinator.stop()
        started = time.monotonic()
        done = train(fed, model, steps=300, timeout=30)
        assert done == 300, f"training stalled: {done} steps while the coordinator was down"
        assert time.monotonic() - started < 20, "steps slowed to a crawl during the outage"
        # A new coordinator process on the same Redis and port: the worker publishes again.
        back = coordinator_process(port=int(coordinator.url.rsplit(":", 1)[1]))
        try:
            with Client(coordinator.url) as client:
                version = client.get_worker("outage", fed.worker_id).snapshot_version  # type: ignore[arg-type]
                assert version >= 1, "nothing was published before the outage"

                def newer() -> bool:
                    wid = str(fed.worker_id)
                    return client.get_worker("outage", wid).snapshot_version > version

                train(fed, model, steps=10, until=newer, timeout=30)
                assert newer(), "the worker did not publish again after the coordinator came back"
        finally:
            back.stop()
    finally:
        fed.close(leave=False)


def test_resume_keeps_id_generation_and_applied_ids(api: Client, coordinator: Any) -> None:
    api.create_federation("resume", policy=EVERY | {"max_merges_per_epoch": 1})  # type: ignore[arg-type]
    models = [tether(mlp(i), "static", seed=5) for i in range(2)]
    feds = federations(coordinator.url, "resume", models)
    applied: list[int] = []

    def step() -> None:
        applied.extend(d.id for d in feds[0].step(loss=1.0, epoch=0).applied)
        if not applied:
            feds[1].step(loss=1.0, epoch=0)

    try:
        step_until("nothing was applied before the checkpoint", step, lambda: bool(applied))
    except AssertionError:
        for f in feds:
            f.close(leave=False)
        raise
    state = feds[0].state_dict()
    for f in feds:
        f.close(leave=False)
    assert state["applied_ids"], "nothing was applied before the checkpoint"
    resumed = Federation(coordinator.url, "resume", models[0], resume=state, heartbeat_s=0.5)
    try:
        assert resumed.wait_registered(15)
        assert resumed.worker_id == state["worker_id"]
        assert resumed.generations == state["generations"]
        assert sorted(resumed.applied_ids) == state["applied_ids"]
        assert api.get_worker("resume", state["worker_id"]).worker_id == state["worker_id"]
    finally:
        resumed.close()


def test_publish_frames_match_the_model_tethers(api: Client, coordinator: Any) -> None:
    api.create_federation("frames", policy="default")
    model = tether(mlp(0), "static", seed=11)
    (fed,) = federations(coordinator.url, "frames", [model], publish_every=1)
    try:
        fed.step(loss=1.0, epoch=0)
        deadline = time.monotonic() + 10
        while (
            time.monotonic() < deadline
            and api.get_worker("frames", fed.worker_id).snapshot_version == 0
        ):  # type: ignore[arg-type]
            time.sleep(0.05)
        remote = api.tether("frames", fed.worker_id, "fc2")  # type: ignore[arg-type]
        local = tetherfed.tethered_layers(model)["fc2"].current().numpy()
        np.testing.assert_array_equal(remote, local)
    finally:
        fed.close()


def test_resuming_a_worker_that_left_rejoins_under_its_id_and_publishes(
    api: Client, coordinator: Any
) -> None:
    api.create_federation("rejoin", policy="default")
    model = tether(mlp(0), "static", seed=2)
    (first,) = federations(coordinator.url, "rejoin", [model])
    first.step(loss=1.0, epoch=0)
    state = first.state_dict()
    first.close()  # leaves: the coordinator now refuses this id
    assert api.get_worker("rejoin", state["worker_id"]).status == "left"
    again = Federation(coordinator.url, "rejoin", model, resume=state, heartbeat_s=0.5)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not again.stats.published:
            again.step(loss=1.0, epoch=0)
            time.sleep(0.05)
        assert again.worker_id == state["worker_id"], "resume took a new id"
        assert again.stats.published >= 1, "publishing stopped after the refusal"
        assert api.get_worker("rejoin", state["worker_id"]).status == "active"
    finally:
        again.close()


def test_under_gradient_accumulation_decisions_land_only_after_an_optimizer_step(
    api: Client, coordinator: Any
) -> None:
    """With `optimizer=` a Federation may be stepped per micro-batch: a decision applied inside
    an accumulation window would mix gradients of weights before and after it."""
    api.create_federation("accum", policy=EVERY)  # type: ignore[arg-type]
    window = 4
    models = [tether(mlp(i), "static", seed=7) for i in range(2)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in models]
    feds = [
        Federation(coordinator.url, "accum", m, name=f"w{i}", heartbeat_s=0.5, optimizer=o)
        for i, (m, o) in enumerate(zip(models, optimizers, strict=True))
    ]
    for f in feds:
        assert f.wait_registered(15), "worker did not register"
    micro = [0, 0]
    landed: list[int] = []  # the micro-batch index within its window at each applied decision

    def step() -> None:
        for i, (f, m, o) in enumerate(zip(feds, models, optimizers, strict=True)):
            x, y = torch.randn(8, 16), torch.randn(8, 4)
            (nn.functional.mse_loss(m(x), y) / window).backward()
            micro[i] += 1
            if micro[i] % window == 0:
                o.step()
                o.zero_grad()
            report = f.step(loss=1.0, epoch=0, grad_norm=1.0)
            landed.extend((micro[i] - 1) % window for _ in report.applied)

    try:
        step_until("no merge was applied", step, lambda: len(landed) >= 2)
    finally:
        for f in feds:
            f.close()
    assert set(landed) == {window - 1}, f"decisions landed inside a window: {landed}"


def test_a_fedavg_round_fetches_each_partner_once_and_acks_in_one_request(
    api: Client, coordinator: Any
) -> None:
    """A FedAvg round gives each worker (N − 1) × L decisions: the I/O thread fetches all their
    partner tethers in one request and acks the page in one request."""
    api.create_federation(
        "batched",
        policy={**EVERY, "fedavg_every": 4},  # type: ignore[arg-type]
    )
    models = [tether(mlp(i), "static", seed=i) for i in range(3)]
    feds = federations(coordinator.url, "batched", models)
    calls = dict.fromkeys(["tether_frame", "decision_tethers", "ack", "ack_many"], 0)
    for f in feds:
        client = f._client
        for name in calls:
            real = getattr(client, name)

            def counted(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
                calls[_name] += 1
                return _real(*args, **kw)

            setattr(client, name, counted)
    applied: list[int] = []

    def step() -> None:
        for f in feds:
            applied.extend(d.id for d in f.step(loss=1.0, epoch=0, grad_norm=1.0).applied)

    try:
        step_until("no round was applied", step, lambda: len(applied) >= 8)
    finally:
        for f in feds:
            f.close()
    # A round names 2 partners × 2 layers for each worker: one fetch, one ack request (or the
    # acks ride with the next round's, whichever comes first); never one per decision.
    assert calls["tether_frame"] == 0 and calls["ack"] == 0, calls
    assert calls["decision_tethers"] >= 1, calls
    assert calls["ack_many"] >= 1, calls
    for decision_id in applied:
        assert api.get_ack("batched", decision_id).outcome == "applied"


def test_a_coordinator_without_the_batch_routes_gets_every_fetch_and_ack(
    api: Client, coordinator: Any
) -> None:
    """An older coordinator answers `POST …/acks` and `GET …/decisions/tethers` with Starlette's
    404 "Not Found": the worker then fetches and acks one request per decision, and no ack is
    lost. The coordinator is real; a forwarding transport hides the batch routes."""
    hidden: list[str] = []
    upstream = httpx.Client(base_url=coordinator.url, timeout=30)

    def forward(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(("/acks", "/decisions/tethers")):
            hidden.append(request.url.path)
            return httpx.Response(404, json={"detail": "Not Found"})
        answer = upstream.send(
            upstream.build_request(
                request.method,
                request.url.raw_path.decode(),
                headers=request.headers,
                content=request.read(),
            )
        )
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    api.create_federation("older", policy=EVERY)  # type: ignore[arg-type]
    models = [tether(mlp(i), "static", seed=7) for i in range(2)]
    feds = federations(coordinator.url, "older", models, transport=httpx.MockTransport(forward))
    applied: list[int] = []

    def step() -> None:
        for f in feds:
            applied.extend(d.id for d in f.step(loss=1.0, epoch=0, grad_norm=1.0).applied)

    try:
        step_until("no merge was applied", step, lambda: len(applied) >= 2)
    finally:
        for f in feds:
            f.close()
        upstream.close()
    assert {p.rsplit("/", 1)[1] for p in hidden} == {"acks", "tethers"}, hidden
    for decision_id in applied:
        assert api.get_ack("older", decision_id).outcome == "applied"
