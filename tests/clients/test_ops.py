"""The torch operators agree with the numpy reference in tether_protocol.operators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tether_protocol import operators as reference
from tetherfed.tethers._ops import OPERATOR_NAMES, OperatorError, apply_operator_

unit_floats = st.floats(0.0, 1.0, width=32, allow_subnormal=False)
coefficients = st.floats(0.0, 1.0, exclude_min=True)
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6)


@st.composite
def tether_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    shape = draw(shapes)
    own = draw(hnp.arrays(np.float32, shape, elements=unit_floats))
    partner = draw(hnp.arrays(np.float32, shape, elements=unit_floats))
    return own, partner


@settings(max_examples=60, deadline=None)
@given(
    pair=tether_pairs(),
    name=st.sampled_from(OPERATOR_NAMES),
    alpha=coefficients,
    beta=coefficients,
)
def test_torch_twin_agrees_with_numpy_reference(
    pair: tuple[np.ndarray, np.ndarray], name: str, alpha: float, beta: float
) -> None:
    own, partner = pair
    params = {"alpha": alpha, "beta": beta}
    expected = reference.apply_operator(name, params, own.copy(), partner)  # type: ignore[arg-type]
    own_t = torch.from_numpy(own.copy())

    result = apply_operator_(name, params, own_t, torch.from_numpy(partner))

    assert result is own_t, "the operator must work in place and return its target"
    np.testing.assert_allclose(own_t.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert own_t.min() >= 0 and own_t.max() <= 1


def test_average_is_the_midpoint_and_leaves_partner_alone() -> None:
    own, partner = torch.tensor([0.0, 1.0, 0.2]), torch.tensor([1.0, 1.0, 0.6])
    partner_before = partner.clone()

    apply_operator_("average", {}, own, partner)

    torch.testing.assert_close(own, torch.tensor([0.5, 1.0, 0.4]))
    torch.testing.assert_close(partner, partner_before, rtol=0, atol=0)


def test_repel_clips_to_unit_interval() -> None:
    own, partner = torch.tensor([0.9, 0.1, 0.5]), torch.tensor([0.1, 0.9, 0.4])

    apply_operator_("repel", {"beta": 0.5}, own, partner)

    torch.testing.assert_close(own, torch.tensor([1.0, 0.0, 0.55]))


def test_partner_as_numpy_array_and_other_dtype_is_converted() -> None:
    own = torch.full((2, 2), 0.2, dtype=torch.float32)

    apply_operator_("weighted", {"alpha": 0.25}, own, np.full((2, 2), 0.6, dtype=np.float16))

    torch.testing.assert_close(own, torch.full((2, 2), 0.3), atol=1e-3, rtol=0)
    assert own.dtype == torch.float32


def test_works_on_a_learned_tether_leaf_without_autograd_error() -> None:
    own = torch.nn.Parameter(torch.full((3,), 0.4))

    apply_operator_("average", {}, own, torch.zeros(3))

    torch.testing.assert_close(own.detach(), torch.full((3,), 0.2))
    assert own.grad_fn is None


@pytest.mark.parametrize(
    ("name", "params", "partner_shape", "message"),
    [
        ("blend", {}, (2, 3), "unknown operator 'blend'"),
        ("average", {}, (3, 2), "shapes differ"),
        ("weighted", {}, (2, 3), "'alpha' is missing"),
        ("weighted", {"alpha": 0.0}, (2, 3), "0 < alpha <= 1"),
        ("repel", {"beta": 1.5}, (2, 3), "0 < beta <= 1"),
        ("repel", {"alpha": 0.1}, (2, 3), "'beta' is missing"),
    ],
)
def test_bad_requests_raise_typed_error_and_leave_own_unchanged(
    name: str, params: dict[str, float], partner_shape: tuple[int, ...], message: str
) -> None:
    own = torch.full((2, 3), 0.5)

    with pytest.raises(OperatorError, match=message) as info:
        apply_operator_(name, params, own, torch.zeros(partner_shape))

    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, reference.OperatorError)
    torch.testing.assert_close(own, torch.full((2, 3), 0.5), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", OPERATOR_NAMES)
def test_cuda_own_with_cpu_partner_matches_cpu(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    own, partner = torch.rand(16, 8, generator=gen), torch.rand(16, 8, generator=gen).pin_memory()
    params = {"alpha": 0.3, "beta": 0.2}
    own_gpu = own.cuda()

    apply_operator_(name, params, own_gpu, partner)
    apply_operator_(name, params, own, partner)

    torch.testing.assert_close(own_gpu.cpu(), own, rtol=1e-6, atol=1e-6)
