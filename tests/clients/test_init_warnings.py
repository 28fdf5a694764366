"""A run whose merges average weights warns when its workers did not start from one init (pure:
the plan, and the digests the workers registered)."""

from __future__ import annotations

import pytest

from tether_protocol.messages import Policy
from tetherfed.launch._launch import RunPlan, init_warnings, plan_workers
from tetherfed.worker._options import WorkerOptions

pytestmark = pytest.mark.torch  # WorkerOptions checks task names against the task table


def plan(scope: str, init: str) -> RunPlan:
    groups = [("a", 2, WorkerOptions(task="sin")), ("b", 1, WorkerOptions(task="sin"))]
    return RunPlan(
        federation="f",
        policy=Policy(merge_scope=scope),  # type: ignore[arg-type]
        init=init,  # type: ignore[arg-type]
        workers=plan_workers(groups, seed=0, init=init, devices=0),  # type: ignore[arg-type]
    )


def test_independent_inits_warn_only_when_weights_are_averaged() -> None:
    assert init_warnings(plan("tethers", "independent"), {}) == []
    for scope in ("weights", "model"):
        (warning,) = init_warnings(plan(scope, "independent"), {})
        assert f"merge_scope {scope!r}" in warning and "init = 'independent'" in warning


def test_registered_digests_that_differ_name_the_workers_that_share_one() -> None:
    shared = plan("model", "shared")
    assert init_warnings(shared, {}) == []
    assert init_warnings(shared, {"worker-0": "aa", "worker-1": "aa", "worker-2": "aa"}) == []
    (warning,) = init_warnings(shared, {"worker-0": "aa", "worker-1": "aa", "worker-2": "bb"})
    assert "2 different initial parameters (worker-0, worker-1; worker-2)" in warning


def test_the_launcher_reads_the_meta_key_the_federation_registers() -> None:
    from tetherfed.launch._launch import INIT_DIGEST
    from tetherfed.tethers._tethering import INIT_DIGEST_KEY

    assert INIT_DIGEST == INIT_DIGEST_KEY
