"""`Policy.fedavg_within = "group"`: FedAvg inside each worker's registered group, the oracle of
clustered FL (it is told the clusters)."""

from __future__ import annotations

import numpy as np

from tether_protocol.messages import Policy, SnapshotMeta
from tether_protocol.operators import apply_operator
from tether_protocol.policy import FederationState, PeerState, PeerTable, decide, trigger

LAYERS = ["fc1", "out"]
GROUPS = {"me": "x", "a": "x", "b": "y", "c": "x", "d": None, "e": None, "f": "y"}


def _state(groups: dict[str, str | None]) -> FederationState:
    # As the scorer builds it: one table of every worker with a full tether, publisher included.
    peers = PeerTable(PeerState(w, step=100, version=2, group=g) for w, g in groups.items())
    return FederationState(
        layer_order=LAYERS,
        peers=peers,
        scores={layer: {p: 0.0 for p in groups if p != "me"} for layer in LAYERS},
    )


def _snap(wid: str = "me", step: int = 100) -> SnapshotMeta:
    return SnapshotMeta(worker_id=wid, step=step, epoch=0, loss=1.0, grad_norm=1.0)


def test_fedavg_within_groups_averages_the_publishers_group_only() -> None:
    policy = Policy(fedavg_every=50, fedavg_within="group")
    rng = np.random.default_rng(0)
    tethers = {w: rng.random((4, 3)) for w in GROUPS}

    result = decide(policy, _state(GROUPS), _snap())
    own = tethers["me"].copy()
    for d in [d for d in result.decisions if d.layer == "fc1"]:
        assert d.operator is not None and d.partner_id is not None
        own = apply_operator(d.operator, d.params, own, tethers[d.partner_id])

    assert {d.partner_id for d in result.decisions} == {"a", "c"}
    assert [d.action for d in result.decisions] == ["merge"] * 4
    group_mean = np.mean([tethers[w] for w in ("me", "a", "c")], axis=0)
    np.testing.assert_allclose(own, group_mean, rtol=1e-12)


def test_workers_without_a_group_average_with_each_other_only() -> None:
    policy = Policy(fedavg_every=50, fedavg_within="group")
    result = decide(policy, _state(GROUPS), _snap("d"))
    assert {d.partner_id for d in result.decisions} == {"e"}


def test_a_lone_member_of_its_group_holds() -> None:
    policy = Policy(fedavg_every=50, fedavg_within="group")
    result = decide(policy, _state({"me": "z", "a": "x", "b": "y"}), _snap())
    assert result.decisions == [] and result.hold is not None


def test_fedavg_over_the_federation_ignores_groups() -> None:
    result = decide(Policy(fedavg_every=50), _state(GROUPS), _snap())
    assert {d.partner_id for d in result.decisions} == set(GROUPS) - {"me"}


def test_a_synchronous_rounds_publish_starts_a_round_whatever_the_trigger() -> None:
    policy = Policy(trigger="plateau", loss_epsilon=0.0, grad_epsilon=0.0, sync_every=10)
    at = SnapshotMeta(worker_id="w", step=20, epoch=0, loss=1.0)
    between = SnapshotMeta(worker_id="w", step=25, epoch=0, loss=1.0)
    assert trigger(policy, at, previous_loss=2.0) == (True, "synchronous round at step 20")
    assert trigger(policy, between, previous_loss=2.0)[0] is False
    warming = policy.model_copy(update={"warmup_steps": 30})
    assert trigger(warming, at, previous_loss=2.0)[0] is False
