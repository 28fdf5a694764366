"""The diagnostics functions against cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tetherfed.diagnostics import (
    delta_correlation_by_distance,
    effective_rank,
    gzip_ratio,
    jacobian_spectral_radius,
    persistent_peaks,
    singular_values,
    update_spectrum,
    weight_histogram,
    weight_histograms,
)


def test_effective_rank_of_identity_is_n_and_of_rank_one_is_one() -> None:
    rng = np.random.default_rng(0)
    rank_one = np.outer(rng.normal(size=7), rng.normal(size=5))

    assert effective_rank(np.eye(6)) == pytest.approx(6.0)
    assert effective_rank(torch.eye(4)) == pytest.approx(4.0)
    assert effective_rank(rank_one) == pytest.approx(1.0, abs=1e-9)
    assert effective_rank(np.zeros((3, 3))) == 0.0


def test_conv_kernels_are_reshaped_to_out_by_in_times_k() -> None:
    kernel = torch.zeros(4, 2, 3, 3)
    for o in range(4):
        kernel.view(4, -1)[o, o] = 1.0  # four orthonormal rows of length 18

    assert singular_values(kernel).shape == (4,)
    assert effective_rank(kernel) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        singular_values(np.ones(5))


def test_gzip_ratio_of_zeros_is_far_below_random_normal_weights() -> None:
    noise = np.random.default_rng(1).normal(size=(64, 64))

    zeros, random = gzip_ratio(np.zeros((64, 64))), gzip_ratio(noise)

    assert zeros < 0.01, zeros
    assert random > 0.8, random
    assert gzip_ratio(noise) == random  # deterministic: no timestamp in the stream


def test_histogram_sums_to_element_count_with_outliers_in_edge_bins() -> None:
    w = np.random.default_rng(2).normal(scale=2.0, size=(30, 20))

    counts = weight_histogram(w, bins=16, range=(-1.0, 1.0))

    assert counts.sum() == w.size
    assert counts[0] == np.sum(w <= -1.0 + 2 / 16) and counts[-1] >= np.sum(w > 1.0)


def test_histograms_of_all_layers_add_up_and_normalise_by_total_norm() -> None:
    layers = {"a": np.full((2, 2), 3.0), "b": np.full((1, 4), 4.0)}  # total norm sqrt(36+64)=10

    hists = weight_histograms(layers, bins=20, range=(-0.025, 0.975), normalize=True)

    assert hists["all"].sum() == 8
    assert hists["a"][6] == 4 and hists["b"][8] == 4  # 0.3 and 0.4 of the norm, mid-bin
    np.testing.assert_array_equal(hists["all"], hists["a"] + hists["b"])


def test_fft_peak_of_a_pure_sine_is_at_its_bin() -> None:
    n, k = 1024, 37
    sine = np.sin(2 * np.pi * k * np.arange(n) / n)

    spectrum = update_spectrum(sine)

    assert int(np.argmax(spectrum.magnitude[0])) == k
    assert spectrum.freqs[k] == pytest.approx(k / n)
    assert spectrum.level == 5 and spectrum.wavelet.shape == (1, sum(spectrum.level_sizes))


def test_persistent_peak_found_for_an_injected_sine_but_not_for_white_noise() -> None:
    rng = np.random.default_rng(3)
    epochs, n, k = 6, 2048, 100
    t = np.arange(n)
    noise = rng.normal(size=(epochs, n))
    injected = noise + 0.5 * np.sin(2 * np.pi * k * t / n + 0.3)

    found = persistent_peaks(update_spectrum(injected).fft)
    none = persistent_peaks(update_spectrum(noise).fft)

    assert [p.bin for p in found] == [k], found
    assert found[0].phase_agreement > 0.99  # the same phase in every epoch
    assert none == []


def test_correlation_by_distance_on_layers_with_known_correlation() -> None:
    p = np.linspace(0.0, 1.0, 20_001)
    # |ΔW| quantiles: a, 2a (correlation 1) and a² (correlation √15/4 with a, for a uniform).
    layers = [p, 2 * p, p**2]

    by_distance = delta_correlation_by_distance(layers, quantiles=2001)

    expected = math.sqrt(15) / 4
    assert by_distance[0] == pytest.approx((1.0 + expected) / 2, abs=1e-3)
    assert by_distance[1] == pytest.approx(expected, abs=1e-3)


def test_correlation_skips_unchanged_layers() -> None:
    out = delta_correlation_by_distance([np.zeros(10), np.arange(10.0)])

    assert np.isnan(out[0])


def _linear(matrix: torch.Tensor) -> nn.Module:
    layer = nn.Linear(matrix.shape[1], matrix.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(matrix)
    return layer


def test_jacobian_radius_of_a_linear_map_is_its_largest_abs_eigenvalue() -> None:
    torch.manual_seed(0)
    basis = torch.randn(5, 5, dtype=torch.float64)
    eigen = torch.diag(torch.tensor([0.5, -2.5, 1.0, 0.2, 1.5], dtype=torch.float64))
    matrix = (basis @ eigen @ torch.linalg.inv(basis)).float()

    result = jacobian_spectral_radius(_linear(matrix), torch.randn(8, 5), iterations=60)

    assert result.kind == "spectral_radius"
    assert result.radius == pytest.approx(2.5, rel=1e-2)
    np.testing.assert_allclose(result.per_sample, 2.5, rtol=1e-2)


def test_jacobian_of_a_rectangular_map_reports_its_top_singular_value() -> None:
    torch.manual_seed(1)
    matrix = torch.randn(3, 6)
    top = float(torch.linalg.svdvals(matrix)[0])

    result = jacobian_spectral_radius(_linear(matrix), torch.randn(4, 6), iterations=60)

    assert result.kind == "top_singular_value"
    assert result.radius == pytest.approx(top, rel=1e-3)


def test_jacobian_radius_is_per_probe_sample_for_a_nonlinear_map() -> None:
    probe = torch.tensor([[0.0], [1.0], [2.0]])

    result = jacobian_spectral_radius(torch.sin, probe, iterations=10)

    np.testing.assert_allclose(result.per_sample, np.abs(np.cos([0.0, 1.0, 2.0])), rtol=1e-5)
    assert result.radius == pytest.approx(1.0, rel=1e-5)
