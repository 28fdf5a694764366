"""Probe batches: one shared input batch per probe seed, Grams per tethered layer, own loss."""

from __future__ import annotations

import numpy as np
import torch

from tether_protocol.compat import probe_gram
from tetherfed import Probe, build_model, load_task, tether


def probe_for(task_name: str, seed: int) -> Probe:
    task = load_task(task_name, seed=seed)
    model = tether(build_model("relu-chain-888", task, seed=seed), "static", seed=seed)
    return Probe(model, task, torch.device("cpu"), seed=seed)


def test_workers_on_tasks_with_one_input_distribution_share_the_probe_inputs() -> None:
    a, b = probe_for("sin", 1), probe_for("piecewise", 2)
    assert torch.equal(a.inputs(7, 16), b.inputs(7, 16))
    assert not torch.equal(a.inputs(7, 16), a.inputs(8, 16))
    assert not torch.equal(a.own[0], b.own[0])  # the gate's batch is the worker's own


def test_grams_are_the_centred_unit_norm_grams_of_each_layer_output() -> None:
    probe = probe_for("sin", 0)
    grams = probe.grams(0, 24)
    assert list(grams) == ["fc1", "fc2", "fc3", "out"]
    x = probe.inputs(0, 24)
    with torch.no_grad():
        hidden = probe.model.fc1(x)  # type: ignore[operator]
    np.testing.assert_allclose(grams["fc1"], probe_gram(hidden.numpy()), atol=1e-6)
    assert grams["fc1"].shape == (24, 24) and abs(np.linalg.norm(grams["fc1"]) - 1) < 1e-5
    assert np.allclose(grams["fc1"].sum(axis=0), 0, atol=1e-5)
    assert probe.model.training  # the probe pass leaves train mode as it found it


def test_probe_loss_is_the_task_loss_on_the_own_batch() -> None:
    probe = probe_for("sin", 0)
    with torch.no_grad():
        expected = float(probe.task.loss_fn(probe.model(probe.own[0]), probe.own[1]))
    assert probe.loss() == expected
