"""Operators: the numpy reference semantics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tether_protocol.operators import OperatorError, apply_operator

unit = hnp.arrays(np.float32, (5, 7), elements=st.floats(0, 1, width=32))


@settings(max_examples=60, deadline=None)
@given(own=unit, partner=unit, alpha=st.floats(0.01, 1.0), beta=st.floats(0.01, 1.0))
def test_operator_semantics(
    own: np.ndarray, partner: np.ndarray, alpha: float, beta: float
) -> None:
    np.testing.assert_allclose(
        apply_operator("average", {}, own, partner), (own + partner) / 2, atol=1e-6
    )
    np.testing.assert_allclose(
        apply_operator("weighted", {"alpha": alpha}, own, partner),
        (1 - alpha) * own + alpha * partner,
        atol=1e-6,
    )
    repelled = apply_operator("repel", {"beta": beta}, own, partner)
    np.testing.assert_allclose(repelled, np.clip(own + beta * (own - partner), 0, 1), atol=1e-6)
    assert repelled.min() >= 0 and repelled.max() <= 1
    np.testing.assert_array_equal(apply_operator("decouple", {}, own, partner), own)


@pytest.mark.parametrize("name", ["average", "weighted", "repel", "decouple"])
def test_in_place_update_matches_out_of_place(name: str) -> None:
    rng = np.random.default_rng(3)
    own, partner = rng.random((8, 8), dtype=np.float32), rng.random((8, 8), dtype=np.float32)
    params = {"alpha": 0.25, "beta": 0.1}
    expected = apply_operator(name, params, own, partner)  # type: ignore[arg-type]
    before = partner.copy()
    result = apply_operator(name, params, own, partner, out=own)  # type: ignore[arg-type]
    assert result is own
    np.testing.assert_allclose(own, expected, atol=1e-7)
    np.testing.assert_array_equal(partner, before)


def test_operator_errors_name_the_problem() -> None:
    a = np.zeros((2, 2), np.float32)
    with pytest.raises(OperatorError, match="shapes differ"):
        apply_operator("average", {}, a, np.zeros(3, np.float32))
    with pytest.raises(OperatorError, match="unknown operator 'blend'"):
        apply_operator("blend", {}, a, a)  # type: ignore[arg-type]
    with pytest.raises(OperatorError, match="'alpha' is missing"):
        apply_operator("weighted", {}, a, a)
    with pytest.raises(OperatorError, match="0 < alpha <= 1"):
        apply_operator("weighted", {"alpha": 2.0}, a, a)
