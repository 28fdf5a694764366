"""Chaos finding: the I/O budget paused publishing 19× as long as a publish took, so one
publish slowed by an outage (a coordinator just restarted, Redis reloading) stopped a worker's
publishes for minutes. The pause is capped; here a real coordinator answers one publish late."""

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
