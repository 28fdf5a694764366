"""Count sketches of tethers: score large layers on k numbers instead of all of their values.

A count sketch (Charikar, Chen & Farach-Colton, "Finding frequent items in data streams", 2002;
as an inner-product estimator, Weinberger et al., "Feature hashing for large scale multitask
learning", 2009) maps a tensor x of n values to k numbers: value i goes, with a random sign
s(i) ∈ {−1, +1}, into bucket h(i) ∈ [0, k):

    S(x)_b = Σ_{i : h(i) = b} s(i) · x_i

It is linear, and ⟨S(x), S(y)⟩ is an unbiased estimate of ⟨x, y⟩ when every worker uses the same
h and s for a layer: they come from the federation's sketch seed and the layer name
(`SketchPolicy.seed`), so the sketches of one layer are comparable across workers and processes.

Estimates (what the scorer computes):

    dot(x, y)     ≈ ⟨S(x), S(y)⟩
    cosine(x, y)  ≈ cos(S(x), S(y))
    pearson(x, y) ≈ cos(S(x − x̄), S(y − ȳ)),   S(x − x̄) = S(x) − x̄ · S(1)

so a sketch travels with its tensor's sum (to centre it) and shape (only equal shapes compare).

Error. With many values per bucket each bucket is close to a Gaussian sum, and the k buckets are
nearly independent, so cos(S(x), S(y)) behaves like the sample correlation of k pairs: for a true
cosine ρ its standard deviation is about (1 − ρ²)/√k, at most 1/√k (ρ = 0): 0.031 for k = 1,024.
The same holds for pearson (the cosine of centred tensors). `dot` has standard deviation about
√((‖x‖²‖y‖² + ⟨x, y⟩²)/k), relative to a scale the policy does not know, so it is not checked.
`tests/protocol/test_sketch.py` measures these on random tethers of known correlation.
A threshold inside ±3/√k of 0 is crossed by pairs of unrelated tethers (true score 0) in about
0.3 % of rounds per pair by noise alone: `Policy` refuses such thresholds unless `force` is set.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .compat import gram_scores, row_scores
from .frame import (
    DTypeError,
    Frame,
    LayerMismatchError,
    MetadataError,
    RangeError,
    ShapeError,
    decode_frame,
    out_of_range,
)
from .frame import encode_frame as _encode_frame
from .messages import Measure, SketchPolicy, SnapshotMeta, noise_band

SKETCH_KEY = "tetherfed.sketch"  # frame __metadata__ key of a sketch frame's layout (JSON)
FloatArray = npt.NDArray[np.float64]

__all__ = [
    "SKETCH_KEY",
    "LayerSketch",
    "decode_sketch_frame",
    "encode_sketch_frame",
    "noise_band",
    "noise_sd",
    "sketch_layer",
    "sketch_rows",
    "sketch_scores",
    "sketch_row_scores",
    "sketched",
]


def noise_sd(k: int) -> float:
    """Upper bound on the standard deviation of a cosine or pearson estimate from k buckets."""
    return 1.0 / math.sqrt(k)


@dataclass(frozen=True)
class LayerSketch:
    """The count sketch of one layer's tether: `values` (k float32), the tether's `total`
    (sum of its values, to centre it) and `shape` (sketches compare only for equal shapes)."""

    values: npt.NDArray[np.float32]
    total: float
    shape: tuple[int, ...]

    @property
    def n(self) -> int:
        """Number of values in the sketched tensor."""
        return math.prod(self.shape)


HASH = "splitmix64"  # how values are hashed to buckets and signs (in every sketch frame's layout)
CHUNK = 1 << 18  # values hashed at once: the hashing's working memory is O(CHUNK), not O(n)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _layer_key(seed: int, layer: str, n: int, k: int) -> np.uint64:
    """The 64-bit key of one layer's hash: the federation's seed, the layer name, n and k."""
    digest = hashlib.blake2b(f"{seed}\x00{layer}\x00{n}\x00{k}".encode(), digest_size=8)
    return np.uint64(int.from_bytes(digest.digest(), "little"))


def _buckets_signs(
    key: np.uint64, start: int, stop: int, k: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float32]]:
    """Bucket h(i) ∈ [0, k) and sign s(i) ∈ {−1, +1} of values start … stop − 1.

    Each index is hashed on its own (Steele, Lea & Flood, "Fast splittable pseudorandom number
    generators", 2014: SplitMix64's finaliser of key + (i + 1)·φ), so any slice of a layer is
    hashed without the rest: nothing of size n is ever held. The bucket is the high 32 bits
    scaled to [0, k) (Lemire, "Fast random integer generation in an interval", 2019), the sign
    the lowest bit."""
    x = np.arange(start + 1, stop + 1, dtype=np.uint64)
    x *= _GOLDEN
    x += key
    t = np.empty_like(x)
    for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, 0)):
        np.right_shift(x, np.uint64(shift), out=t)
        x ^= t
        if factor:
            x *= np.uint64(factor)
    signs = np.bitwise_and(x, np.uint64(1), out=t).astype(np.float32)
    signs *= np.float32(-2.0)
    signs += np.float32(1.0)
    x >>= np.uint64(32)
    x *= np.uint64(k)
    x >>= np.uint64(32)
    return x.view(np.int64).astype(np.intp, copy=False), signs


def _sketch(
    flat: npt.NDArray[Any] | None, key: np.uint64, n: int, k: int
) -> npt.NDArray[np.float32]:
    """Σ s(i)·x_i per bucket, chunk by chunk (x = 1 everywhere when `flat` is None)."""
    out = np.zeros(k, dtype=np.float64)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        buckets, signs = _buckets_signs(key, start, stop, k)
        weights = signs if flat is None else np.multiply(flat[start:stop], signs, dtype=np.float32)
        out += np.bincount(buckets, weights=weights, minlength=k)
    return out.astype(np.float32)


@functools.lru_cache(maxsize=256)
def _ones(seed: int, layer: str, n: int, k: int) -> npt.NDArray[np.float32]:
    """The sketch of a tensor of n ones, S(1) (k float32: cached, since pearson centres with it)."""
    return _sketch(None, _layer_key(seed, layer, n, k), n, k)


def sketch_layer(values: npt.ArrayLike, spec: SketchPolicy, layer: str) -> LayerSketch:
    """The count sketch (k = `spec.k`, hashed by `spec.seed` and the layer name) of a tether.

    Memory beyond the tensor and its k buckets is O(`CHUNK`) whatever the layer's size: the
    hashes are recomputed per call rather than kept (a kept table costs 12 bytes per value, 300
    MB for ResNet-50's 25 M)."""
    arr = np.asarray(values)
    flat = arr.reshape(-1)
    out = _sketch(flat, _layer_key(spec.seed, layer, flat.size, spec.k), flat.size, spec.k)
    return LayerSketch(out, float(flat.sum(dtype=np.float64)), tuple(arr.shape))


def sketched(spec: SketchPolicy | None, numel: int) -> bool:
    """Whether a layer of `numel` values is scored on its sketch under `spec`."""
    return spec is not None and numel >= spec.min_values


def sketch_rows(
    sketches: Mapping[str, LayerSketch], spec: SketchPolicy, layer: str, measure: Measure
) -> dict[str, npt.NDArray[np.float32]]:
    """The rows to score for `measure` (pearson: centred, S(x) − x̄·S(1)); name → k values."""
    if measure != "pearson":
        return {w: s.values for w, s in sketches.items()}
    out = {}
    for w, s in sketches.items():
        ones = _ones(spec.seed, layer, s.n, spec.k)
        out[w] = (s.values - np.float32(s.total / max(s.n, 1)) * ones).astype(np.float32)
    return out


def _rows_measure(measure: Measure) -> Measure:
    # Pearson on sketches is the cosine of centred sketches (their buckets' mean is ~0 already,
    # and centring them again would not estimate the tensors' pearson).
    return "cosine" if measure == "pearson" else measure


def sketch_scores(
    sketches: Mapping[str, LayerSketch],
    spec: SketchPolicy,
    layer: str,
    measure: Measure,
    order: Sequence[str] | None = None,
) -> FloatArray:
    """All-pairs score estimates (M × M, in `order`); NaN across different shapes."""
    names = list(order) if order is not None else list(sketches)
    out = np.full((len(names), len(names)), np.nan)
    rows = sketch_rows(sketches, spec, layer, measure)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(sketches[name].shape, []).append(i)
    for idx in groups.values():
        stacked = np.stack([rows[names[i]] for i in idx])
        out[np.ix_(idx, idx)] = gram_scores(stacked, _rows_measure(measure))
    return out


def sketch_row_scores(
    own: LayerSketch,
    others: Mapping[str, LayerSketch],
    spec: SketchPolicy,
    layer: str,
    measure: Measure,
) -> dict[str, float]:
    """Score estimates of one sketch against each of `others` (NaN for another shape)."""
    same = {w: s for w, s in others.items() if s.shape == own.shape}
    out = {w: float("nan") for w in others}
    if same:
        rows = sketch_rows({"": own, **same}, spec, layer, measure)
        own_row = rows.pop("")
        out.update(row_scores(own_row, rows, _rows_measure(measure)))
    return out


def encode_sketch_frame(
    tensors: Mapping[str, npt.ArrayLike | LayerSketch], meta: SnapshotMeta, spec: SketchPolicy
) -> bytes:
    """A sketch publish: layers of at least `spec.min_values` values as their k-value sketch,
    smaller ones whole, all float32; the layout (k, seed, each sketched layer's shape and sum)
    goes in the frame metadata under SKETCH_KEY. A `LayerSketch` value (made with the same
    spec) is sent as it is."""
    out: dict[str, npt.ArrayLike] = {}
    layout: dict[str, Any] = {}
    for name, value in tensors.items():
        if isinstance(value, LayerSketch):
            sk = value
        elif sketched(spec, np.size(value)):
            sk = sketch_layer(value, spec, name)
        else:
            out[name] = np.asarray(value)
            continue
        out[name] = sk.values
        layout[name] = {"shape": list(sk.shape), "sum": sk.total}
    extra = {
        SKETCH_KEY: json.dumps({"k": spec.k, "seed": spec.seed, "hash": HASH, "layers": layout})
    }
    meta = meta.model_copy(update={"wire_dtype": "float32"})
    return _encode_frame(out, meta, dtype="float32", extra_metadata=extra)


def decode_sketch_frame(
    buf: bytes | bytearray | memoryview,
    layers: Sequence[Any] | None,
    spec: SketchPolicy | None,
    required: Collection[str] | None = None,
) -> tuple[Frame, dict[str, LayerSketch | npt.NDArray[Any]]]:
    """Decode a sketch publish; returns the frame and layer → sketch or whole tether.

    With `layers` (the registered `LayerSpec`s, of which it must hold `required`, default all:
    see `frame.check_layers`) and `spec` (the federation's sketch policy) it is validated
    against both: raises the `FrameError` subclasses of `decode_frame`, and
    LayerMismatchError (layers differ from the table), ShapeError (a sketch or layer of the
    wrong shape, a layer sketched that should not be or the reverse), MetadataError (no or a bad
    layout, or a k or seed other than the policy's). Without them (a frame stored after that
    validation) only the frame itself is checked.
    """
    frame = decode_frame(buf, unit_range=False)  # a sketch's buckets are unbounded sums
    k, seed, layout = _layout(frame)
    for name, tensor in frame.tensors.items():
        outside = tensor[(tensor < 0.0) | (tensor > 1.0)] if name not in layout else tensor[:0]
        if outside.size:
            raise RangeError(out_of_range(name, float(outside.flat[0])))
    if spec is not None and (k, seed) != (spec.k, spec.seed):
        raise MetadataError(
            f"sketch k={k}, seed={seed} differ from the federation's k={spec.k}, seed={spec.seed}"
        )
    if layers is not None and spec is not None:
        _check_table(frame, layers, layout, spec, required)
    out: dict[str, LayerSketch | npt.NDArray[Any]] = {}
    for name, tensor in frame.tensors.items():
        info = layout.get(name)
        out[name] = (
            tensor
            if info is None
            else LayerSketch(
                np.asarray(tensor, dtype=np.float32), float(info["sum"]), tuple(info["shape"])
            )
        )
    return frame, out


def _layout(frame: Frame) -> tuple[int, int, dict[str, Any]]:
    if frame.meta is not None and frame.meta.wire_dtype != "float32":
        raise DTypeError("a sketch frame is float32")
    try:
        layout = json.loads(frame.extra_metadata[SKETCH_KEY])
        k, seed, sketches = int(layout["k"]), int(layout["seed"]), dict(layout["layers"])
        hashed = layout.get("hash")
        for name, info in sketches.items():
            if not math.isfinite(float(info["sum"])) or frame.entries[name].shape != (k,):
                raise ValueError(name)
            [int(d) for d in info["shape"]]
    except (KeyError, TypeError, ValueError):
        raise MetadataError(
            f"a sketch frame needs its layout under {SKETCH_KEY!r}: k, seed, and per sketched "
            "layer (a tensor of shape [k]) its shape and finite sum"
        ) from None
    if hashed != HASH:
        raise MetadataError(
            f"sketch hashed by {hashed or 'an older tetherfed'!r}, not {HASH!r}: its buckets "
            "compare with nothing here; run one tetherfed version on workers and coordinator"
        )
    return k, seed, sketches


def _check_table(
    frame: Frame,
    layers: Sequence[Any],
    layout: Mapping[str, Any],
    spec: SketchPolicy,
    required: Collection[str] | None,
) -> None:
    registered = {layer.name: layer for layer in layers}
    missing = sorted(set(registered if required is None else required) - set(frame.entries))
    unknown = sorted(set(frame.entries) - set(registered))
    if missing or unknown:
        raise LayerMismatchError(
            f"sketch frame layers differ from the registered table: missing {missing}, "
            f"unknown {unknown}"
        )
    for name, layer in registered.items():
        if name not in frame.entries:
            continue
        shape = list(frame.entries[name].shape)
        if not sketched(spec, layer.numel):
            if name in layout or shape != layer.shape:
                raise ShapeError(f"layer {name!r} has shape {shape}; registered {layer.shape}")
        elif name not in layout or list(layout[name]["shape"]) != layer.shape:
            raise ShapeError(
                f"layer {name!r} ({layer.numel} values) must travel as a sketch of shape "
                f"[{spec.k}] with its registered shape {layer.shape} in the layout"
            )
