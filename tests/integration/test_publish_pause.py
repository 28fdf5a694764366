"""The I/O budget against a real coordinator: a publish slowed by an outage (a coordinator just
restarted, Redis reloading) pauses publishing at most the cap, not 19× as long as it took; and
the scheduled publishes the budget skips are counted (asserted as counts, never as timings)."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest
import torch
from torch import nn

from tetherfed import Client, Federation, tether
from tetherfed.federation import _io as io_module

pytestmark = [pytest.mark.integration, pytest.mark.torch]


class FirstPublishLate(httpx.HTTPTransport):
    """Real HTTP; the first frame upload (PUT) waits `delay_s` before it is sent."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s, self.delayed = delay_s, False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and not self.delayed:
            self.delayed = True
            time.sleep(self.delay_s)
        return super().handle_request(request)


def test_a_slow_publish_pauses_publishing_at_most_the_cap(
    coordinator_process, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(io_module, "MAX_PUBLISH_PAUSE_S", 1.0)
    coordinator = coordinator_process(TETHER_SCORER_PROCESSES="0")
    with Client(coordinator.url) as api:
        api.create_federation("pause")
    torch.manual_seed(0)
    model = tether(nn.Sequential(nn.Linear(4, 3)))
    # A 4 s publish at a 5 % budget would pause publishing for 76 s; the cap makes it 1 s.
    fed = Federation(
        coordinator.url,
        "pause",
        model,
        name="w",
        publish_every=1,
        transport=FirstPublishLate(4.0),
        io_budget=0.05,
    )
    try:
        assert fed.wait_registered(60), "the worker did not register"
        step_until(fed, lambda: fed.stats.published >= 1, timeout_s=60)
        step_until(fed, lambda: fed.stats.published >= 2, timeout_s=30)
    finally:
        fed.close()


def step_until(fed: Federation, done: Callable[[], bool], timeout_s: float) -> None:
    """Train steps (every 20 ms) until `done()`; fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        fed.step(loss=1.0)
        time.sleep(0.02)
    assert done(), f"{fed.stats.published} publishes after {timeout_s:g} s more"


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return tether(nn.Sequential(nn.Linear(4, 3)))


def wait_until(done: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Poll `done()` without stepping (the I/O thread works meanwhile); fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g} s"
        time.sleep(0.01)


def test_a_tiny_budget_skips_every_scheduled_publish_after_the_first_and_counts_them(
    coordinator_process, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After its first publish the I/O thread pauses 10⁹ × as long as that publish took, capped
    # at an hour here: however slow this machine, every later scheduled publish is skipped.
    monkeypatch.setattr(io_module, "MAX_PUBLISH_PAUSE_S", 3600.0)
    coordinator = coordinator_process(TETHER_SCORER_PROCESSES="0")
    with Client(coordinator.url) as api:
        api.create_federation("tiny")
    fed = Federation(
        coordinator.url, "tiny", tiny_model(), name="w", publish_every=1, io_budget=1e-9
    )
    try:
        assert fed.wait_registered(60), "the worker did not register"
        assert fed.step().published
        wait_until(lambda: fed.stats.published == 1, "the first publish")
        # the pause begins once that publish returned: no snapshot can be taken then
        wait_until(lambda: not fed._io.can_snapshot(), "the budget pause")
        reports = [fed.step() for _ in range(10)]
        assert not any(r.published for r in reports)
        # the first of these is still due; each later one replaced the one due before it
        s = fed.stats
        assert (s.steps, s.scheduled, s.snapshots, s.published, s.skipped) == (11, 11, 1, 1, 9)
    finally:
        fed.close()
    # closing skips the one still due: every scheduled publish was sent or skipped
    s = fed.stats
    assert (s.published, s.skipped) == (1, 10) and s.scheduled == s.published + s.skipped


def test_a_budget_of_one_publishes_every_scheduled_step(coordinator_process) -> None:
    coordinator = coordinator_process(TETHER_SCORER_PROCESSES="0")
    with Client(coordinator.url) as api:
        api.create_federation("whole")
    fed = Federation(
        coordinator.url, "whole", tiny_model(), name="w", publish_every=2, io_budget=1.0
    )
    try:
        assert fed.wait_registered(60), "the worker did not register"
        for sent in range(1, 6):
            assert not fed.step().published  # not scheduled
            assert fed.step().published  # scheduled: no budget pause can hold it
            wait_until(lambda n=sent: fed.stats.published == n, f"publish {sent}")
        s = fed.stats
        assert (s.steps, s.scheduled, s.snapshots, s.published, s.skipped) == (10, 5, 5, 5, 0)
    finally:
        fed.close()
    assert (fed.stats.published, fed.stats.skipped) == (5, 0)


def test_the_io_budget_must_be_a_fraction_of_the_wall_time() -> None:
    for budget in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="io_budget must be in"):
            Federation("http://127.0.0.1:9", "x", tiny_model(), io_budget=budget)


def test_an_offered_snapshot_never_waits_behind_a_decision_long_poll(
    coordinator_process,
) -> None:
    # Long polls held 60 s by the coordinator: a snapshot taken up only between two of them
    # would wait up to that long; offered, it wakes the I/O thread (the poll runs on its own).
    coordinator = coordinator_process(TETHER_SCORER_PROCESSES="0", TETHER_LONG_POLL_MAX_S="60")
    with Client(coordinator.url) as api:
        api.create_federation("awake")
    fed = Federation(
        coordinator.url, "awake", tiny_model(), name="w", io_budget=1.0, poll_wait_s=60.0
    )
    try:
        assert fed.wait_registered(60), "the worker did not register"
        for sent in range(1, 4):
            assert fed.step().published
            wait_until(lambda n=sent: fed.stats.published == n, f"publish {sent}", 30.0)
        assert fed.stats.skipped == 0
    finally:
        fed.close(flush_timeout_s=5.0)
