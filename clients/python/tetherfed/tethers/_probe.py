"""Probe batches: the federation's shared inputs (for `cka`) and a worker's own labelled batch
(for the merge gate).

`cka` compares what two workers' layers compute on the *same* inputs (Kornblith et al. 2019), so
every worker draws its probe inputs from the federation's `probe_seed` with its task's input
sampler: workers on tasks with one input distribution (e.g. `sin` and `piecewise`, both
x ~ U[-3, 3]) see identical probe batches whatever their own seeds. For each tethered layer the
worker publishes the double-centred Gram of the layer's outputs on those inputs
(`tether_protocol.compat.probe_gram`), n × n for n = `probe_size`, never the activations.

The merge gate evaluates the worker's task loss on its own probe batch, ``Probe.own``: a fixed
sample, drawn from its seed, of ``held_out`` when the worker has one, else of its training set;
never of the validation set, which stays for reporting (a gate tuned on it would bias the
reported validation figures towards the merges it kept). A worker that trains on a shard passes
its group's gate reserve (`tetherfed.worker._tasks.shard`): training examples no worker of its
group trains on, so a merge is judged on data the worker has not memorised. On a small shard its
own examples are fit almost exactly, and any merge raises their loss, helpful or not; on
held-out data a merge that generalises lowers it. A partner of the same group never trained on
the reserve either, so merging with it is not favoured by memorisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from tether_protocol.compat import probe_gram

from ._task import Task, probe_inputs
from ._tethering import tetherable_weights, tethered_layers

GATE_BATCH = 256  # examples in a worker's own probe batch (the merge gate's)


class Probe:
    """Probe computations for one tethered model on one task (call on the training thread).

    ``own``: the merge gate's batch (inputs, targets), at most ``gate_batch`` examples of
    ``held_out`` (when given; e.g. a sharded worker's gate reserve) or else of the task's
    training set, picked by a permutation seeded by ``seed``.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        device: torch.device,
        seed: int,
        gate_batch: int = GATE_BATCH,
        held_out: TensorDataset | None = None,
    ) -> None:
        self.model, self.task, self.device = model, task, device
        self.sources = _output_sources(model)
        if held_out is not None and len(held_out) == 0:
            raise ValueError("held_out is empty: the merge gate would have nothing to judge on")
        source = held_out if held_out is not None else task.train
        x, y = source.tensors[:2]
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:gate_batch]
        self.own = (x[pick].to(device), y[pick].to(device))
        self._inputs: dict[tuple[int, int], Tensor] = {}

    def inputs(self, seed: int, size: int) -> Tensor:
        """The federation's probe inputs (size × input shape) for `seed`, cached."""
        key = (seed, size)
        if key not in self._inputs:
            self._inputs[key] = probe_inputs(self.task, size, seed).to(self.device)
        return self._inputs[key]

    @torch.no_grad()
    def grams(self, seed: int, size: int) -> dict[str, npt.NDArray[np.float32]]:
        """Layer → centred, unit-norm n × n probe Gram of the layer's outputs."""
        modules = {m for chain in self.sources.values() for m in chain}
        with _evaluating(self.model), _outputs(modules) as seen:
            self.model(self.inputs(seed, size))
        grams = {}
        for name, chain in self.sources.items():
            out = next((seen[id(m)] for m in chain if id(m) in seen), None)
            if out is not None:
                grams[name] = probe_gram(out.float().cpu().numpy())
        return grams

    @torch.no_grad()
    def loss(self) -> float:
        """The task loss on the worker's own probe batch (NaN-safe: inf when not finite)."""
        with _evaluating(self.model):
            value = float(self.task.loss_fn(self.model(self.own[0]), self.own[1]))
        return value if math.isfinite(value) else math.inf


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _output_sources(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Tethered layer -> the modules whose output stands for it, nearest first: the module holding
    the weight, then its ancestors. A layer's Gram is that of the first one that ran: attention's
    `out_proj` is never called (its weight is used inside the attention module's forward), so the
    attention block's output stands for it."""
    weights = tetherable_weights(model)
    named = dict(model.named_modules())
    qualified = {id(m): n for n, m in reversed(list(named.items()))}
    sources = {}
    for layer in tethered_layers(model):
        path = qualified.get(id(weights[layer][0]), "")
        parts = path.split(".") if path else []
        chain = [".".join(parts[:k]) for k in range(len(parts), -1, -1)]
        sources[layer] = [named[p] for p in chain if p in named]
    return sources


@contextmanager
def _outputs(modules: Iterable[nn.Module]) -> Iterator[dict[int, Tensor]]:
    """Record each module's output during a forward pass, by module id (hooks removed after)."""
    seen: dict[int, Tensor] = {}

    def recorder(name: int) -> Callable[[nn.Module, Any, Tensor], None]:
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            while isinstance(output, tuple | list) and output:  # attention, RNNs: (out, state)
                output = output[0]
            if isinstance(output, Tensor):
                seen[name] = output.detach()

        return record

    handles = [m.register_forward_hook(recorder(id(m))) for m in modules]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
