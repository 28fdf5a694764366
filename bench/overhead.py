"""Worker steps/s with the federation on (publishing every step) vs off.

The seed-001 model (128-64-10 MLP, static tethers) on CPU, batch 32, Adam. Blocks of steps with
and without `fed.step(...)` alternate in one run, so machine noise hits both alike. Target ≥ 0.95.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
from torch import nn

from bench.common import line
from bench.harness import coordinator
from tetherfed import Client, Federation, build_model, load_task, tether

TARGET = 0.95


def _loop(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list[Any], fed: Federation | None
) -> float:
    """Steps/s of one block of training steps (with `fed.step` when `fed` is given)."""
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for x, y in batches:
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if fed is not None:
            fed.step(loss=loss.item(), epoch=0)
        else:
            loss.item()  # the same device sync the federated loop pays for its loss value
    return len(batches) / (time.perf_counter() - start)


def run(quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Interleave federated and plain blocks; report the median steps/s of each."""
    torch.manual_seed(0)
    task = load_task("random-classification", seed=0)
    x, y = (t.to(device) for t in task.train.tensors)
    block, repeats = (100, 3) if quick else (500, 9)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 32 * block, 32) if i + 32 <= len(x)]
    batches = (batches * (block // len(batches) + 1))[:block]
    model = tether(build_model("mlp", task, seed=0), "static", seed=0).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with coordinator() as coord:
        with Client(coord.url) as api:
            api.create_federation("overhead", policy="default")
        with Federation(coord.url, "overhead", model, name="bench", publish_every=1) as fed:
            if not fed.wait_registered(30):
                raise RuntimeError("the benchmark worker could not register")
            _loop(model, opt, batches[:50], fed)  # warm-up
            on, off = [], []
            published, on_seconds = fed.stats.published, 0.0
            for _ in range(repeats):
                on.append(_loop(model, opt, batches, fed))
                on_seconds += len(batches) / on[-1]
                off.append(_loop(model, opt, batches, None))
            published = fed.stats.published - published
            io_budget = fed.io_budget
    on.sort()
    off.sort()
    ours, ref = on[len(on) // 2], off[len(off) // 2]
    ratio = ours / ref
    return line(
        "overhead",
        ours=ours,
        reference=ref,
        unit="steps/s",
        ratio=ratio,
        target=f">= {TARGET}",
        passed=ratio >= TARGET,
        params={
            "model": "mlp 128-64-10",
            "batch": 32,
            "block_steps": block,
            "repeats": repeats,
            "publish_every": 1,
            "device": device,
            "publishes_per_s": round(published / on_seconds, 1),
            "io_budget": io_budget,
        },
    )


if __name__ == "__main__":
    device = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--device=")), "cpu")
    print(json.dumps(run(quick="--quick" in sys.argv, device=device)))
