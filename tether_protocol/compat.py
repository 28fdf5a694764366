"""Compatibility of tethers: `dot`, `cosine`, `pearson`, `cka` and `update_cosine`, all pairs from
one Gram matrix.

For M workers on one layer we stack the flattened tethers into X (M × N) and compute G = X Xᵀ in a
single pass over X: columns are taken in cache-sized blocks, each block's Gram comes from BLAS in
float32 and is accumulated into float64, together with the block's row sums. From G and the sums:

    dot(i, j)     = G_ij
    cosine(i, j)  = G_ij / √(G_ii G_jj)
    pearson(i, j) = C_ij / √(C_ii C_jj),   C = G' − s' s'ᵀ / N

Error bound: each block sums B ≤ 65,536 products in float32, so each block's contribution has a
relative error ≲ √B·2⁻²⁴ ≈ 1.5e-5 typically (BLAS accumulates in short runs; the worst case is
B·2⁻²⁴ ≈ 4e-3); blocks add in float64, so the bound does not grow with N. Pearson from the
unshifted G subtracts s sᵀ/N, which multiplies that error by κ = E[x²]/Var[x] (4 for U[0,1)
tethers); when any row has κ > 16 the pass is repeated with each row shifted by its first block's
mean, so κ ≈ 1 and pearson stays within ~1e-4. Normalized scores are clipped to [-1, 1] with an
exact 1 on the diagonal.

`cka` compares what layers compute rather than their tethers: linear centred kernel alignment
(Kornblith, Norouzi, Lee & Hinton, "Similarity of Neural Network Representations Revisited",
ICML 2019) of a layer's activations on a probe batch of n inputs that every worker shares. With
X (n × p) and Y (n × q) the activations, K = XXᵀ and L = YYᵀ their n × n probe Gram matrices and
H = I − 11ᵀ/n,

    CKA(X, Y) = ⟨HKH, HLH⟩_F / (‖HKH‖_F ‖HLH‖_F),

the cosine of the flattened double-centred Grams. It is invariant to permutations (indeed any
orthogonal transform) of the units and to isotropic scaling, so workers initialised independently
are comparable, and it needs no alignment of p with q. Workers publish `probe_gram` (the centred
Gram, scaled to unit Frobenius norm) per layer; scoring `cka` is then the `cosine` path below on
those n² values (a double-centred matrix sums to zero, so cosine and pearson coincide there).

`update_cosine` compares what workers learned rather than where they are: the cosine of their
updates, Δᵢ = Tᵢ − Tᵢ⁰, where Tᵢ⁰ is worker i's *origin* (its first published tether of the
layer; with a shared init every origin is the same). Clustered FL (Sattler, Müller & Samek,
"Clustered Federated Learning: Model-Agnostic Distributed Multi-Task Optimization under Privacy
Constraints", 2019, arXiv:1910.01991) splits clients by the cosine similarity of their
weight updates. Unlike `cka` it is not invariant to permuting output units, so it separates
clusters whose tasks differ by a relabelling (their updates move different rows), which `cka`
scores alike; like `cosine` it needs the units of different workers to correspond (a shared
init). The rows scored are the updates (`tether_update` makes them): every function here treats
`update_cosine` as `cosine` on them. A zero update (the first publish, a frozen layer) has no
direction and scores NaN, as a constant tensor does under `pearson`.

Pairs that are not comparable (different shapes, or a zero-variance tensor under a normalized
measure) score NaN; callers treat NaN as "not comparable", never as an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .messages import Measure

BLOCK_COLUMNS = 65_536
GATHER_COLUMNS = 32_768
KAPPA_MAX = 16.0

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class GramStats:
    """Float64 Gram matrix of the (possibly shifted) rows, their sums, and the column count."""

    gram: FloatArray
    sums: FloatArray
    n: int


Rows = npt.NDArray[Any] | Sequence[npt.NDArray[Any]]


def gram_stats(
    rows: Rows, *, shift: npt.NDArray[Any] | None = None, block: int = BLOCK_COLUMNS
) -> GramStats:
    """Gram matrix and row sums of the rows (minus `shift`) in one blocked pass.

    `rows` is a stacked M × N matrix or M flat arrays of length N. A float32 matrix with no
    shift goes block by block straight to BLAS (`syrk`, as numpy picks for `A @ A.T`); anything
    else is gathered (and shifted) block by block into a small cache-resident scratch, so separate
    tensors are never stacked into one large copy.
    """
    m, n = _dimensions(rows)
    direct = isinstance(rows, np.ndarray) and rows.dtype == np.float32 and shift is None
    width = min(block if direct else GATHER_COLUMNS, n)
    gram = np.zeros((m, m), dtype=np.float64)
    sums = np.zeros(m, dtype=np.float64)
    ones = np.ones(width, dtype=np.float32)
    scratch = None if direct else np.empty((m, width), dtype=np.float32)
    for start in range(0, n, width):
        stop = min(start + width, n)
        if scratch is None:
            chunk = np.asarray(rows)[:, start:stop]
        else:
            chunk = _gather(rows, start, stop, shift, scratch)
        gram += chunk @ chunk.T
        sums += chunk @ ones[: stop - start]
    return GramStats(gram=gram, sums=sums, n=n)


def _dimensions(rows: Rows) -> tuple[int, int]:
    if isinstance(rows, np.ndarray):
        if rows.ndim != 2:
            raise ValueError(f"expected a 2-D stacked matrix, got shape {rows.shape}")
        return rows.shape[0], rows.shape[1]
    lengths = {r.size for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"rows must be non-empty and of one length, got lengths {sorted(lengths)}")
    return len(rows), lengths.pop()


def _gather(
    rows: Rows,
    start: int,
    stop: int,
    shift: npt.NDArray[Any] | None,
    scratch: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]:
    out = scratch[:, : stop - start]
    for i, row in enumerate(rows):
        piece = row.reshape(-1)[start:stop]
        np.subtract(piece, shift[i] if shift is not None else 0, out=out[i], casting="unsafe")
    return out


def _covariance(stats: GramStats) -> FloatArray:
    return stats.gram - np.outer(stats.sums, stats.sums) / max(stats.n, 1)


def _ill_conditioned(stats: GramStats, cov: FloatArray) -> bool:
    """Whether cancellation in G − ssᵀ/N could cost pearson more than ~1e-4 (see module doc)."""
    second_moment = np.diag(stats.gram)
    variance = np.diag(cov)
    live = variance > 0
    return bool(np.any(second_moment[live] > KAPPA_MAX * variance[live]))


MEASURES: tuple[str, ...] = ("dot", "cosine", "pearson", "cka", "update_cosine")
# Measures scored as the cosine of their rows: tethers, centred probe Grams, or updates.
COSINE_ROWS: frozenset[str] = frozenset({"cosine", "cka", "update_cosine"})


def _check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; use {', '.join(MEASURES)}")


def scores_from_stats(stats: GramStats, measure: Measure) -> FloatArray:
    """The M × M score matrix of a measure from Gram statistics (pearson: of unshifted rows
    or rows shifted by any per-row constant; the covariance is the same; cka: rows are
    double-centred probe Grams, see `probe_gram`; update_cosine: rows are updates, see
    `tether_update`)."""
    _check_measure(measure)
    if measure == "dot":
        return stats.gram.copy()
    if measure in COSINE_ROWS:
        return _normalize(stats.gram)
    return _normalize(_covariance(stats))


def probe_gram(activations: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """The double-centred probe Gram HKH of a layer's activations, scaled to unit Frobenius norm.

    `activations` is n × … (one row per probe input; trailing dimensions are flattened). Returns
    the n × n float32 matrix a worker publishes for `cka`; all zeros when the activations are
    constant over the probe batch (then the layer is not comparable). Kornblith et al. 2019.
    """
    x = np.asarray(activations, dtype=np.float64)
    x = x.reshape(x.shape[0], -1)
    x = x - x.mean(axis=0, keepdims=True)  # HX: then (HX)(HX)ᵀ = HKH
    gram: FloatArray = x @ x.T
    norm = float(np.linalg.norm(gram))
    out: npt.NDArray[np.float32] = (gram / norm if norm > 0 else gram).astype(np.float32)
    return out


def tether_update(tether: npt.ArrayLike, origin: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """The update T − T⁰ of a tether since its origin, as float32 (what `update_cosine` scores).

    `tether` and `origin` have one shape (any; float16 and bfloat16 views are widened first);
    ValueError otherwise. All zeros when nothing changed: then the update is not comparable
    (NaN) under `update_cosine`. Sattler et al. 2019 (see the module docstring)."""
    t, t0 = np.asarray(tether), np.asarray(origin)
    if t.shape != t0.shape:
        raise ValueError(f"a tether of shape {t.shape} has no update from an origin of {t0.shape}")
    out: npt.NDArray[np.float32] = np.subtract(t, t0, dtype=np.float32)
    return out


def centre_gram(gram: npt.ArrayLike) -> FloatArray:
    """HKH for an n × n Gram matrix K (idempotent: a centred Gram comes back unchanged)."""
    k = np.asarray(gram, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"a probe Gram must be square, got shape {k.shape}")
    k = k - k.mean(axis=0, keepdims=True)
    out: FloatArray = k - k.mean(axis=1, keepdims=True)
    return out


def linear_cka(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Linear CKA of two activation matrices on the same n probe inputs (n × p and n × q),
    computed directly from the features: ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) of the centred X, Y
    (Kornblith et al. 2019, eq. 5). NaN when either is constant over the inputs."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    a = a.reshape(a.shape[0], -1) - a.reshape(a.shape[0], -1).mean(axis=0)
    b = b.reshape(b.shape[0], -1) - b.reshape(b.shape[0], -1).mean(axis=0)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"activations cover {a.shape[0]} and {b.shape[0]} inputs; need the same")
    denominator = np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)
    if denominator <= 0:
        return float("nan")
    return float(np.linalg.norm(b.T @ a) ** 2 / denominator)


def _normalize(gram: FloatArray) -> FloatArray:
    diag = np.clip(np.diag(gram).copy(), 0.0, None)
    # A row whose (centred) norm is ~0 relative to float32 noise has no direction: not comparable.
    scale = np.sqrt(diag)
    degenerate = scale <= 1e-12 * max(float(scale.max(initial=0.0)), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out: FloatArray = gram / np.outer(scale, scale)
    np.clip(out, -1.0, 1.0, out=out)
    np.fill_diagonal(out, 1.0)
    out[degenerate, :] = np.nan
    out[:, degenerate] = np.nan
    return out


def gram_scores(rows: Rows, measure: Measure, *, block: int = BLOCK_COLUMNS) -> FloatArray:
    """All-pairs scores of M rows (a stacked M × N matrix, or M flat arrays of length N)."""
    _check_measure(measure)
    stats = gram_stats(rows, block=block)
    if measure == "pearson" and _ill_conditioned(stats, _covariance(stats)):
        head = [row.reshape(-1)[:block] for row in rows]
        shift = np.array([h.mean(dtype=np.float64) for h in head])
        stats = gram_stats(rows, shift=shift, block=block)
    return scores_from_stats(stats, measure)


def pair_score(a: npt.ArrayLike, b: npt.ArrayLike, measure: Measure) -> float:
    """Score of one pair (NaN if shapes differ or the measure is undefined)."""
    a_arr, b_arr = np.asarray(a), np.asarray(b)
    if a_arr.shape != b_arr.shape:
        return float("nan")
    return float(gram_scores(np.stack([a_arr.reshape(-1), b_arr.reshape(-1)]), measure)[0, 1])


@dataclass(frozen=True)
class CompatibilityMatrix:
    """Scores of every pair of workers on one layer; NaN marks pairs that are not comparable."""

    measure: Measure
    workers: list[str]
    matrix: FloatArray

    def score(self, a: str, b: str) -> float:
        """Score of workers `a` and `b` (NaN when not comparable or unknown)."""
        try:
            i, j = self.workers.index(a), self.workers.index(b)
        except ValueError:
            return float("nan")
        return float(self.matrix[i, j])

    def row(self, worker: str) -> dict[str, float]:
        """Scores of `worker` against every other worker."""
        i = self.workers.index(worker)
        return {w: float(self.matrix[i, j]) for j, w in enumerate(self.workers) if j != i}

    def as_lists(self) -> list[list[float | None]]:
        """The matrix with NaN as None, ready for JSON."""
        return [[None if np.isnan(v) else float(v) for v in row] for row in self.matrix]


def all_pairs(
    tensors: Mapping[str, npt.NDArray[Any]],
    measure: Measure,
    *,
    order: Sequence[str] | None = None,
) -> CompatibilityMatrix:
    """Compatibility of every pair of workers on one layer (worker id → tether).

    Workers are grouped by tensor shape; each group is scored with one Gram matrix and pairs across
    groups are NaN (not comparable).
    """
    workers = list(order) if order is not None else list(tensors)
    matrix = np.full((len(workers), len(workers)), np.nan)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, worker in enumerate(workers):
        groups.setdefault(tuple(np.shape(tensors[worker])), []).append(i)
    for idx in groups.values():
        flat = [np.asarray(tensors[workers[i]]).reshape(-1) for i in idx]
        matrix[np.ix_(idx, idx)] = gram_scores(flat, measure)
    return CompatibilityMatrix(measure=measure, workers=workers, matrix=matrix)


def row_scores(
    own: npt.NDArray[Any],
    others: Mapping[str, npt.NDArray[Any]],
    measure: Measure,
    *,
    block: int = GATHER_COLUMNS,
) -> dict[str, float]:
    """Scores of one tether against each of `others` (worker id → tether): one row of the matrix.

    What a scoring round needs is the publisher's row, not all M² pairs: this costs one pass over
    the M tethers (dot products with `own`, plus each row's sum and sum of squares, block by block),
    where the full Gram matrix costs M times the arithmetic. Others with a different shape are NaN.
    """
    _check_measure(measure)
    names = [w for w, a in others.items() if np.shape(a) == np.shape(own)]
    out = {w: float("nan") for w in others}
    if not names:
        return out
    rows = [np.asarray(own).reshape(-1), *(np.asarray(others[w]).reshape(-1) for w in names)]
    n = rows[0].size
    shift = (
        np.array([r[:block].mean(dtype=np.float64) for r in rows]) if measure == "pearson" else None
    )
    dots, sums, squares = _row_moments(rows, shift, block)
    if measure == "dot":
        values = dots[1:]
    else:
        if measure == "pearson":
            dots = dots - sums[0] * sums / n
            squares = squares - sums * sums / n
        norms = np.sqrt(np.clip(squares, 0.0, None))
        degenerate = norms <= 1e-12 * max(float(norms.max()), 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.clip(dots[1:] / (norms[0] * norms[1:]), -1.0, 1.0)
        values[degenerate[1:] | degenerate[0]] = np.nan
    out.update({w: float(v) for w, v in zip(names, values, strict=True)})
    return out


def _row_moments(
    rows: Sequence[npt.NDArray[Any]], shift: npt.NDArray[Any] | None, block: int
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Per row: dot with row 0, sum, and sum of squares (of rows minus shift), accumulated in
    float64."""
    m, n = len(rows), rows[0].size
    width = min(block, n)
    scratch = np.empty((m, width), dtype=np.float32)
    ones = np.ones(width, dtype=np.float32)
    dots, sums, squares = np.zeros(m), np.zeros(m), np.zeros(m)
    for start in range(0, n, width):
        chunk = _gather(rows, start, min(start + width, n), shift, scratch)
        dots += chunk @ chunk[0]
        sums += chunk @ ones[: chunk.shape[1]]
        squares += np.einsum("ij,ij->i", chunk, chunk)
    return dots, sums, squares
