"""A torch worker under a sketch policy: sketch frames between full ones, and merges applied."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import torch
from torch import nn

from tetherfed import Client, Federation, tether
from tetherfed_coordinator.keys import Keys

pytestmark = pytest.mark.integration

POLICY = {
    "measure": "pearson",
    "trigger": "every_publish",
    "cooldown_steps": 0,
    "merge_threshold": 0.5,
    "drift_threshold": -0.5,
    "max_merges_per_epoch": 1000,
    "max_staleness_steps": None,
    "sketch": {"k": 256, "seed": 5, "min_values": 4096, "full_every": 3},
}


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 4))  # 8,192 and 256 values


def test_workers_publish_sketches_between_full_tethers_and_apply_merges(
    coordinator_process: Callable[..., Any], redis_url: str, key_prefix: str
) -> None:
    # Prepare: two workers with identical static tethers (seed 3) under a sketch policy.
    coordinator = coordinator_process()
    with Client(coordinator.url) as api:
        api.create_federation("sk", policy=POLICY)  # type: ignore[arg-type]
    feds = [
        Federation(
            coordinator.url,
            "sk",
            tether(model(i), "static", seed=3),
            name=f"w{i}",
            heartbeat_s=0.5,
            poll_wait_s=0.2,
            io_budget=1.0,
        )
        for i in range(2)
    ]
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert all(f.wait_registered(15) for f in feds)
        # Execute: step until each worker published 7 times and a merge was applied.
        applied: list[Any] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            min(f.stats.published for f in feds) < 7 or not applied
        ):
            for f in feds:
                applied += f.step(loss=1.0, epoch=0).applied
            time.sleep(0.01)
        # Assert: both kinds of publish reached the coordinator; merges came from sketch scores.
        keys = Keys(key_prefix)
        for f in feds:
            assert f.worker_id is not None
            assert r.hget(keys.sketch("sk", f.worker_id), "version"), "no sketch publish stored"
            assert r.hget(keys.snapshot_meta("sk", f.worker_id), "version"), "no full publish"
        assert applied and all(d.action == "merge" and d.score > 0.9 for d in applied)
    finally:
        for f in feds:
            f.close()
        r.close()
