"""Wire messages: strictness, versioning, validation messages."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tether_protocol.messages import (
    AckCreate,
    FederationCreate,
    Heartbeat,
    Policy,
    PolicyPatch,
    SnapshotMeta,
    WorkerCreate,
)


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="extra"):
        Heartbeat.model_validate({"step": 1, "epoch": 0, "lr": 0.1})


def test_protocol_version_is_checked() -> None:
    with pytest.raises(ValidationError, match="unsupported protocol version 2"):
        Heartbeat.model_validate({"step": 1, "epoch": 0, "protocol": 2})


def test_federation_create_accepts_a_preset_or_a_policy() -> None:
    assert FederationCreate(name="f", policy="seed").resolved_policy().measure == "dot"
    custom = FederationCreate.model_validate({"name": "f", "policy": {"measure": "cosine"}})
    assert custom.resolved_policy().measure == "cosine"
    with pytest.raises(ValidationError):
        FederationCreate(name="bad name!", policy="default")


def test_layer_table_rejects_duplicates_and_bad_shapes() -> None:
    with pytest.raises(ValidationError, match="appears twice"):
        WorkerCreate.model_validate(
            {"name": "w", "layers": [{"name": "a", "shape": [2]}, {"name": "a", "shape": [3]}]}
        )
    with pytest.raises(ValidationError):
        WorkerCreate.model_validate({"name": "w", "layers": [{"name": "a", "shape": [0]}]})


def test_policy_patch_revalidates_the_whole_policy() -> None:
    assert PolicyPatch(merge_threshold=0.8).apply(Policy()).merge_threshold == 0.8
    with pytest.raises(ValidationError, match="drift_threshold"):
        PolicyPatch(drift_threshold=0.9).apply(Policy())


def test_policy_patch_has_every_policy_field_optional_and_constrained() -> None:
    assert list(PolicyPatch.model_fields) == list(Policy.model_fields)
    assert all(f.default is None for f in PolicyPatch.model_fields.values())
    schema = PolicyPatch.model_json_schema()
    assert schema["title"] == "PolicyPatch" and schema["additionalProperties"] is False
    assert PolicyPatch(max_staleness_steps=None).model_dump(exclude_unset=True) == {
        "max_staleness_steps": None
    }
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        PolicyPatch(merge_alpha=2.0)
    with pytest.raises(ValidationError, match="extra"):
        PolicyPatch.model_validate({"merge_treshold": 0.5})


def test_snapshot_meta_rejects_non_finite_loss() -> None:
    with pytest.raises(ValidationError, match="finite"):
        SnapshotMeta(worker_id="w", step=0, epoch=0, loss=float("nan"))


def test_acks_need_a_generation_or_a_reason() -> None:
    assert AckCreate(outcome="applied", generation=3).generation == 3
    with pytest.raises(ValidationError, match="needs a reason"):
        AckCreate(outcome="rejected")
    with pytest.raises(ValidationError, match="new generation"):
        AckCreate(outcome="applied")
