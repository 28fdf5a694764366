"""`--train tethers|weights|both`: what the worker's optimizer may change (real worker runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from tetherfed import WorkerConfig, build_model, load_task, run_worker, tether


def initial_state(seed: int) -> dict[str, torch.Tensor]:
    task = load_task("sin", seed=seed)
    return tether(build_model("relu-chain-888", task, seed=seed), "learned", seed=seed).state_dict()


def trained_state(tmp_path: Path, train: str) -> dict[str, torch.Tensor]:
    cfg = WorkerConfig(
        task="sin",
        model="relu-chain-888",
        seed=3,
        steps=20,
        tether_mode="learned",
        train=train,  # type: ignore[arg-type]
        checkpoint_dir=tmp_path / train,
        eval_every=20,
        log_every=20,
        device="cpu",
        lr=1e-2,
    )
    run_worker(cfg)
    saved = torch.load(tmp_path / train / "latest.pt", weights_only=False)
    return saved["model"]  # type: ignore[no-any-return]


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_frozen_weights_mode_changes_only_tethers(tmp_path: Path) -> None:
    before = initial_state(3)
    tethers = {k for k in before if k.endswith(".logits")}
    assert tethers and len(tethers) < len(before)
    assert changed(before, trained_state(tmp_path, "tethers")) == tethers
    weights_only = changed(before, trained_state(tmp_path, "weights"))
    assert weights_only and not weights_only & tethers
    assert changed(before, trained_state(tmp_path, "both")) >= tethers | weights_only


def test_tethers_only_needs_learned_tethers() -> None:
    with pytest.raises(ValidationError, match="needs tether_mode='learned'"):
        WorkerConfig(train="tethers", tether_mode="static")
