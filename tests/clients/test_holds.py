"""A worker whose rounds keep deciding nothing for a reason the user can fix is told once, with
the counts and what to change (`tetherfed.federation._holds`), and its run summary counts the
rounds held by code. The streak rules on real `Hold` messages, then a real coordinator and
`Federation` whose rounds hold for `no_partner` (a worker alone), `out_of_scope` (a policy naming
no layer of it) and `stale_partners` (a partner far behind)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import torch
from torch import nn

from tether_protocol.messages import Hold
from tetherfed import Federation, tether
from tetherfed.client import Client
from tetherfed.federation._holds import ADVICE, WARN_AFTER, HoldTally
from tetherfed.launch._launch import WorkerRow


def hold(code: str, version: int) -> Hold:
    return Hold(code=code, reason=code, step=version, version=version, at=datetime.now(UTC))


def test_a_streak_of_fixable_holds_is_told_once_with_counts_and_changes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tetherfed.federation")
    tally = HoldTally(warn_after=4)
    said = [
        tally.observe(hold(code, v), "w1")
        for v, code in enumerate(
            ["warmup", "stale_partners", "no_partner", "stale_partners", "warmup", "stale_partners"]
        )
    ]
    assert said[:5] == [None] * 5, "warm-up rounds are the schedule: neither counted nor a reset"
    assert said[5] == (
        "worker w1: 4 scoring rounds in a row decided nothing for it (stale_partners 3, "
        f"no_partner 1). stale_partners: {ADVICE['stale_partners']}; no_partner: "
        f"{ADVICE['no_partner']}"
    )
    assert [r.getMessage() for r in caplog.records] == [said[5]]
    # More of the same: no second warning; the same round seen by another poll counts once.
    assert tally.observe(hold("stale_partners", 6), "w1") is None
    assert tally.observe(hold("stale_partners", 6), "w1") is None
    assert tally.counts == {"warmup": 2, "stale_partners": 4, "no_partner": 1}


@pytest.mark.parametrize("ending", ["decided", "within_thresholds"])
def test_a_round_that_decides_or_scores_partners_ends_the_streak(ending: str) -> None:
    tally = HoldTally(warn_after=3)
    for v in range(2):
        assert tally.observe(hold("cooldown", v), "w") is None
    if ending == "decided":
        assert tally.observe(None, "w") is None  # the latest round decided: the hold is cleared
    else:
        assert tally.observe(hold("within_thresholds", 2), "w") is None
    assert tally.observe(hold("cooldown", 3), "w") is None, "the streak started over"
    assert tally.observe(hold("cooldown", 4), "w") is None
    assert tally.observe(hold("cooldown", 5), "w") is not None, "and warns again when it is long"


def test_hold_counts_reach_the_run_summary_row() -> None:
    row = WorkerRow("worker-0")
    row.update({"event": "done", "holds": {"no_partner": 12, "warmup": 3}})
    assert row.holds == {"no_partner": 12, "warmup": 3}


# -- a real coordinator ---------------------------------------------------------------------------

EVERY = {"measure": "pearson", "trigger": "every_publish", "cooldown_steps": 0}


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return tether(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), seed=seed)


def steps_until(fed: Federation, done: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        fed.step(loss=1.0)
        time.sleep(0.01)
    assert done(), f"not reached in {timeout_s:.0f} s: holds {fed.holds}"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("code", "policy", "partner"),
    [
        ("no_partner", EVERY, False),
        ("out_of_scope", EVERY | {"layers": ["not-a-layer"]}, False),
        ("stale_partners", EVERY | {"max_staleness_steps": 1}, True),
    ],
)
def test_a_worker_whose_rounds_all_hold_is_warned_once(
    coordinator_process: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
    code: str,
    policy: dict[str, Any],
    partner: bool,
) -> None:
    caplog.set_level(logging.WARNING, logger="tetherfed.federation")
    url = coordinator_process().url
    fed_name = f"holds-{uuid.uuid4().hex[:8]}"

    with Client(url) as client:
        client.create_federation(fed_name, policy)  # type: ignore[arg-type]
    others: list[Federation] = []
    if partner:  # publishes once at step 0, then never again: far behind the other
        behind = Federation(url, fed_name, model(1), name="behind", publish_every=1)
        assert behind.wait_registered(15)
        behind.step(loss=1.0)
        others.append(behind)
    fed = Federation(url, fed_name, model(0), name="w", publish_every=1, poll_wait_s=0.05)
    try:
        assert fed.wait_registered(15)
        steps_until(fed, lambda: fed.holds.get(code, 0) >= WARN_AFTER + 2)
    finally:
        fed.close()
        for other in others:
            other.close()
    warned = [
        r.getMessage() for r in caplog.records if "in a row decided nothing" in r.getMessage()
    ]
    assert len(warned) == 1, warned
    assert f"({code} " in warned[0] and ADVICE[code] in warned[0], warned[0]
