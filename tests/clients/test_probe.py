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


def test_probe_grams_cover_layers_named_after_their_parameter() -> None:
    """Layers of attention and recurrent modules are named "<module>.<param>" and their modules
    answer with tuples: the probe records the output tensor of the module holding the weight."""
    from torch import nn
    from torch.utils.data import TensorDataset

    import tetherfed

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.rnn = nn.GRU(8, 8, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, _ = self.attn(x, x, x)
            h, _ = self.rnn(h)
            return self.head(h[:, -1])

    model = tetherfed.tether(Seq(), seed=0)
    x = torch.randn(40, 5, 8)
    y = torch.randint(0, 3, (40,))
    data = TensorDataset(x, y)
    task = tetherfed.Task(
        "seq", data, data, nn.functional.cross_entropy, "classification", (5, 8), 3
    )

    grams = tetherfed.Probe(model, task, torch.device("cpu"), seed=0).grams(seed=1, size=16)

    assert set(grams) == set(tetherfed.tethered_layers(model))
    assert {"attn.in_proj_weight", "rnn.weight_ih_l0", "head"} <= set(grams)
    assert all(g.shape == (16, 16) for g in grams.values())
