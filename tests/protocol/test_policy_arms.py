"""The experiment arms as policies: fedavg (running-mean merges on a schedule) and independent
(no round ever fires)."""

from __future__ import annotations

import numpy as np

from tether_protocol.messages import Policy, SnapshotMeta
from tether_protocol.operators import apply_operator
from tether_protocol.policy import FederationState, PeerState, decide
from tetherfed.launch._launch import arm_policy

LAYERS = ["fc1", "out"]


def _state(
    peers: list[str], cooldowns: dict[tuple[str, str], int] | None = None
) -> FederationState:
    return FederationState(
        layer_order=LAYERS,
        peers={p: PeerState(worker_id=p, step=100, version=2) for p in peers},
        scores={layer: {p: 0.0 for p in peers} for layer in LAYERS},
        cooldowns=cooldowns or {},
    )


def _snap(step: int) -> SnapshotMeta:
    return SnapshotMeta(worker_id="me", step=step, epoch=0, loss=1.0, grad_norm=1.0)


def test_fedavg_merges_reproduce_the_federation_mean() -> None:
    # Prepare
    policy = arm_policy(Policy(), "fedavg", fedavg_every=50)
    rng = np.random.default_rng(0)
    tethers = {w: rng.random((4, 3)) for w in ["me", "a", "b", "c"]}

    # Execute
    result = decide(policy, _state(["a", "b", "c"]), _snap(step=100))
    own = tethers["me"].copy()
    for d in [d for d in result.decisions if d.layer == "fc1"]:
        assert d.operator is not None and d.partner_id is not None
        own = apply_operator(d.operator, d.params, own, tethers[d.partner_id])

    # Assert
    assert result.triggered and [d.action for d in result.decisions] == ["merge"] * 6
    np.testing.assert_allclose(own, np.mean(list(tethers.values()), axis=0), rtol=1e-12)


def test_fedavg_waits_for_the_next_multiple_of_its_period() -> None:
    policy = arm_policy(Policy(), "fedavg", fedavg_every=50)
    averaged_at_100 = {(layer, p): 100 for layer in LAYERS for p in ["a", "b"]}

    too_early = decide(policy, _state(["a", "b"]), _snap(step=40))
    same_period = decide(policy, _state(["a", "b"], averaged_at_100), _snap(step=140))
    next_period = decide(policy, _state(["a", "b"], averaged_at_100), _snap(step=150))

    assert not too_early.decisions and not same_period.decisions
    assert len(next_period.decisions) == 4, next_period.decisions


def test_independent_arm_never_decides() -> None:
    policy = arm_policy(Policy(trigger="every_publish", merge_threshold=-0.5), "independent", 50)
    flat = SnapshotMeta(worker_id="me", step=100, epoch=0, loss=1.0, grad_norm=0.0, plateau=False)
    result = decide(policy, _state(["a", "b"]), flat)
    assert not result.triggered and result.decisions == []
