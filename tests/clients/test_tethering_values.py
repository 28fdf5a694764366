"""what a tether accumulates from gradients stays finite."""

from __future__ import annotations

import torch
from torch import nn

from tetherfed import get_tether, tether, update_importance


def test_a_nan_gradient_leaves_the_importance_ema_and_tether_finite() -> None:
    net = tether(nn.Linear(3, 2), "importance", importance_every=2)
    for bad in (float("nan"), float("inf"), 1.0, 1.0):  # refreshed on the 2nd and 4th call
        net.zero_grad()
        (net(torch.ones(1, 3)).sum() * bad).backward()
        update_importance(net)
    tp = net.parametrizations.weight[0]
    assert torch.isfinite(tp.ema).all(), tp.ema
    assert torch.isfinite(get_tether(net)).all() and float(get_tether(net).max()) == 1.0


def test_a_nan_logit_reads_as_a_finite_tether() -> None:
    net = tether(nn.Linear(3, 2), "learned")
    with torch.no_grad():
        net.parametrizations.weight[0].logits[0, 0] = float("nan")
    value = get_tether(net)
    assert torch.isfinite(value).all() and float(value[0, 0]) == 0.5
    assert torch.isfinite(net(torch.ones(1, 3))).all()
