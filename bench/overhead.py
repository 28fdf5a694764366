"""Worker steps/s with the federation on (publishing every step) vs off, and with the federation
plus weight diagnostics at their default schedule (every epoch, 5 % budget) vs off.

The seed-001 model (128-64-10 MLP, static tethers) on CPU, batch 32, Adam. Blocks of steps of the
three arms alternate in one run, so machine noise hits them alike. Target ≥ 0.95 for both rows.
The diagnostics budget is a share of the time its own blocks take (a clock that only runs then).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
from torch import nn

from tetherfed import Client, Diagnostics, Federation, build_model, load_task, tether

from .common import line
from .harness import coordinator

TARGET = 0.95
STEPS_PER_EPOCH = 100  # 3,200 samples / batch 32


class ArmClock:
    """Seconds spent inside `with clock:` blocks only."""

    def __init__(self) -> None:
        self.total, self.since = 0.0, None

    def __call__(self) -> float:
        return self.total + (time.monotonic() - self.since if self.since is not None else 0.0)

    def __enter__(self) -> ArmClock:
        self.since = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.total, self.since = self(), None


def _loop(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: list[Any],
    fed: Federation | None,
    diag: Diagnostics | None = None,
    step0: int = 0,
) -> float:
    """Steps/s of one block of training steps (with `fed.step` when `fed` is given, and
    `diag.step` when `diag` is)."""
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for i, (x, y) in enumerate(batches, start=step0 + 1):
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if fed is not None:
            value = loss.item()
            fed.step(loss=value, epoch=(i - 1) // STEPS_PER_EPOCH)
            if diag is not None:
                diag.step(i, (i - 1) // STEPS_PER_EPOCH, value)
        else:
            loss.item()  # the same device sync the federated loop pays for its loss value
    return len(batches) / (time.perf_counter() - start)


def _row(name: str, on: list[float], off: list[float], params: dict[str, Any]) -> dict[str, Any]:
    ours, ref = sorted(on)[len(on) // 2], sorted(off)[len(off) // 2]
    ratio = ours / ref
    return line(
        name,
        ours=ours,
        reference=ref,
        unit="steps/s",
        ratio=ratio,
        target=f">= {TARGET}",
        passed=ratio >= TARGET,
        params=params,
    )


def run(quick: bool = False, device: str = "cpu") -> list[dict[str, Any]]:
    """Interleave federated, federated + diagnostics and plain blocks; report the median
    steps/s of each as two rows (federation vs off, federation + diagnostics vs off)."""
    torch.manual_seed(0)
    task = load_task("random-classification", seed=0)
    x, y = (t.to(device) for t in task.train.tensors)
    block, repeats = (100, 3) if quick else (500, 9)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 32 * block, 32) if i + 32 <= len(x)]
    batches = (batches * (block // len(batches) + 1))[:block]
    model = tether(build_model("mlp", task, seed=0), "static", seed=0).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    clock = ArmClock()
    probe = task.val.tensors[0][:64].to(device)
    diag = Diagnostics(model, probe=probe, steps_per_epoch=STEPS_PER_EPOCH, clock=clock)
    with coordinator() as coord:
        with Client(coord.url) as api:
            api.create_federation("overhead", policy="default")
        with Federation(coord.url, "overhead", model, name="bench", publish_every=1) as fed:
            if not fed.wait_registered(30):
                raise RuntimeError("the benchmark worker could not register")
            _loop(model, opt, batches[:50], fed)  # warm-up
            on, with_diag, off = [], [], []
            published, on_seconds = fed.stats.published, 0.0
            for r in range(repeats):
                on.append(_loop(model, opt, batches, fed))
                on_seconds += len(batches) / on[-1]
                with clock:
                    with_diag.append(_loop(model, opt, batches, fed, diag, step0=r * block))
                off.append(_loop(model, opt, batches, None))
            published = fed.stats.published - published
            io_budget = fed.io_budget
    params = {
        "model": "mlp 128-64-10",
        "batch": 32,
        "block_steps": block,
        "repeats": repeats,
        "publish_every": 1,
        "device": device,
    }
    fed_params = {"io_budget": io_budget, "publishes_per_s": round(published / on_seconds, 1)}
    diag_params = {
        "diagnostics": "every=epoch",
        "budget": diag.budget,
        "runs": diag.runs,
        "skipped": diag.skipped,
        "share": round(diag.spent / max(clock(), 1e-9), 4),
    }
    return [
        _row("overhead", on, off, params | fed_params),
        _row("overhead-diagnostics", with_diag, off, params | diag_params),
    ]


if __name__ == "__main__":
    device = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--device=")), "cpu")
    for row in run(quick="--quick" in sys.argv, device=device):
        print(json.dumps(row))
