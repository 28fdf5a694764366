"""Compatibility: Gram scoring equals a naive reference; measure properties; not-comparable pairs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tether_protocol.compat import all_pairs, gram_scores, pair_score, row_scores

MEASURES = ["dot", "cosine", "pearson"]


def naive(a: np.ndarray, b: np.ndarray, measure: str) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if measure == "pearson":
        a64, b64 = a64 - a64.mean(), b64 - b64.mean()
    if measure == "dot":
        return float(np.sum(a64 * b64))
    return float(np.sum(a64 * b64) / np.sqrt(np.sum(a64 * a64) * np.sum(b64 * b64)))


stacks = st.integers(2, 6).flatmap(
    lambda m: hnp.arrays(
        np.float32,
        st.tuples(st.just(m), st.integers(8, 300)),
        elements=st.floats(0, 1, width=32),
    )
)


def conditioned(row: np.ndarray, measure: str) -> bool:
    """Rows whose score float32 input can determine: not (near) zero, not (near) constant."""
    r = row.astype(np.float64)
    rms = float(np.sqrt(np.mean(r * r)))
    if measure == "dot":
        return True
    if measure == "cosine":
        return rms > 1e-3
    return float(np.std(r)) > 1e-2 * max(rms, 1e-12)


@settings(max_examples=80, deadline=None)
@given(x=stacks, measure=st.sampled_from(MEASURES), block=st.sampled_from([7, 64, 65_536]))
def test_gram_scores_equal_the_naive_pairwise_reference(
    x: np.ndarray, measure: str, block: int
) -> None:
    scores = gram_scores(x, measure, block=block)  # type: ignore[arg-type]
    for i in range(len(x)):
        for j in range(len(x)):
            if not (conditioned(x[i], measure) and conditioned(x[j], measure)):
                if (
                    measure != "dot"
                    and (np.ptp(x[i]) == 0 or np.ptp(x[j]) == 0)
                    and (measure == "pearson" or not x[i].any() or not x[j].any())
                ):
                    assert np.isnan(scores[i, j]), f"({i},{j}) has no direction but scored"
                continue
            expected = naive(x[i], x[j], measure)
            tolerance = 1e-5 * max(1.0, abs(expected)) if measure == "dot" else 2e-4
            assert scores[i, j] == pytest.approx(expected, abs=tolerance), (i, j, measure)


@settings(max_examples=60, deadline=None)
@given(x=stacks, measure=st.sampled_from(["cosine", "pearson"]))
def test_normalized_measures_are_symmetric_bounded_and_one_on_the_diagonal(
    x: np.ndarray, measure: str
) -> None:
    x = x + np.linspace(0, 1, x.shape[1], dtype=np.float32)  # non-constant rows
    scores = gram_scores(x, measure)  # type: ignore[arg-type]
    np.testing.assert_array_equal(scores, scores.T)
    assert np.all((scores >= -1) & (scores <= 1))
    np.testing.assert_array_equal(np.diag(scores), 1.0)


def test_pearson_survives_large_mean_small_spread() -> None:
    rng = np.random.default_rng(1)
    x = (0.5 + 1e-3 * rng.standard_normal((3, 200_000))).astype(np.float32)
    x[1] = 0.5 * x[0] + 0.5 * x[1]
    np.testing.assert_allclose(
        gram_scores(x, "pearson"), np.corrcoef(x.astype(np.float64)), atol=1e-4
    )


def test_identical_anti_and_independent_tethers() -> None:
    rng = np.random.default_rng(0)
    a = rng.random(4096, dtype=np.float32)
    assert pair_score(a, a, "pearson") == pytest.approx(1.0)
    assert pair_score(a, 1 - a, "pearson") == pytest.approx(-1.0)
    assert abs(pair_score(a, rng.random(4096, dtype=np.float32), "pearson")) < 0.1
    # The prototype's raw dot grows with size: two 64×64 U[0,1) tethers score about 1,000.
    dot = pair_score(rng.random((64, 64)), rng.random((64, 64)), "dot")
    assert 900 < dot < 1150


def test_pairs_with_different_shapes_are_not_comparable() -> None:
    rng = np.random.default_rng(0)
    tensors = {"a": rng.random((4, 4)), "b": rng.random((4, 4)), "c": rng.random((2, 8))}
    matrix = all_pairs(tensors, "cosine")
    assert np.isnan(matrix.score("a", "c")) and np.isnan(matrix.score("c", "b"))
    assert matrix.score("a", "b") == pytest.approx(naive(tensors["a"], tensors["b"], "cosine"))
    assert matrix.score("c", "c") == 1.0
    assert matrix.as_lists()[0][2] is None
    assert set(matrix.row("a")) == {"b", "c"}


def test_constant_tether_is_not_comparable_under_pearson() -> None:
    x = np.stack([np.full(100, 0.5, np.float32), np.linspace(0, 1, 100, dtype=np.float32)])
    scores = gram_scores(x, "pearson")
    assert np.isnan(scores[0, 1]) and np.isnan(scores[0, 0])
    assert scores[1, 1] == 1.0


def test_unknown_measure_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown measure"):
        gram_scores(np.ones((2, 3), np.float32), "l2")  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(x=stacks, measure=st.sampled_from(MEASURES), block=st.sampled_from([5, 64, 32_768]))
def test_row_scores_equal_the_matching_row_of_the_matrix(
    x: np.ndarray, measure: str, block: int
) -> None:
    x = x + np.linspace(0, 1, x.shape[1], dtype=np.float32)  # well-conditioned rows
    others = {f"w{i}": x[i] for i in range(1, len(x))}
    row = row_scores(x[0], others, measure, block=block)  # type: ignore[arg-type]
    full = gram_scores(x, measure)  # type: ignore[arg-type]
    for i in range(1, len(x)):
        tolerance = 1e-5 * max(1.0, abs(full[0, i])) if measure == "dot" else 2e-4
        assert row[f"w{i}"] == pytest.approx(full[0, i], abs=tolerance)


def test_row_scores_mark_other_shapes_not_comparable() -> None:
    rng = np.random.default_rng(2)
    own = rng.random((4, 4))
    row = row_scores(
        own, {"same": own.copy(), "other": rng.random(16), "flat": rng.random((2, 8))}, "pearson"
    )
    assert row["same"] == pytest.approx(1.0)
    assert np.isnan(row["other"]) and np.isnan(row["flat"])
