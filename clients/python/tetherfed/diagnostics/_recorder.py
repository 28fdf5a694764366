"""`Diagnostics`: the weight diagnostics of `tetherfed.diagnostics`, computed while a model trains.

Call `diag.step(step, epoch, loss)` after every optimizer step. Per step it copies the two tracked
weights into a ring on the model's device (one `torch.cat`, no host sync) and, only in the
`updates_per_epoch` + 1 steps before a scheduled run, a fixed, seeded subset of each layer's raw
weights (`coords_per_layer` coordinates, the layer's first element among them): one `index_select`
per layer. On schedule (`every="epoch"`: when the epoch changes; `every=N`: every N steps) it
computes every metric of `METRICS`, appends them to `diagnostics.jsonl` (scalars) and
`diagnostics.safetensors` (arrays, stacked over runs) in `out_dir`, and hands small telemetry points
to `sink` (the `Federation` sends them on its I/O thread).

Cost budget: runs may take at most `budget` (default 5 %) of the wall clock since the helper was
made. A scheduled run that would go over is skipped (later ones run: less often), and the first
skip is said once, in the log and as a ``diagnostics_budget`` line in `diagnostics.jsonl`. The
final run at `close()` always happens, so every run ends with final values.

Update vectors: the update of step t is the change of the sampled coordinates from step t − 1.
`updates_per_epoch` (32) consecutive updates of `coords_per_layer` (128) coordinates give each
layer a 4,096-sample vector per run — a power of two for the FFT, long enough for 5 db4 levels —
while the ring holds 33 rows × 128 coordinates × layers (17 KiB per layer in float32), whatever
the model's size. Layers smaller than 128 elements are sampled whole.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import Tensor, nn

from tetherfed.tethers._tethering import pre_tether_weight, tetherable_weights

from . import _metrics as dx

log = logging.getLogger("tetherfed.diagnostics")

Sink = Callable[[list[dict[str, Any]]], None]
RING_ROWS = 64  # steps the ring holds; tracked weights are moved to the host every 64 steps
MAX_TRACKED = 65_536  # tracked-weight rows kept; past it every other row is dropped
TELEMETRY_FFT_BINS = 128  # update_fft telemetry is max-pooled to this many bins
TELEMETRY_TRACKED_ROWS = 256


def parse_every(spec: str | int) -> int | Literal["epoch"]:
    """`"every=epoch"`, `"epoch"`, `"every=N"`, `"N"` or an int → "epoch" or N (≥ 1)."""
    text = str(spec).strip().removeprefix("every=")
    if text == "epoch":
        return "epoch"
    try:
        every = int(text)
    except ValueError:
        raise ValueError(
            f"diagnostics schedule must be every=epoch or every=N, got {spec!r}"
        ) from None
    if every < 1:
        raise ValueError(f"diagnostics every=N needs N ≥ 1, got {every}")
    return every


def parse_spec(spec: str) -> dict[str, Any]:
    """The `--diagnostics` option: `every=epoch|N[,budget=F]` → Diagnostics keyword arguments.

    Raises ValueError naming what is wrong."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if key == "every" or not sep:
            out["every"] = parse_every(value if sep else key)
        elif key == "budget":
            try:
                out["budget"] = float(value)
            except ValueError:
                raise ValueError(f"diagnostics budget must be a number, got {value!r}") from None
        else:
            raise ValueError(f"unknown diagnostics option {key!r} (known: every, budget)")
    return out


def weight_layers(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """The model's weights that carry or could carry a tether, by layer name, in module order:
    layer name -> (module, parameter name), as `tetherfed.tethers.tetherable_weights` gives
    them (the registered layer types plus anything tethered by name; tied weights once)."""
    return tetherable_weights(model)


def raw_weight(module: nn.Module, param: str = "weight") -> Tensor:
    """The weight before its tether: W, not W ⊙ T (`tetherfed.tethers.pre_tether_weight`).

    The stored parameter when the tether is the tensor's only or first parametrization (a view
    of it stays current); under an earlier one (`weight_norm`) a tensor computed now."""
    return pre_tether_weight(module, param)


def _is_stored(weight: Tensor) -> bool:
    """Whether `weight` is a stored parameter (views of it follow training) or computed."""
    return isinstance(weight, nn.Parameter)


class Diagnostics:
    """Weight diagnostics on a schedule, within a share of the wall clock (see the module doc).

    `probe`: inputs (B, *input_shape) for the Jacobian radius (none: that metric is skipped).
    `tracked`: two layer names whose first weight element is tracked every step with the loss
    (default: the first two layers — `fc1.weight[0,0]`, `fc2.weight[0,0]` for the MLPs).
    `normalize_histograms`: histogram weights divided by the total weight norm.
    `steps_per_epoch`: with `every="epoch"`, run after each epoch's last step; without it, at the
    first step of the next epoch (labelled with the epoch that ended).
    `last_step`: the run's last step, so the final run (`close`) has update spectra too.
    Make the helper after moving the model to its device: it keeps views of the weights.
    `clock`: the wall clock the budget is a share of (a benchmark passes one that only runs while
    its diagnostics arm trains).
    """

    _window_for: int  # the last step of the run that ends the current window

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int | str = "epoch",
        out_dir: Path | str | None = None,
        probe: Tensor | None = None,
        seed: int = 0,
        budget: float = 0.05,
        coords_per_layer: int = 128,
        updates_per_epoch: int = 32,
        bins: int = 64,
        window: int = 16,
        tracked: tuple[str, str] | None = None,
        normalize_histograms: bool = False,
        sink: Sink | None = None,
        steps_per_epoch: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        last_step: int | None = None,
    ) -> None:
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        self.model, self.every, self.budget, self.sink = model, parse_every(every), budget, sink
        self.layers = weight_layers(model)
        if not self.layers:
            raise ValueError("the model has no tetherable weights to diagnose")
        if updates_per_epoch + 1 > RING_ROWS:
            raise ValueError(f"updates_per_epoch must be < {RING_ROWS}")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.probe, self.seed, self.bins, self.updates = probe, seed, bins, updates_per_epoch
        self.normalize, self.steps_per_epoch = normalize_histograms, steps_per_epoch
        self.last_step = last_step
        self.tracked = tracked or tuple(list(self.layers)[:2])
        self._init = self._effective()
        self._range = self._histogram_range()
        self._setup_ring(coords_per_layer, seed)
        # per layer, the last `window` runs' update FFTs with their peaks
        self._spectra: dict[str, deque[tuple[np.ndarray, np.ndarray]]] = {
            n: deque(maxlen=window) for n in self.layers
        }
        self._arrays: dict[str, list[np.ndarray]] = self._earlier_runs()
        self._tracked_rows: list[tuple[float, float, float, float]] = []
        self._tracked_stride, self._tracked_seen = 1, 0
        earlier = self._arrays.get("tracked_weights/model", [np.zeros((0, 4))])[0]
        self._tracked_rows.extend(tuple(row) for row in earlier.tolist())
        self._tracked_sent = len(self._tracked_rows)
        self._losses: list[float] = []
        self._steps = 0  # steps recorded into the ring
        self._epoch: int | None = None
        self._last_run_step: int | None = None
        self.clock = clock
        self.started, self.spent, self.last_cost = clock(), 0.0, 0.0
        self.runs, self.skipped, self._said = 0, 0, False

    # -- per step --------------------------------------------------------------------------------
    def step(self, step: int, epoch: int, loss: float | None = None) -> dict[str, Any] | None:
        """Record this step's tracked weights (and, in the steps before a run, its sampled
        coordinates); run the diagnostics when due. Returns the record written when they ran."""
        started = time.perf_counter()
        due = self._due(step, epoch)
        self._track(step, loss)
        self._capture(step)
        self.spent += time.perf_counter() - started
        if not due:
            return None
        if not (self._window_ok if self._until_due(step) is not None else self._affordable()):
            self._skip(step)
            return None
        ended = self.every == "epoch" and self.steps_per_epoch is None  # seen in the next epoch
        return self.run(step, max(epoch - 1, 0) if ended else epoch)

    def _due(self, step: int, epoch: int) -> bool:
        if self.every != "epoch":
            return step % self.every == 0
        if self.steps_per_epoch is not None:
            return step % self.steps_per_epoch == 0
        changed = self._epoch is not None and epoch != self._epoch
        self._epoch = epoch
        return changed

    def _until_due(self, step: int) -> int | None:
        """Steps from `step` to the next scheduled run (0: this one); None when unknown (every
        epoch without `steps_per_epoch`)."""
        period = self.every if self.every != "epoch" else self.steps_per_epoch
        return (-step) % period if period is not None else None

    def _in_window(self, step: int, until: int | None) -> bool:
        """Whether `step` is among the `updates` + 1 steps before a run within budget."""
        if until is None:
            return True
        if until > self.updates:
            return False
        if self._window_for != step + until:  # a window opens
            self._window_for, self._window_ok = step + until, self._affordable()
        return self._window_ok

    def _affordable(self) -> bool:
        elapsed = self.clock() - self.started
        return self.runs == 0 or self.spent + self.last_cost <= self.budget * elapsed

    def _skip(self, step: int) -> None:
        self.skipped += 1
        if self._said:
            return
        self._said = True
        message = (
            f"diagnostics: a run takes {self.last_cost * 1e3:.1f} ms, more than "
            f"{self.budget:.0%} of wall time at every={self.every}; running less often"
        )
        log.warning(message)
        self._write_line({"event": "diagnostics_budget", "step": step, "message": message})

    def _setup_ring(self, coords: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self._index: dict[str, Tensor] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        self._flat = {name: self._raw(name) for name in self.layers}
        # Weights computed from others (weight_norm): views of them go stale, so they are
        # recomputed at every capture.
        self._computed = {
            name
            for name, (module, param) in self.layers.items()
            if not _is_stored(raw_weight(module, param))
        }
        offset = 0
        for name, flat in self._flat.items():
            k = min(coords, flat.numel())
            rest = torch.randperm(flat.numel() - 1, generator=gen)[: k - 1] + 1
            index = torch.cat([torch.zeros(1, dtype=torch.long), rest.sort().values])
            self._index[name] = index.to(flat.device)
            self._offsets[name] = (offset, offset + k)
            offset += k
        device = next(iter(self._flat.values())).device
        self._ring = torch.zeros((self.updates + 1, offset), dtype=torch.float32, device=device)
        self._tracked_views = [self._flat[name][:1] for name in self.tracked]
        self._tracked_computed = any(name in self._computed for name in self.tracked)
        self._tracked_ring = torch.zeros((RING_ROWS, len(self.tracked)), device=device)
        self._captured = 0  # rows written into the ring, ever
        self._consecutive = 0  # of them, how many in a row up to the last step
        self._window_ok = True  # the run that ends the current window is within budget
        self._window_for = -1  # the step of that run

    @torch.no_grad()
    def _raw(self, name: str) -> Tensor:
        """Layer `name`'s weight before its tether, flat (a view when it is stored)."""
        module, param = self.layers[name]
        return raw_weight(module, param).detach().reshape(-1)

    @torch.no_grad()
    def _track(self, step: int, loss: float | None) -> None:
        if self._tracked_computed:
            self._tracked_views = [self._raw(name)[:1] for name in self.tracked]
        torch.cat(self._tracked_views, out=self._tracked_ring[self._steps % RING_ROWS])
        self._losses.append(math.nan if loss is None else float(loss))
        self._steps += 1
        if self._steps % RING_ROWS == 0:
            self._flush_tracked(step)

    @torch.no_grad()
    def _capture(self, step: int) -> None:
        """The sampled coordinates, only in the `updates` + 1 steps that end at a run (always
        when the schedule is not known in steps, and before `last_step`); a window whose run is
        over budget is not captured at all (decided when it opens)."""
        until = self._until_due(step)
        final = self.last_step is not None and 0 <= self.last_step - step <= self.updates
        if not final and not self._in_window(step, until):  # the final run always happens
            self._consecutive = 0
            return
        row = self._ring[self._captured % (self.updates + 1)]
        for name, stored in self._flat.items():
            flat = self._raw(name) if name in self._computed else stored
            lo, hi = self._offsets[name]
            torch.index_select(flat, 0, self._index[name], out=row[lo:hi])
        self._captured += 1
        self._consecutive += 1

    def _flush_tracked(self, step: int) -> None:
        n = len(self._losses)
        if n == 0:
            return
        rows = [(self._steps - n + i) % RING_ROWS for i in range(n)]
        values = self._tracked_ring[rows].double().cpu().numpy()
        first = step - n + 1
        for i, loss in enumerate(self._losses):
            self._tracked_seen += 1
            if self._tracked_seen % self._tracked_stride == 0:
                self._tracked_rows.append((first + i, loss, *values[i].tolist()))
        self._losses = []
        if len(self._tracked_rows) > MAX_TRACKED:  # bounded: keep every other row from now on
            self._tracked_rows = self._tracked_rows[::2]
            self._tracked_sent //= 2
            self._tracked_stride *= 2

    # -- a run -----------------------------------------------------------------------------------
    def run(self, step: int, epoch: int) -> dict[str, Any]:
        """Compute every metric now; write and send the record; return it."""
        started = time.perf_counter()
        self._flush_tracked(step)
        points: list[dict[str, Any]] = []
        scalars: dict[str, dict[str, Any]] = {}
        for metric, layer, value, array in self._compute():
            if value is not None:
                points.append({"metric": metric, "layer": layer, "value": value})
            if array is not None:
                self._keep(f"{metric}/{layer}", step, array)
            summary = _summary(metric, value, array)
            if summary is not _NONE:
                scalars.setdefault(metric, {})[layer] = summary
        cost = time.perf_counter() - started
        record = {
            "event": "diagnostics",
            "step": step,
            "epoch": epoch,
            "time": time.time(),
            "cost_s": round(cost, 6),
            "metrics": scalars,
            "jacobian_kind": getattr(self, "_jacobian_kind", None),
        }
        self._write(record)
        if self.sink is not None:
            self.sink([{**p, "step": step, "epoch": epoch} for p in points])
        self.last_cost = time.perf_counter() - started
        self.spent += self.last_cost
        self.runs += 1
        self._last_run_step = step
        return record

    def close(self, step: int, epoch: int) -> dict[str, Any] | None:
        """The final run (unless the last run was at this step): final values, always."""
        if self._last_run_step == step:
            return None
        return self.run(step, epoch)

    def _compute(self) -> Iterator[tuple[str, str, Any, Any]]:
        current = self._effective()
        for name, w in current.items():
            if w.ndim < 2:
                continue
            s = dx.singular_values(w)
            yield "singular_values", name, _clean(s[:64]), s.astype(np.float32)
            erank = dx.spectral_entropy_rank(s)
            yield "effective_rank", name, _num(erank), np.float64(erank)
        # `all`: the layers' compressed sizes over their raw sizes (each layer compressed once;
        # the seed's whole-network ratio up to gzip's per-stream header and dictionary).
        compressed = raw = 0.0
        for name, w in current.items():
            ratio = dx.gzip_ratio(w)
            compressed, raw = compressed + ratio * w.size, raw + w.size
            yield "gzip_ratio", name, _num(ratio), np.float64(ratio)
        yield "gzip_ratio", "all", _num(compressed / raw), np.float64(compressed / raw)
        hists = dx.weight_histograms(current, self.bins, self._range, self.normalize)
        for name, counts in hists.items():
            yield "weight_histogram", name, counts.tolist(), counts
        if len(current) >= 2:
            deltas = [current[n] - self._init[n] for n in current]
            corr = dx.delta_correlation_by_distance(deltas)
            yield "delta_corr_by_distance", "model", _clean(corr), corr
        yield from self._spectra_metrics()
        yield from self._jacobian()
        yield from self._tracked_metric()

    def _spectra_metrics(self) -> Iterator[tuple[str, str, Any, Any]]:
        if self._consecutive < self.updates + 1:
            return
        n = self.updates + 1
        rows = [(self._captured - n + i) % n for i in range(n)]
        window = self._ring[rows].double().cpu().numpy()
        updates = np.diff(window, axis=0)
        for name, (lo, hi) in self._offsets.items():
            spectrum = dx.update_spectrum(updates[None, :, lo:hi])
            magnitude = spectrum.magnitude[0]
            yield (
                "update_fft",
                name,
                _clean(_max_pool(magnitude, TELEMETRY_FFT_BINS)),
                magnitude.astype(np.float32),
            )
            levels = np.split(spectrum.wavelet[0], np.cumsum(spectrum.level_sizes)[:-1])
            rms = [float(np.sqrt(np.mean(c * c))) for c in levels]
            yield "update_wavelet", name, _clean(rms), spectrum.wavelet[0].astype(np.float32)
            self._spectra[name].append((spectrum.fft[0], dx.spectrum_peaks(magnitude)))
            yield from self._peaks(name, spectrum.freqs)

    def _peaks(self, name: str, freqs: np.ndarray) -> Iterator[tuple[str, str, Any, Any]]:
        ffts, peaks = zip(*self._spectra[name], strict=True)
        found = (
            dx.persistent_peaks(np.stack(ffts), freqs=freqs, found=peaks) if len(ffts) > 1 else []
        )
        table = np.array([[p.frequency, p.magnitude, p.phase_agreement] for p in found]).reshape(
            -1, 3
        )
        self._latest(f"persistent_peaks/{name}", table)
        yield "persistent_peaks", name, [_clean(row) for row in table.tolist()], None

    def _jacobian(self) -> Iterator[tuple[str, str, Any, Any]]:
        if self.probe is None:
            return
        training = self.model.training
        self.model.eval()
        try:
            result = dx.jacobian_spectral_radius(self.model, self.probe, seed=self.seed)
        finally:
            self.model.train(training)
        self._jacobian_kind = result.kind
        yield "jacobian_radius", "model", _num(result.radius), np.float64(result.radius)

    def _tracked_metric(self) -> Iterator[tuple[str, str, Any, Any]]:
        rows = np.array(self._tracked_rows, dtype=np.float64).reshape(-1, 4)
        self._latest("tracked_weights/model", rows)
        fresh = rows[self._tracked_sent :]
        self._tracked_sent = len(rows)
        step = max(1, math.ceil(len(fresh) / TELEMETRY_TRACKED_ROWS))
        yield "tracked_weights", "model", [_clean(r) for r in fresh[::step].tolist()], None

    # -- state and files -------------------------------------------------------------------------
    @torch.no_grad()
    def _effective(self) -> dict[str, np.ndarray]:
        return {
            n: cast(Tensor, getattr(m, p)).detach().to("cpu", torch.float64).numpy().copy()
            for n, (m, p) in self.layers.items()
        }

    def _histogram_range(self) -> tuple[float, float]:
        values = np.concatenate([w.ravel() for w in self._init.values()])
        if self.normalize:
            values = values / max(float(np.linalg.norm(values)), 1e-30)
        half = 3.0 * max(float(np.max(np.abs(values))), 1e-12)
        return (-half, half)

    def _earlier_runs(self) -> dict[str, list[np.ndarray]]:
        """The arrays an earlier run of this folder wrote (a resumed worker appends to them)."""
        path = self.out_dir / "diagnostics.safetensors" if self.out_dir else None
        if path is None or not path.exists():
            return {}
        return {k: [v] if _single(k) else list(v) for k, v in load_file(path).items()}

    def _keep(self, key: str, step: int, array: Any) -> None:
        self._arrays.setdefault(key, []).append(np.asarray(array))
        self._arrays.setdefault(f"{key}/step", []).append(np.asarray(step, dtype=np.int64))

    def _latest(self, key: str, array: np.ndarray) -> None:
        self._arrays[key] = [array]

    def _write(self, record: dict[str, Any]) -> None:
        if self.out_dir is None:
            return
        self._write_line(record)
        tensors = {}
        for key, items in self._arrays.items():
            tensors[key] = np.ascontiguousarray(items[0] if _single(key) else np.stack(items))
        meta = {
            "format": "tetherfed-diagnostics/1",
            "tracked": json.dumps(self._tracked_names()),
            "histogram_range": json.dumps(list(self._range)),
            "histogram_normalized": str(self.normalize).lower(),
            "tracked_weights_columns": "step,loss,w1,w2",
        }
        path = self.out_dir / "diagnostics.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)

    def _write_line(self, record: Mapping[str, Any]) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / "diagnostics.jsonl").open("a") as out:
            out.write(json.dumps(record, separators=(",", ":")) + "\n")

    def _tracked_names(self) -> list[str]:
        names = []
        for name in self.tracked:
            module, param = self.layers[name]
            shape = raw_weight(module, param).shape
            label = f"{name}.weight" if param == "weight" else name
            names.append(f"{label}[{','.join('0' * len(shape))}]")
        return names


_NONE = object()


def _single(key: str) -> bool:
    """Arrays stored whole (the latest), not stacked over runs."""
    return key.startswith(("persistent_peaks/", "tracked_weights/"))


def _summary(metric: str, value: Any, array: Any) -> Any:
    """What `diagnostics.jsonl` holds of a metric: scalars, the correlation by distance (a few
    numbers) and the persistent peak count; arrays only go to the safetensors file."""
    if isinstance(array, np.floating) or metric == "delta_corr_by_distance":
        return value
    if metric == "persistent_peaks":
        return len(value)
    return _NONE


def _num(value: float) -> float | None:
    return None if not math.isfinite(value) else float(value)


def _clean(values: Any) -> list[float | None]:
    return [_num(float(v)) for v in np.asarray(values, dtype=np.float64).ravel()]


def _max_pool(values: np.ndarray, bins: int) -> np.ndarray:
    if len(values) <= bins:
        return values
    edges = np.linspace(0, len(values), bins + 1).astype(int)
    return np.maximum.reduceat(values, edges[:-1])
