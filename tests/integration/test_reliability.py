"""inputs that broke the worker library against a real coordinator process, by kind.

Each test names the input of the issue it reproduces; each failed before its fix."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch
from torch import nn

import tetherfed
import tetherfed.federation._federation
from tether_protocol.frame import encode_frame
from tether_protocol.messages import Decision, LayerSpec, SnapshotMeta, SnapshotRef
from tetherfed import Client, Federation, tether
from tetherfed.client._errors import BadRequestError, TransportError
from tetherfed.federation._federation import layer_specs
from tetherfed.federation._inbox import Ready
from tetherfed.tethers._tethering import tethered_layers
from tetherfed_coordinator.embedded import free_port
from tetherfed_coordinator.keys import Keys, glob_escape
from tetherfed_coordinator.settings import Settings

pytestmark = pytest.mark.integration

EVERY = {
    "measure": "pearson",
    "trigger": "every_publish",
    "cooldown_steps": 0,
    "max_merges_per_epoch": 1000,
    "max_staleness_steps": None,
}


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))


@dataclass
class Server:
    """One coordinator process shared by this module's tests (each uses its own federation)."""

    url: str
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def coordinator(redis_url: str) -> Iterator[Server]:
    prefix = f"tftest:{uuid.uuid4().hex[:12]}:"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env |= {"TETHER_KEY_PREFIX": prefix, "TETHER_SCORING_BLOCK_MS": "50"}
    cmd = [
        sys.executable,
        "-m",
        "tetherfed_coordinator",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--redis-url",
        redis_url,
    ]
    server = Server(f"http://127.0.0.1:{port}", subprocess.Popen(cmd, env=env))
    try:
        wait_ready(server.url, server.proc)
        yield server
    finally:
        server.proc.kill()
        server.proc.wait(timeout=10)
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=glob_escape(prefix) + "*", count=1000))
        for at in range(0, len(keys), 500):
            client.unlink(*keys[at : at + 500])
        client.close()


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"coordinator at {url} not ready (exit code {proc.poll()})")


@pytest.fixture
def api(coordinator: Server) -> Iterator[Client]:
    with Client(coordinator.url) as client:
        yield client


@pytest.fixture
def fed_name() -> str:
    """A federation name of its own for each test."""
    return f"f-{uuid.uuid4().hex[:8]}"


def joined(url: str, fed: str, model: nn.Module, **kw: Any) -> Federation:
    federation = Federation(url, fed, model, name="w", heartbeat_s=0.2, poll_wait_s=0.1, **kw)
    assert federation.wait_registered(15), "worker did not register"
    return federation


def steps_until(
    fed: Federation, done: Callable[[], bool], timeout_s: float = 15.0, **kw: Any
) -> int:
    """Call fed.step(**kw) every 10 ms until `done()`; the number of steps taken."""
    deadline, taken = time.monotonic() + timeout_s, 0
    while not done() and time.monotonic() < deadline:
        fed.step(**kw)
        taken += 1
        time.sleep(0.01)
    assert done(), f"condition not reached in {timeout_s}s ({taken} steps)"
    return taken


# -- kind 1: non-finite and out-of-range values ---------------------------------------------------


def test_nan_loss_travels_as_null_and_publishing_and_heartbeats_go_on(
    api: Client, coordinator: Server, fed_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    api.create_federation(fed_name, policy=EVERY)  # type: ignore[arg-type]
    fed = joined(coordinator.url, fed_name, tether(mlp(0)))
    try:
        wid = str(fed.worker_id)
        steps_until(fed, lambda: fed.stats.published >= 5, loss=float("nan"), grad_norm=math.inf)
        worker = api.get_worker(fed_name, wid)
        assert worker.status == "active" and worker.loss is None
        assert worker.snapshot_version >= 5
        assert fed.stats.failures == 0, "a publish or heartbeat failed on a NaN loss"
    finally:
        fed.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_the_coordinator_refuses_an_out_of_range_tether_naming_the_layer(
    api: Client, fed_name: str
) -> None:
    api.create_federation(fed_name)
    spec = LayerSpec(name="0", shape=[4, 6])
    wid = api.register_worker(fed_name, "peer", [spec]).worker_id
    values = np.full((4, 6), 0.5, np.float32)
    values[1, 2] = 1.75
    frame = encode_frame({"0": values}, SnapshotMeta(worker_id=wid, step=1, epoch=0))
    with pytest.raises(BadRequestError) as refused:
        api.publish(fed_name, wid, frame)
    assert refused.value.status == 422
    assert "layer '0' has a value outside [0, 1]: 1.75" in str(refused.value.detail)
    assert api.get_worker(fed_name, wid).snapshot_version == 0, "a refused frame was stored"


def partner_decision(fed: Federation, layer: str) -> Decision:
    wid = str(fed.worker_id)
    return Decision(
        id=10**6,
        federation=fed.federation,
        layer=layer,
        worker_id=wid,
        partner_id="peer-1",
        action="merge",
        score=0.9,
        measure="pearson",
        merge_threshold=0.5,
        drift_threshold=None,
        operator="average",
        params={},
        partner_snapshot=None,
        own_snapshot=SnapshotRef(worker_id=wid, version=1, step=0),
        epoch=0,
        reason="test",
    )


@pytest.mark.parametrize(
    ("partner", "reason"),
    [
        (torch.full((4, 6), 2.0), "must lie in [0, 1]"),
        (torch.full((4, 6), float("nan")), "must be finite"),
        (torch.full((3, 3), 0.5), "shapes differ"),
    ],
)
def test_a_partner_tensor_that_cannot_be_applied_is_acked_rejected_and_training_goes_on(
    api: Client, coordinator: Server, fed_name: str, partner: torch.Tensor, reason: str
) -> None:
    api.create_federation(fed_name, policy=EVERY)  # type: ignore[arg-type]
    model = tether(mlp(0))
    fed = joined(coordinator.url, fed_name, model)
    try:
        before = tetherfed.tethered_layers(model)["0"].current().clone()
        decision = partner_decision(fed, "0")
        fed._inbox.put(Ready(decision, partner))
        report = fed.step(loss=1.0)
        assert report.applied == [] and len(report.rejected) == 1
        assert reason in report.rejected[0][1]
        assert torch.equal(tetherfed.tethered_layers(model)["0"].current(), before)
        assert fed.generations["0"] == 0
        [(_, ack)] = fed._pending_acks()
        assert ack.outcome == "rejected" and reason in str(ack.reason)
    finally:
        fed.close()


def test_an_ack_not_yet_sent_is_kept_in_the_checkpoint_and_sent_after_a_resume(
    api: Client, coordinator: Server, fed_name: str
) -> None:
    """A worker killed after checkpointing a decision as applied, before its ack went out,
    acks it when resumed (the applied ids alone would skip the decision: its ack was lost)."""
    api.create_federation(fed_name, policy=EVERY)  # type: ignore[arg-type]
    model = tether(mlp(0))
    fed = joined(coordinator.url, fed_name, model)
    try:
        decision = partner_decision(fed, "0")
        fed._inbox.put(Ready(decision, torch.full((4, 6), 2.0)))
        fed.step(loss=1.0)
        state = fed.state_dict()  # the checkpoint, taken before the I/O thread sent the ack
    finally:
        fed.close()
    assert state["applied_ids"] == [decision.id]
    assert state["pending_acks"][str(decision.id)]["outcome"] == "rejected"
    with socket.socket() as closed:  # a coordinator that is down: nothing is sent
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"
    resumed = Federation(down, fed_name, tether(mlp(0)), name="w", resume=state)
    try:
        [(decision_id, ack)] = resumed._pending_acks()
        assert decision_id == decision.id and ack.outcome == "rejected"
        assert resumed.state_dict()["pending_acks"] == state["pending_acks"]
    finally:
        resumed.close()


# -- kind 2: names ---------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_zero_size_layer_is_refused_at_once_naming_it(coordinator: Server, fed_name: str) -> None:
    model = tether(nn.Sequential(nn.Linear(4, 4), nn.Linear(0, 8)))
    with pytest.raises(ValueError, match=r"layer '1' \(shape \[8, 0\]\).*zero-size"):
        Federation(coordinator.url, fed_name, model)


def test_close_does_not_wait_for_a_flush_when_never_registered(fed_name: str) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}"
    fed = Federation(unreachable, fed_name, tether(mlp(0)), poll_wait_s=0.1)
    fed.step(loss=1.0)
    started = time.monotonic()
    fed.close(flush_timeout_s=30.0)
    assert time.monotonic() - started < 10.0, "close() waited for a flush that could not happen"


class Wrapped(nn.Module):
    """An FSDP-style wrapper: holds the model as `_fsdp_wrapped_module`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._fsdp_wrapped_module = inner


class Compiled(nn.Module):
    """What `torch.compile` returns as far as names go: the model as `_orig_mod` (importing
    dynamo for the real one takes ~40 s on the CI machine, so the tests use this stand-in)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


@pytest.mark.parametrize(
    "wrap",
    [
        lambda m: m,
        Compiled,
        nn.DataParallel,
        lambda m: Wrapped(nn.Sequential(Wrapped(m[0]), m[1], m[2])),
    ],
    ids=["plain", "compile", "data-parallel", "fsdp-style"],
)
def test_wrappers_are_seen_through_so_layer_names_match_the_plain_model(wrap: Any) -> None:
    plain = tether(mlp(0), seed=3)
    wrapped = tether(wrap(mlp(0)), seed=3)
    names = list(tetherfed.tethered_layers(wrapped))
    assert names == list(tetherfed.tethered_layers(plain)) == ["0", "2"]
    assert torch.equal(
        tetherfed.tethered_layers(wrapped)["2"].current(),
        tetherfed.tethered_layers(plain)["2"].current(),
    ), "the same seed drew different tethers through a wrapper"


def test_a_compiled_and_a_data_parallel_model_federate_with_the_plain_one(
    api: Client, coordinator: Server, fed_name: str
) -> None:
    api.create_federation(fed_name, policy=EVERY)  # type: ignore[arg-type]
    models = [tether(wrap(mlp(i)), seed=5) for i, wrap in enumerate([Compiled, nn.DataParallel])]
    feds = [joined(coordinator.url, fed_name, m) for m in models]
    try:
        merged = lambda: api.decisions(fed_name, action="merge").count > 0  # noqa: E731
        steps_until(feds[0], lambda: feds[1].step(loss=1.0) is not None and merged(), loss=1.0)
    finally:
        for fed in feds:
            fed.close()


@pytest.mark.parametrize("name", ["a b", "a/b", "100%", "ümlaut?#&", "x/generations"])
def test_any_module_name_works_through_rest_paths(
    api: Client, coordinator: Server, fed_name: str, name: str
) -> None:
    model = nn.Sequential()
    model.add_module(name, nn.Linear(3, 2))
    tether(model)
    api.create_federation(fed_name, policy=EVERY)  # type: ignore[arg-type]
    fed = joined(coordinator.url, fed_name, model)
    try:
        wid = str(fed.worker_id)
        steps_until(fed, lambda: fed.stats.published >= 1, loss=1.0)
        steps_until(fed, lambda: api.get_worker(fed_name, wid).snapshot_version >= 1, loss=1.0)
        value = api.tether(fed_name, wid, name)
        np.testing.assert_array_equal(
            value, tetherfed.tethered_layers(model)[name].current().numpy()
        )
        assert api.tether_stats(fed_name, wid, name).layer == name
        assert api.generations(fed_name, wid, name).layer == name
    finally:
        fed.close()


def test_a_tethered_root_module_has_a_name(api: Client, coordinator: Server, fed_name: str) -> None:
    model = tether(nn.Linear(4, 4))
    assert list(tetherfed.tethered_layers(model)) == [tetherfed.ROOT_LAYER]
    api.create_federation(fed_name)
    fed = joined(coordinator.url, fed_name, model)
    try:
        layers = api.get_worker(fed_name, str(fed.worker_id)).layers
        assert [layer.name for layer in layers] == [tetherfed.ROOT_LAYER]
    finally:
        fed.close()


# -- kind 5: permanent errors fail fast, transient ones retry -------------------------------------


def test_a_worker_for_an_unknown_federation_exits_at_once_with_the_refused_code(
    coordinator: Server,
) -> None:
    cmd = [
        sys.executable,
        "-m",
        "tetherfed.cli",
        "worker",
        "--coordinator",
        coordinator.url,
        "--federation",
        "nosuch",
        "--steps",
        "1000000",
        "--log-every",
        "1000000",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    from tetherfed.cli import EXIT_REFUSED

    assert done.returncode == EXIT_REFUSED, done.stderr[-2000:]
    assert "federation 'nosuch' not found" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unknown_federation_is_refused_for_good_in_the_library(coordinator: Server) -> None:
    fed = Federation(coordinator.url, "nosuch", tether(mlp(0)))
    try:
        assert not fed.wait_registered(30)
        assert fed.refusal is not None
        with pytest.raises(tetherfed.RefusedError, match="federation 'nosuch' not found"):
            fed.step(loss=1.0)
    finally:
        fed.close()


def test_an_invalid_worker_name_is_refused_in_the_constructor(coordinator: Server) -> None:
    with pytest.raises(ValueError, match="cannot register worker 'no spaces please'"):
        Federation(coordinator.url, "any", tether(mlp(0)), name="no spaces please")


def test_a_bad_token_is_refused_for_good_and_lost_state_re_registers_with_the_admin_token(
    coordinator_process: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    server = coordinator_process(TETHER_TOKEN="admin-secret")
    bad = Federation(server.url, "t", tether(mlp(0)), token="wrong")
    try:
        assert not bad.wait_registered(30)
        with pytest.raises(tetherfed.RefusedError, match="HTTP 401"):
            bad.step(loss=1.0)
    finally:
        bad.close()
    with Client(server.url, token="admin-secret") as admin:
        admin.create_federation("t", policy=EVERY)  # type: ignore[arg-type]
        fed = joined(server.url, "t", tether(mlp(0)), token="admin-secret")
        try:
            first = str(fed.worker_id)
            fed.applied_ids.add(10**6)
            admin.delete_federation("t")  # the coordinator loses everything about the worker
            admin.create_federation("t", policy=EVERY)  # type: ignore[arg-type]
            steps_until(
                fed,
                lambda: fed.worker_id not in (None, first) and fed.wait_registered(0.01),
                loss=1.0,
            )
            assert fed.applied_ids == set() and fed._cursor == 0
            assert admin.get_worker("t", str(fed.worker_id)).status == "active"
        finally:
            fed.close()
    lost = [r for r in caplog.records if "registering again" in r.getMessage()]
    assert len(lost) == 1, [r.getMessage() for r in caplog.records]


# -- kind 6: connections and environment -------------------------------------------------------


@pytest.mark.parametrize("proxy", ["socks5://127.0.0.1:1", "http://127.0.0.1:1"])
def test_a_loopback_coordinator_is_never_reached_through_a_proxy(
    coordinator: Server, monkeypatch: pytest.MonkeyPatch, proxy: str
) -> None:
    for name in ("ALL_PROXY", "HTTP_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.setenv("NO_PROXY", "")
    with Client(coordinator.url) as client:
        assert client.healthz() == {"status": "ok"}
    localhost = coordinator.url.replace("127.0.0.1", "localhost")
    with Client(localhost) as client:
        assert client.healthz() == {"status": "ok"}


def test_a_proxy_that_cannot_be_used_is_named_in_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("httpx")
    if importlib.util.find_spec("socksio") is not None:
        pytest.skip("socksio is installed: a socks proxy is usable")
    monkeypatch.setenv("ALL_PROXY", "socks5://proxy.invalid:1080")
    with pytest.raises(TransportError, match=r"proxy set in the environment .*socks5://proxy"):
        Client("http://coordinator.example:8420")


def test_an_empty_token_setting_means_no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_TOKEN", "")
    monkeypatch.setenv("TETHER_REDIS_URL", "")
    settings = Settings()
    assert settings.token is None and settings.redis_url is None
    assert Settings(token=" ").token is None


def test_a_decision_stream_on_a_silent_connection_fails_in_bounded_time() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def answer_then_go_silent() -> None:
            conn, _ = server.accept()
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n: hi\n\n")
            time.sleep(5)
            conn.close()

        thread = threading.Thread(target=answer_then_go_silent, daemon=True)
        thread.start()
        started = time.monotonic()
        with Client(f"http://127.0.0.1:{port}") as client, pytest.raises(TransportError):
            list(client.stream_decisions("f", idle_timeout_s=0.5))
        assert time.monotonic() - started < 4.5, "the stream outlived its idle timeout"
        thread.join(timeout=10)


# -- kind 8: the API's edges (the rest is in tests/coordinator/test_api_edges.py) ------------------


def test_a_decision_stream_ends_cleanly_when_its_federation_is_deleted(
    api: Client, fed_name: str
) -> None:
    api.create_federation(fed_name)
    outcome: list[Any] = []

    def follow() -> None:
        try:
            outcome.append(list(api.stream_decisions(fed_name, idle_timeout_s=30)))
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    time.sleep(1.0)  # the stream is open
    api.delete_federation(fed_name)
    thread.join(timeout=60)
    assert outcome == [[]], f"the stream did not end cleanly: {outcome}"


# -- kind 7: interop ---------------------------------------------------------------------------


def test_a_frame_with_flat_string_metadata_from_another_writer_is_accepted(
    api: Client, fed_name: str
) -> None:
    from safetensors.numpy import save

    api.create_federation(fed_name)
    wid = api.register_worker(fed_name, "jax", [LayerSpec(name="dense", shape=[3, 2])]).worker_id
    frame = save(
        {"dense": np.full((3, 2), 0.5, np.float32)},
        metadata={"step": "10", "epoch": "0", "loss": "0.5", "format": "np"},
    )
    accepted = api.publish(fed_name, wid, frame)
    assert (accepted.step, accepted.version) == (10, 1)
    worker = api.get_worker(fed_name, wid)
    assert worker.step == 10 and worker.loss == 0.5


def test_plain_pretrained_weights_load_into_a_tethered_model_and_export_baked() -> None:
    pretrained = mlp(7)
    model = tether(mlp(0), seed=1)
    missing, unexpected = tetherfed.load_plain_state_dict(model, pretrained.state_dict())
    assert (missing, unexpected) == ([], [])
    raw = model[0].parametrizations.weight.original
    assert torch.equal(raw, pretrained[0].weight), "the weight was not loaded"
    with pytest.raises(RuntimeError, match="Unexpected key"):
        tetherfed.load_plain_state_dict(model, {**pretrained.state_dict(), "nope.weight": raw})
    plain = tetherfed.untether(model)
    x = torch.randn(5, 6)
    assert torch.allclose(plain(x), model(x))
    assert not any("parametrizations" in k for k in plain.state_dict())
    assert torch.equal(plain[0].weight, raw * tetherfed.tethered_layers(model)["0"].current())
    assert tetherfed.tethered_layers(model), "untether changed the tethered model itself"


# -- kind 4: one identity, two processes ------------------------------------------------------


def test_a_second_process_resumed_under_the_same_worker_id_is_refused(
    api: Client, coordinator: Server, fed_name: str
) -> None:
    api.create_federation(fed_name, policy=EVERY)  # type: ignore[arg-type]
    first = joined(coordinator.url, fed_name, tether(mlp(0)))
    try:
        steps_until(first, lambda: first.stats.published >= 1, loss=1.0)
        checkpoint = first.state_dict()
        second = Federation(
            coordinator.url, fed_name, tether(mlp(0)), resume=checkpoint, claim_wait_s=1.0
        )
        try:
            assert not second.wait_registered(30)
            with pytest.raises(tetherfed.RefusedError, match="already running in another process"):
                second.step(loss=1.0)
        finally:
            second.close(leave=False)
        before = first.stats.published
        steps_until(first, lambda: first.stats.published > before, loss=1.0)
        assert first.stats.failures == 0
    finally:
        first.close()
    again = Federation(coordinator.url, fed_name, tether(mlp(0)), resume=checkpoint)
    try:  # the first one left: resuming its checkpoint in a new process is fine
        assert again.wait_registered(30) and again.worker_id == checkpoint["worker_id"]
    finally:
        again.close()


# -- kinds 3, 4, 5: incarnations, the scored partner snapshot, holds ---------------------------


def recreate_keeping_worker(url: str, prefix: str, fed: str, wid: str) -> str:
    """Delete federation `fed` and create it anew (a new incarnation) holding a worker record
    under the same id `wid` with the same token, in one transaction: the old worker's id still
    resolves, though the federation it joined is gone. Returns the new incarnation."""
    keys = Keys(prefix)
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        record = client.hgetall(keys.worker(fed, wid))
        federation = client.hgetall(keys.federation(fed))
        tokens = {h: w for h, w in client.hgetall(keys.tokens(fed)).items() if w == wid}
        names = list(client.scan_iter(match=keys.federation_match(fed), count=1000))
        for stale in ("session", "session_at", "scored_version", "hold"):
            record.pop(stale, None)
        made = uuid.uuid4().hex[:16]
        with client.pipeline(transaction=True) as pipe:
            pipe.unlink(keys.federation(fed), *names)
            pipe.hset(keys.federation(fed), mapping=federation | {"incarnation": made})
            pipe.hset(keys.worker(fed, wid), mapping=record | {"incarnation": made, "version": 0})
            pipe.sadd(keys.workers(fed), wid)
            if tokens:
                pipe.hset(keys.tokens(fed), mapping=tokens)
            pipe.execute()
        return made
    finally:
        client.close()


def anew_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "was created anew" in r.getMessage()]


def test_a_federation_created_anew_is_noticed_even_when_the_worker_id_still_resolves(
    coordinator_process: Callable[..., Any],
    redis_url: str,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = coordinator_process()
    with Client(server.url) as admin:
        admin.create_federation("g", policy=EVERY)  # type: ignore[arg-type]
        fed = joined(server.url, "g", tether(mlp(0)))
        try:
            old = str(fed.worker_id)
            steps_until(fed, lambda: fed.stats.published >= 1, loss=1.0)
            fed.applied_ids.add(10**6)
            fed._cursor = 50  # decisions of the old incarnation went this far
            made = recreate_keeping_worker(redis_url, key_prefix, "g", old)
            steps_until(
                fed,
                lambda: fed.worker_id not in (None, old) and fed.wait_registered(0.01),
                loss=1.0,
            )
            assert fed.applied_ids == set() and fed._cursor == 0
            assert fed.state_dict()["incarnation"] == made
            assert admin.get_worker("g", str(fed.worker_id)).status == "active"
        finally:
            fed.close()
    assert len(anew_logged(caplog)) == 1, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("id_resolves", [True, False], ids=["id-resolves", "id-unknown"])
def test_a_resumed_worker_whose_checkpoint_names_an_old_incarnation_registers_anew(
    id_resolves: bool,
    coordinator_process: Callable[..., Any],
    redis_url: str,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = coordinator_process(TETHER_TOKEN="admin-secret")
    with Client(server.url, token="admin-secret") as admin:
        admin.create_federation("r", policy=EVERY)  # type: ignore[arg-type]
        first = joined(server.url, "r", tether(mlp(0)), token="admin-secret")
        try:
            steps_until(first, lambda: first.stats.published >= 1, loss=1.0)
            checkpoint = first.state_dict()
        finally:
            first.close(leave=False)
        old = checkpoint["worker_id"]
        if id_resolves:
            recreate_keeping_worker(redis_url, key_prefix, "r", old)
        else:  # the coordinator lost the worker: its lookup answers 401 (token) or 404
            admin.delete_federation("r")
            admin.create_federation("r", policy=EVERY)  # type: ignore[arg-type]
        resumed = Federation(
            server.url,
            "r",
            tether(mlp(0)),
            token="admin-secret",
            resume=checkpoint,
            heartbeat_s=0.2,
            poll_wait_s=0.1,
        )
        try:
            assert resumed.wait_registered(30), "the resumed worker never registered anew"
            assert resumed.worker_id != old, "resumed under an id of the old incarnation"
            assert admin.get_worker("r", str(resumed.worker_id)).status == "active"
        finally:
            resumed.close()
    client = redis.Redis.from_url(redis_url)
    try:  # the record that happened to resolve was never claimed
        assert client.hget(Keys(key_prefix).worker("r", old), "session") is None
    finally:
        client.close()
    said = [r.getMessage() for r in caplog.records if "registering again" in r.getMessage()]
    assert len(said) == 1, said
    assert len(anew_logged(caplog)) == int(id_resolves), said


# Unlinks every key under a prefix in one step: FLUSHALL of this test's keys only.
FLUSH_PREFIX = "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('UNLINK', k) end"


@pytest.mark.parametrize("loss", ["restart without persistence", "FLUSHALL"])
def test_workers_recover_and_apply_new_decisions_after_the_coordinator_lost_everything(
    loss: str, coordinator_process: Callable[..., Any], redis_url: str, key_prefix: str
) -> None:
    server = coordinator_process()
    with Client(server.url) as admin:
        admin.create_federation("h", policy=EVERY)  # type: ignore[arg-type]
    a, b = (joined(server.url, "h", tether(mlp(0))) for _ in range(2))
    applied: set[int] = set()

    def both(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 60
        while not done() and time.monotonic() < deadline:
            for fed in (a, b):
                applied.update(d.id for d in fed.step(loss=1.0).applied)
            time.sleep(0.01)
        assert done(), f"not reached: applied {sorted(applied)}, cursors {a._cursor} {b._cursor}"

    try:
        both(lambda: min(a._cursor, b._cursor) >= 3)
        before, old = max(a._cursor, b._cursor), {a.worker_id, b.worker_id}
        client = redis.Redis.from_url(redis_url)
        try:
            if loss == "FLUSHALL":
                client.eval(FLUSH_PREFIX, 0, glob_escape(key_prefix) + "*")
            else:
                port = int(server.url.rsplit(":", 1)[1])
                server.stop()
                client.eval(FLUSH_PREFIX, 0, glob_escape(key_prefix) + "*")
                server = coordinator_process(port=port)
        finally:
            client.close()
        both(lambda: a.worker_id is None or b.worker_id is None or a.stats.failures > 0)
        with Client(server.url) as admin:
            admin.create_federation("h", policy=EVERY)  # type: ignore[arg-type]
            both(
                lambda: (
                    old.isdisjoint({a.worker_id, b.worker_id})
                    and None not in {a.worker_id, b.worker_id}
                )
            )
            applied.clear()  # only decisions of the new federation from here
            both(lambda: any(i <= before for i in applied))
            low = min(applied)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the ack travels on the I/O thread
                with contextlib.suppress(tetherfed.TetherError):
                    assert admin.get_ack("h", low).outcome == "applied"
                    break
                both(lambda: True)
            assert admin.get_ack("h", low).outcome == "applied"
    finally:
        a.close()
        b.close()


@dataclass
class Staged:
    """A worker's checkpoint taken before a merge naming partner snapshot v1 was decided for it,
    then the partner published again (v2): resuming it applies the decision now."""

    model: nn.Module
    own: dict[str, np.ndarray]
    scored: dict[str, np.ndarray]
    newer: dict[str, np.ndarray]
    checkpoint: dict[str, Any]
    partner: str
    merges: list[Decision]


def stage_superseded_partner(url: str, api: Client, fed: str) -> Staged:
    model = tether(mlp(0))
    b = joined(url, fed, model)
    try:
        steps_until(b, lambda: b.stats.published >= 1, loss=1.0)
        checkpoint = b.state_dict()
    finally:
        b.close(leave=False)
    layers = tethered_layers(model)
    own = {k: tp.current().detach().numpy().copy() for k, tp in layers.items()}
    rng = np.random.default_rng(0)
    near = {
        k: np.clip(v + 0.05 * rng.random(v.shape), 0, 1).astype(np.float32) for k, v in own.items()
    }
    newer = {k: rng.random(v.shape).astype(np.float32) for k, v in own.items()}
    a = api.register_worker(fed, "a", layer_specs(layers, "float32")).worker_id
    api.publish(fed, a, encode_frame(near, SnapshotMeta(worker_id=a, step=1, epoch=0)))
    wid = checkpoint["worker_id"]  # b publishes once more: its round scores a's v1
    api.publish(fed, wid, encode_frame(own, SnapshotMeta(worker_id=wid, step=2, epoch=0)))
    merges: list[Decision] = []
    deadline = time.monotonic() + 30
    while len(merges) < len(own) and time.monotonic() < deadline:
        page = api.worker_decisions(fed, wid, after=0, wait=1.0)
        merges = [d for d in page.data if d.action == "merge" and d.partner_id == a]
    assert len(merges) == len(own), f"no merge naming {a} for every layer: {merges}"
    assert {(d.partner_snapshot.version if d.partner_snapshot else 0) for d in merges} == {1}
    # the partner publishes again between scoring and apply
    api.publish(fed, a, encode_frame(newer, SnapshotMeta(worker_id=a, step=3, epoch=0)))
    return Staged(model, own, near, newer, checkpoint, a, merges)


def resume_until_resolved(url: str, fed: str, staged: Staged) -> StepReportAll:
    resumed = Federation(
        url, fed, staged.model, resume=staged.checkpoint, heartbeat_s=0.2, poll_wait_s=0.1
    )
    out = StepReportAll()
    ids = {d.id for d in staged.merges}
    try:
        deadline = time.monotonic() + 30
        while not ids <= out.ids() and time.monotonic() < deadline:
            report = resumed.step(loss=1.0)
            out.applied += [d for d in report.applied if d.id in ids]
            out.rejected += [(d, why) for d, why in report.rejected if d.id in ids]
            time.sleep(0.01)
        assert ids <= out.ids(), f"decisions {sorted(ids)} not resolved: {out}"
    finally:
        resumed.close()
    return out


@dataclass
class StepReportAll:
    applied: list[Decision] = field(default_factory=list)
    rejected: list[tuple[Decision, str]] = field(default_factory=list)

    def ids(self) -> set[int]:
        return {d.id for d in self.applied} | {d.id for d, _ in self.rejected}


def test_a_decision_applies_exactly_the_partner_snapshot_that_was_scored(
    api: Client, coordinator: Server, fed_name: str
) -> None:
    api.create_federation(fed_name, policy=EVERY)  # type: ignore[arg-type]
    staged = stage_superseded_partner(coordinator.url, api, fed_name)
    done = resume_until_resolved(coordinator.url, fed_name, staged)
    assert not done.rejected, done.rejected
    for name, tp in tethered_layers(staged.model).items():
        want = (staged.own[name] + staged.scored[name]) / 2  # average with the scored v1
        got = tp.current().detach().numpy()
        assert np.allclose(got, want, atol=1e-5), f"layer {name}: not the scored snapshot"


def test_a_decision_whose_partner_snapshot_is_gone_is_acked_rejected_with_the_reason(
    coordinator_process: Callable[..., Any],
) -> None:
    server = coordinator_process(TETHER_SNAPSHOT_PIN_S="0.3")
    with Client(server.url) as api:
        api.create_federation("p", policy=EVERY)  # type: ignore[arg-type]
        staged = stage_superseded_partner(server.url, api, "p")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the pin of v1 lapsed
            try:
                api.tether("p", staged.partner, staged.merges[0].layer, version=1)
            except tetherfed.TetherError:
                break
            time.sleep(0.1)
        done = resume_until_resolved(server.url, "p", staged)
        assert not done.applied, "applied a partner tether other than the one scored"
        for _, why in done.rejected:
            assert "snapshot version 1" in why and "no longer stored" in why, why
        for name, tp in tethered_layers(staged.model).items():
            assert np.array_equal(tp.current().detach().numpy(), staged.own[name])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(tetherfed.TetherError):
                ack = api.get_ack("p", staged.merges[0].id)
                break
            time.sleep(0.1)
        assert ack.outcome == "rejected" and "no longer stored" in str(ack.reason)


def test_a_leaving_worker_acks_the_decisions_it_will_not_apply(
    api: Client, coordinator: Server, fed_name: str
) -> None:
    """Decisions that reach a worker after its last step (or wait at the coordinator) are acked
    `rejected` with the reason when it leaves, not left unacked for ever."""
    api.create_federation(fed_name, policy=EVERY)  # type: ignore[arg-type]
    staged = stage_superseded_partner(coordinator.url, api, fed_name)
    resumed = Federation(coordinator.url, fed_name, staged.model, resume=staged.checkpoint)
    assert resumed.wait_registered(15)
    resumed.close()  # no step: nothing was applied
    for merge in staged.merges:
        ack = api.get_ack(fed_name, merge.id)
        assert ack.outcome == "rejected" and ack.reason == tetherfed.federation._federation.FINISHED


def test_a_worker_that_gets_no_decision_sees_why_once(
    api: Client, coordinator: Server, fed_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tetherfed.federation")
    api.create_federation(fed_name, policy=EVERY | {"warmup_steps": 10**6})  # type: ignore[arg-type]
    fed = joined(coordinator.url, fed_name, tether(mlp(0)))
    try:
        steps_until(fed, lambda: fed.hold is not None and fed.stats.published >= 3, loss=1.0)
        assert fed.hold is not None and fed.hold.code == "warmup", fed.hold
        assert "warm-up" in fed.hold.reason
        worker = api.get_worker(fed_name, str(fed.worker_id))
        assert worker.hold is not None and worker.hold.code == "warmup"
        assert api.get_federation(fed_name).decisions == 0, "a hold is no decision to apply"
    finally:
        fed.close()
    said = [r.getMessage() for r in caplog.records if "holds:" in r.getMessage()]
    assert len(said) == 1, said


def test_decisions_redis_lost_below_a_workers_cursor_are_noticed_and_new_ones_applied(
    coordinator_process: Callable[..., Any],
    redis_url: str,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = coordinator_process()
    with Client(server.url) as admin:
        admin.create_federation("d", policy=EVERY)  # type: ignore[arg-type]
    feds = [joined(server.url, "d", tether(mlp(0))) for _ in range(2)]
    applied: set[int] = set()

    def step_until(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 60
        while not done() and time.monotonic() < deadline:
            for fed in feds:
                applied.update(d.id for d in fed.step(loss=1.0).applied)
            time.sleep(0.01)
        assert done(), f"not reached: applied {sorted(applied)}"

    def lost() -> list[str]:
        return [r.getMessage() for r in caplog.records if "lost decisions" in r.getMessage()]

    try:
        step_until(lambda: min(f._cursor for f in feds) >= 3)
        before = min(f._cursor for f in feds)
        keys, client = Keys(key_prefix), redis.Redis.from_url(redis_url)
        try:  # what a Redis restored from an older copy has: no decision yet, same workers
            with client.pipeline(transaction=True) as pipe:
                pipe.set(keys.decision_seq("d"), 0)
                pipe.unlink(keys.decisions("d"), keys.acks("d"))
                pipe.unlink(*(keys.worker_decisions("d", str(f.worker_id)) for f in feds))
                pipe.execute()
        finally:
            client.close()
        deadline = time.monotonic() + 30
        while len(lost()) < len(feds) and time.monotonic() < deadline:
            time.sleep(0.05)  # the I/O threads poll on their own
        assert len(lost()) == len(feds), lost()
        applied.clear()
        step_until(lambda: any(i <= before for i in applied))
        assert all(f.worker_id is not None for f in feds)
    finally:
        for fed in feds:
            fed.close()
    assert len(lost()) == len(feds), "said once per worker"
