"""What tethering and federating cost on real architectures: step time, memory, frame size and
publish time for ResNet-18, ResNet-50 and a small GPT-2.

Per model, three arms train on the same batches in interleaved blocks (so machine noise hits them
alike): `untethered` (the plain model), `tethered` (`tether(model, "static")`: W_eff = W ⊙ T on
every tetherable weight) and `federated` (tethered, plus a `Federation` publishing every step to
a local coordinator under the default I/O budget). Memory is counted, not sampled: parameters,
tethers (the tensors `tether()` adds) and the federation's host buffers (two float32 copies of
the tethers, so a snapshot is copied while the previous one is sent). A publish is timed on its
own: one frame of every tether, encoded and PUT to the coordinator, median of three.

The row's figure is the largest tethered / untethered step-time ratio over the models (target
≤ 1.10); each model's figures are in `params`. The models are built here with torchvision's and
Hugging Face's shapes (ResNet: He et al. 2016, "Deep Residual Learning for Image Recognition";
GPT-2: Radford et al. 2019), on random init with synthetic data: what is measured is cost, not
accuracy. Inputs are small (64 × 64 images, 64 tokens) so a 2-core machine finishes.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from tether_protocol.frame import encode_frame
from tether_protocol.messages import SnapshotMeta
from tetherfed import Client, Federation, tether
from tetherfed.federation._session import layer_specs
from tetherfed.tethers._tethering import tethered_layers

from .common import line
from .harness import coordinator

TARGET = 1.10
MB = 1 << 20


# -- the architectures (torchvision's shapes, built here: torchvision is not a dependency) --------


class BasicBlock(nn.Module):
    """ResNet-18/34's block: conv3x3-bn-relu-conv3x3-bn, plus the (projected) input."""

    expansion = 1

    def __init__(self, inp: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(inp, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.downsample = _projection(inp, out, stride)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.downsample(x))


class Bottleneck(nn.Module):
    """ResNet-50's block: conv1x1-bn-relu-conv3x3-bn-relu-conv1x1-bn, plus the input."""

    expansion = 4

    def __init__(self, inp: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(inp, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = _projection(inp, out, stride)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + self.downsample(x))


def _projection(inp: int, out: int, stride: int) -> nn.Module:
    if stride == 1 and inp == out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))


def resnet(
    block: type[BasicBlock] | type[Bottleneck], depths: list[int], classes: int = 1000
) -> nn.Module:
    """torchvision's ResNet layout: stem, four stages of `depths` blocks, pooling, a linear head."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    inp = 64
    for stage, depth in enumerate(depths):
        width = 64 << stage
        for i in range(depth):
            layers.append(block(inp, width, 2 if i == 0 and stage > 0 else 1))
            inp = width * block.expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inp, classes)]
    return nn.Sequential(*layers)


def gpt2() -> nn.Module:
    """Hugging Face's GPT2LMHeadModel, 2 layers, 128 wide, GPT-2's vocabulary (random init)."""
    import transformers  # noqa: PLC0415 (a test extra, loaded only for this model)

    config = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=128)
    return transformers.GPT2LMHeadModel(config)


Batch = tuple[Tensor, Tensor]
Loss = Callable[[nn.Module, Batch], Tensor]


def _image_loss(model: nn.Module, batch: Batch) -> Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _lm_loss(model: nn.Module, batch: Batch) -> Tensor:
    return model(input_ids=batch[0], labels=batch[1]).loss  # type: ignore[no-any-return]


def _models(
    quick: bool,
) -> list[tuple[str, Callable[[], nn.Module], Callable[[torch.Generator], Batch], Loss]]:
    def images(gen: torch.Generator) -> Batch:
        return torch.randn(8, 3, 64, 64, generator=gen), torch.randint(0, 1000, (8,), generator=gen)

    def tokens(gen: torch.Generator) -> Batch:
        ids = torch.randint(0, 50257, (8, 64), generator=gen)
        return ids, ids

    rows = [
        ("resnet-18", lambda: resnet(BasicBlock, [2, 2, 2, 2]), images, _image_loss),
        ("gpt2-2x128", gpt2, tokens, _lm_loss),
    ]
    if not quick:
        rows.insert(1, ("resnet-50", lambda: resnet(Bottleneck, [3, 4, 6, 3]), images, _image_loss))
    return rows


# -- measuring ------------------------------------------------------------------------------------


def _block(model: nn.Module, loss_fn: Loss, batches: list[Batch], fed: Federation | None) -> float:
    """Seconds per step over one block of training steps."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    start = time.perf_counter()
    for batch in batches:
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        if fed is not None:
            fed.step(loss=value)
    return (time.perf_counter() - start) / len(batches)


def _publish_s(url: str, fed_name: str, model: nn.Module) -> tuple[float, int]:
    """Median seconds of three one-frame publishes of every tether, and the frame's bytes."""
    layers = tethered_layers(model)
    tensors = {name: tp.current().detach().float().numpy() for name, tp in layers.items()}
    with Client(url) as client:
        wid = client.register_worker(fed_name, "publish-timer", layer_specs(layers, "float32"))
        seconds, size = [], 0
        for step in range(3):
            meta = SnapshotMeta(worker_id=wid.worker_id, step=step, epoch=0)
            start = time.perf_counter()
            frame = encode_frame(tensors, meta)
            client.publish(fed_name, wid.worker_id, frame)
            seconds.append(time.perf_counter() - start)
            size = len(frame)
    return statistics.median(seconds), size


def _measure(
    name: str,
    build: Callable[[], nn.Module],
    data: Callable[[torch.Generator], Batch],
    loss_fn: Loss,
    url: str,
    quick: bool,
) -> dict[str, Any]:
    torch.manual_seed(0)
    plain = build().train()
    tethered = tether(copy.deepcopy(plain), "static", seed=0).train()
    federated = tether(copy.deepcopy(plain), "static", seed=0).train()
    gen = torch.Generator().manual_seed(0)
    steps, repeats = (2, 2) if quick else (5, 5)
    batches = [data(gen) for _ in range(steps)]
    params = sum(p.numel() for p in plain.parameters())
    layers = tethered_layers(tethered)
    tether_values = sum(tp.storage().numel() for tp in layers.values())
    with Client(url) as client:
        client.create_federation(name, policy="default")
    with Federation(url, name, federated, name=name, publish_every=1) as fed:
        if not fed.wait_registered(60):
            raise RuntimeError(f"{name}: the benchmark worker could not register")
        arms: dict[str, list[float]] = {"untethered": [], "tethered": [], "federated": []}
        runs = {
            "untethered": lambda: _block(plain, loss_fn, batches, None),
            "tethered": lambda: _block(tethered, loss_fn, batches, None),
            "federated": lambda: _block(federated, loss_fn, batches, fed),
        }
        for fn in runs.values():  # warm-up (allocator, autograd graph, first publish)
            fn()
        for r in range(repeats):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for arm in order:
                arms[arm].append(runs[arm]())
        published, skipped = fed.stats.published, fed.stats.skipped
    publish_s, frame_bytes = _publish_s(url, name, tethered)
    step = {arm: statistics.median(s) for arm, s in arms.items()}
    return {
        "parameters": params,
        "tethered_share": round(tether_values / params, 4),
        "step_s": {arm: round(s, 4) for arm, s in step.items()},
        "tethered_ratio": round(step["tethered"] / step["untethered"], 3),
        "federated_ratio": round(step["federated"] / step["untethered"], 3),
        "memory_mb": {
            "parameters": round(params * 4 / MB, 1),
            "tethers": round(tether_values * 4 / MB, 1),
            "host_buffers": round(2 * tether_values * 4 / MB, 1),
        },
        "frame_mb": round(frame_bytes / MB, 2),
        "publish_s": round(publish_s, 4),
        "publishes": published,
        "publishes_skipped": skipped,
    }


def run(quick: bool = False) -> dict[str, Any]:
    """One row: the largest tethered / untethered step-time ratio; each model's figures in
    `params.models`."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    figures: dict[str, Any] = {}
    with coordinator() as coord:
        for name, build, data, loss_fn in _models(quick):
            figures[name] = _measure(name, build, data, loss_fn, coord.url, quick)
    worst = max(f["tethered_ratio"] for f in figures.values())
    return line(
        "models",
        ours=worst,
        reference=1.0,
        unit="tethered / untethered step time (worst model)",
        ratio=worst,
        target=f"<= {TARGET}",
        passed=worst <= TARGET,
        params={"models": figures, "batch": 8, "image": "3x64x64", "tokens": 64, "device": "cpu"},
    )


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv)))
