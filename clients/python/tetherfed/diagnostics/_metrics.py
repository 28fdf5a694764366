"""The diagnostic metrics as pure functions of weights and updates (numpy, scipy, PyWavelets)."""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pywt
import torch
from numpy.typing import NDArray
from scipy.signal import find_peaks
from torch import Tensor

from tether_protocol.telemetry import METRICS

__all__ = [
    "METRICS",
    "JacobianRadius",
    "Peak",
    "UpdateSpectrum",
    "as_matrix",
    "delta_correlation_by_distance",
    "effective_rank",
    "gzip_ratio",
    "jacobian_spectral_radius",
    "persistent_peaks",
    "singular_values",
    "spectral_entropy_rank",
    "spectrum_peaks",
    "summarize",
    "update_spectrum",
    "weight_histogram",
    "weight_histograms",
]

Array = NDArray[np.float64]
ArrayLike = Tensor | np.ndarray | Sequence[float]


def _host(values: ArrayLike) -> Array:
    """`values` as a float64 numpy array on the host (a copy only when needed)."""
    if isinstance(values, Tensor):
        return values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def as_matrix(weight: ArrayLike) -> Array:
    """A weight as a matrix: (out, in) stays, a conv kernel (out, in, k…) becomes (out, in·k…).

    Raises ValueError for fewer than two dimensions (a bias has no singular values).
    """
    w = _host(weight)
    if w.ndim < 2:
        raise ValueError(f"a weight matrix needs at least 2 dimensions, got shape {w.shape}")
    return w.reshape(w.shape[0], -1)


def singular_values(weight: ArrayLike) -> Array:
    """Singular values of `as_matrix(weight)`, largest first: shape (min(out, in·k…),), in the
    weight's units (one magnitude per singular direction)."""
    return np.linalg.svd(as_matrix(weight), compute_uv=False).astype(np.float64, copy=False)


def effective_rank(weight: ArrayLike) -> float:
    """exp of the Shannon entropy of the normalised singular values p_k = σ_k / Σσ (Roy &
    Vetterli 2007): 1 when all energy is in one value, n when spread evenly over n.

    Conv kernels are reshaped to (out, in·k…) first (`as_matrix`). An all-zero weight has no
    energy to spread and gives 0.0. Dimensionless, in [1, min(out, in·k…)] otherwise.
    """
    return spectral_entropy_rank(singular_values(weight))


def spectral_entropy_rank(s: ArrayLike) -> float:
    """`effective_rank` from already computed singular values `s` (any order)."""
    s = _host(s)
    total = float(s.sum())
    if total <= 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def gzip_ratio(weight: ArrayLike, level: int = 6) -> float:
    """Compressed / raw size of the weight serialised as little-endian float64 bytes (seed
    002's "gzip complexity": lower = more compressible = more structure). Standard library
    `gzip` at `level` (6, zlib's default); the header's timestamp is fixed, so equal weights give
    equal ratios. Dimensionless; random normal weights give ≈ 0.95, zeros ≈ 0.001; a few dozen
    values give more than 1 (gzip's 18 bytes of header and trailer).

    Raises ValueError for an empty weight.
    """
    raw = _host(weight).astype("<f8").tobytes()
    if not raw:
        raise ValueError("gzip_ratio of an empty weight")
    return len(gzip.compress(raw, compresslevel=level, mtime=0)) / len(raw)


def weight_histogram(
    weight: ArrayLike,
    bins: int = 64,
    range: tuple[float, float] = (-1.0, 1.0),
    norm: float | None = None,
) -> NDArray[np.int64]:
    """Counts of weight values in `bins` equal bins over the fixed `range` (a weight
    histograms over training: fixed bins, so checkpoints stack into a surface).

    Values outside `range` are counted in the edge bins, so the counts sum to the number of
    elements. With `norm`, values are divided by it first (the seed's "normalizing by total norm
    of the weights": pass the L2 norm of all layers together, as `weight_histograms` does).
    Shape (bins,), int64.
    """
    lo, hi = range
    if not hi > lo or bins < 1:
        raise ValueError(f"need bins ≥ 1 and range (lo, hi) with lo < hi, got {bins}, {range}")
    values = _host(weight).ravel()
    if norm is not None:
        values = values / norm if norm > 0 else values
    counts, _ = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
    return counts.astype(np.int64)


def weight_histograms(
    weights: Mapping[str, ArrayLike],
    bins: int = 64,
    range: tuple[float, float] = (-1.0, 1.0),
    normalize: bool = False,
) -> dict[str, NDArray[np.int64]]:
    """`weight_histogram` of each layer and of all layers together (key ``"all"``), with the same
    bins. With `normalize`, every value is divided by the L2 norm of all layers' weights together
    (so `range` is then in units of that norm)."""
    host = {name: _host(w) for name, w in weights.items()}
    norm = math.sqrt(sum(float(np.sum(w * w)) for w in host.values())) if normalize else None
    out = {name: weight_histogram(w, bins, range, norm) for name, w in host.items()}
    out["all"] = np.sum(list(out.values()), axis=0).astype(np.int64)
    return out


def delta_correlation_by_distance(deltas: Sequence[ArrayLike], quantiles: int = 128) -> Array:
    """Mean correlation of |ΔW| between layers against their distance in the layer order (seed
    002's "weight change correlation vs layer distance").

    `deltas` are the layers' changes from initialisation, in network order, any shapes. Each is
    reduced to the quantiles of |ΔW| at `quantiles` evenly spaced probabilities in [0, 1] (QQ
    alignment: layers of different sizes compare); each pair's Pearson correlation of those
    quantile vectors is averaged over the pairs at distance d = j − i. Returns shape (L − 1,):
    entry d − 1 is distance d. A pair whose quantiles are constant (e.g. an unchanged layer) has
    no correlation and is left out; a distance with no pair left is NaN.
    """
    if len(deltas) < 2:
        raise ValueError(f"need at least two layers, got {len(deltas)}")
    grid = np.linspace(0.0, 1.0, quantiles)
    q = [np.quantile(np.abs(_host(d).ravel()), grid) for d in deltas]
    sums, counts = np.zeros(len(q) - 1), np.zeros(len(q) - 1)
    for i in np.arange(len(q)):
        for j in np.arange(i + 1, len(q)):
            if np.ptp(q[i]) > 0 and np.ptp(q[j]) > 0:
                sums[j - i - 1] += np.corrcoef(q[i], q[j])[0, 1]
                counts[j - i - 1] += 1
    out = np.full(len(q) - 1, np.nan)
    np.divide(sums, counts, out=out, where=counts > 0)
    return out


@dataclass(frozen=True)
class UpdateSpectrum:
    """Spectra of flattened weight-update vectors, one row per epoch.

    `freqs` (F,): cycles per sample of the flattened vector (F = n // 2 + 1).
    `fft` (E, F) complex128: `numpy.fft.rfft` of each epoch's vector; its magnitude is the
    metric ``update_fft``. `wavelet` (E, C): the db4 detail coefficients of each epoch, coarsest
    level first (cD_level … cD1, concatenated as `pywt.wavedec` orders them): ``update_wavelet``.
    `level`: levels used (5, or fewer when the vector is too short for 5).
    `level_sizes`: how many coefficients each level has, in that order.
    """

    freqs: Array
    fft: NDArray[np.complex128]
    wavelet: Array
    level: int
    level_sizes: tuple[int, ...]

    @property
    def magnitude(self) -> Array:
        """|fft|, shape (E, F), in the updates' units."""
        return np.abs(self.fft)


def update_spectrum(updates: ArrayLike, wavelet: str = "db4", level: int = 5) -> UpdateSpectrum:
    """FFT magnitude spectra and wavelet detail coefficients of weight-update vectors per epoch.

    `updates`: shape (E, n) — one flattened update vector per epoch — or (E, U, K), U update
    vectors of K sampled coordinates per epoch, flattened row-major to n = U·K;
    a 1-D vector is one epoch. The wavelet decomposition uses `level` levels (5 by default),
    fewer when n is too short for them (`pywt.dwt_max_level`).
    """
    u = _host(updates)
    u = u.reshape(1, -1) if u.ndim == 1 else u.reshape(u.shape[0], -1)
    if u.shape[1] < 2:
        raise ValueError(f"an update vector needs at least 2 values, got shape {u.shape}")
    levels = min(level, pywt.dwt_max_level(u.shape[1], pywt.Wavelet(wavelet).dec_len))
    if levels < 1:
        raise ValueError(f"{u.shape[1]} values are too few for one {wavelet} wavelet level")
    details = [pywt.wavedec(row, wavelet, level=levels)[1:] for row in u]
    return UpdateSpectrum(
        freqs=np.fft.rfftfreq(u.shape[1]).astype(np.float64, copy=False),
        fft=np.fft.rfft(u, axis=1),
        wavelet=np.array([np.concatenate(d) for d in details]),
        level=levels,
        level_sizes=tuple(len(c) for c in details[0]),
    )


@dataclass(frozen=True)
class Peak:
    """A spectral peak present in every epoch.

    `bin`: its index in the first epoch's spectrum; `frequency`: the mean frequency of its
    matched peaks, cycles per sample; `magnitude`: their mean magnitude; `phase_agreement`: the
    mean resultant length |mean(exp(iφ_e))| of their phases, 1 when every epoch has the same
    phase, ≈ 1/√E for random phases."""

    bin: int
    frequency: float
    magnitude: float
    phase_agreement: float


def spectrum_peaks(magnitude: ArrayLike, min_height: float = 6.0) -> NDArray[np.intp]:
    """Bins of the peaks of one magnitude spectrum (F,) reaching `min_height` × its median
    (`scipy.signal.find_peaks`; see `persistent_peaks`)."""
    m = _host(magnitude)
    return find_peaks(m, height=min_height * float(np.median(m)))[0]  # type: ignore[no-any-return]


def persistent_peaks(
    spectra: ArrayLike | NDArray[np.complex128],
    tolerance: int = 1,
    min_height: float = 6.0,
    freqs: ArrayLike | None = None,
    found: Sequence[NDArray[np.intp]] | None = None,
) -> list[Peak]:
    """Peaks present in every epoch's spectrum within ±`tolerance` bins ("flag peaks
    that persist across all epochs and check their phase alignment").

    `spectra` (E, F): complex FFTs (e.g. `UpdateSpectrum.fft`), or magnitudes (phase agreement
    is then NaN). Peaks are found per epoch by `scipy.signal.find_peaks` with a height of at
    least `min_height` × that epoch's median magnitude: white noise's magnitudes are
    Rayleigh-distributed and exceed 6× their median with probability ≈ 1e-11 per bin, so noise
    gives no peak. `freqs` (F,) gives frequencies; by default the bin index. The DC bin is
    never a peak (find_peaks skips edges). `found`: each epoch's `spectrum_peaks`, when already
    known (a worker finds them once per spectrum).
    """
    s = spectra.detach().cpu().numpy() if isinstance(spectra, Tensor) else np.asarray(spectra)
    s = s.reshape(1, -1) if s.ndim == 1 else s
    mags = np.abs(s)
    f = np.arange(mags.shape[1], dtype=np.float64) if freqs is None else _host(freqs)
    if found is None:
        found = [spectrum_peaks(m, min_height) for m in mags]
    peaks = []
    for b in found[0]:
        matched = [_nearest(p, b, tolerance) for p in found]
        if any(m is None for m in matched):
            continue
        idx = np.array(matched, dtype=np.int64)
        rows = np.arange(len(idx))
        agreement = (
            float(np.abs(np.mean(np.exp(1j * np.angle(s[rows, idx])))))
            if np.iscomplexobj(s)
            else math.nan
        )
        peaks.append(Peak(int(b), float(f[idx].mean()), float(mags[rows, idx].mean()), agreement))
    return peaks


def _nearest(candidates: NDArray[np.intp], target: int, tolerance: int) -> int | None:
    if len(candidates) == 0:
        return None
    best = candidates[np.argmin(np.abs(candidates - target))]
    return int(best) if abs(int(best) - int(target)) <= tolerance else None


@dataclass(frozen=True)
class JacobianRadius:
    """The Jacobian estimate of `jacobian_spectral_radius`.

    `kind`: ``"spectral_radius"`` (largest |eigenvalue|, input and output of the same size) or
    ``"top_singular_value"`` (largest singular value, the map is not square). `radius`: the
    largest over the probe samples — the value of the block-diagonal Jacobian of the whole probe
    batch, and the metric ``jacobian_radius``; `mean`: the mean over samples; `per_sample` (B,).
    """

    radius: float
    mean: float
    kind: Literal["spectral_radius", "top_singular_value"]
    per_sample: Array


def jacobian_spectral_radius(
    model: Callable[[Tensor], Tensor],
    probe: Tensor,
    iterations: int = 24,
    seed: int = 0,
) -> JacobianRadius:
    """Largest |eigenvalue| of the input→output Jacobian J(x) of `model` at each probe sample,
    by power iteration with `torch.func` vjps ("the Jacobian of the network mapping and its
    spectral radius"; "flag the first epoch where that value exceeds 1").

    `probe`: (B, *input_shape); every sample gets its own iteration, batched: one Jacobian-vector
    product of the model on the whole probe per step (samples must not interact, e.g. no
    BatchNorm in training mode). When input and output sizes differ J has no eigenvalues: the
    iteration runs on JᵀJ (Jv, then a vjp) and the largest singular value is reported, `kind`
    says which. The
    estimate is the geometric mean of ‖Jv‖/‖v‖ over the second half of the iterations, which
    also converges when the dominant eigenvalues are a complex pair. Unitless (output units per
    input unit). Seeded start vectors: the same model and probe give the same value.
    """
    x = probe.detach()
    out, vjp_fn = torch.func.vjp(model, x)[:2]  # u ↦ Jᵀu
    # J v as the vjp of that linear map (the "double-vjp" trick): reverse-mode kernels only.
    # torch.func.jvp gives the same values but decomposes Linear layers in Python (4× slower).
    jvp_fn = torch.func.vjp(vjp_fn, torch.zeros_like(out))[1]
    square = x[0].numel() == out[0].numel()
    gen = torch.Generator().manual_seed(seed)
    v = _unit(torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x))
    logs = []
    for _ in range(iterations):
        jv = jvp_fn((v.reshape(x.shape),))[0]
        u = jv.reshape(x.shape) if square else vjp_fn(jv)[0]
        norms = _norms(u)
        logs.append(torch.log(norms.clamp_min(1e-30)))
        v = u.detach() / norms.clamp_min(1e-30).view(-1, *[1] * (x.dim() - 1))
    est = torch.stack(logs[iterations // 2 :]).mean(0).exp().double().cpu().numpy()
    if not square:
        est = np.sqrt(est)
    kind: Literal["spectral_radius", "top_singular_value"] = (
        "spectral_radius" if square else "top_singular_value"
    )
    return JacobianRadius(float(est.max()), float(est.mean()), kind, est)


def _norms(v: Tensor) -> Tensor:
    norms: Tensor = torch.linalg.vector_norm(v.detach().flatten(1), dim=1)
    return norms


def _unit(v: Tensor) -> Tensor:
    return v / _norms(v).clamp_min(1e-30).view(-1, *[1] * (v.dim() - 1))


def summarize(worker_dir: Path | str) -> dict[str, Any]:
    """Final values of a worker folder's `diagnostics.jsonl`, for `results.csv`.

    Keys: ``jacobian_radius``, ``gzip_ratio`` (of all layers together), ``effective_rank_mean`` (the
    mean over layers), ``persistent_peaks`` (their count over layers in the last record),
    ``jacobian_first_epoch_over_1`` (the first epoch whose Jacobian radius exceeded 1, or None),
    ``diagnostics_runs``. Empty when the folder has no diagnostics.
    """
    path = Path(worker_dir) / "diagnostics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("event") == "diagnostics"]
    if not records:
        return {}
    last = records[-1]["metrics"]
    out: dict[str, Any] = {"diagnostics_runs": len(records)}
    ranks = [v for v in last.get("effective_rank", {}).values() if v is not None]
    out["effective_rank_mean"] = float(np.mean(ranks)) if ranks else None
    out["gzip_ratio"] = last.get("gzip_ratio", {}).get("all")
    out["jacobian_radius"] = last.get("jacobian_radius", {}).get("model")
    out["persistent_peaks"] = sum(last.get("persistent_peaks", {}).values())
    over = [
        r["epoch"]
        for r in records
        if (r["metrics"].get("jacobian_radius", {}).get("model") or 0) > 1
    ]
    out["jacobian_first_epoch_over_1"] = min(over) if over else None
    return out
