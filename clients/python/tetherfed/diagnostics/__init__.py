"""Weight diagnostics: pure functions on weights, weight updates and models.

Every function takes numpy arrays or torch tensors (moved to the host as float64) and returns
numpy values or plain floats; none of them keeps state or changes its input. The names of the
metrics a worker records (``Diagnostics``, ``diagnostics.jsonl``, the coordinator's telemetry)
are in :data:`METRICS`.

The metrics: gzip complexity, weight histograms, singular values and effective rank, and the
correlation of |ΔW| with layer distance; FFT and db4 wavelet spectra of weight updates with the
peaks that persist across epochs; the spectral radius of the input→output Jacobian and the first
epoch it exceeds 1; the loss against two tracked weights. Effective rank: O. Roy and M. Vetterli,
"The effective rank: a measure of effective dimensionality", EUSIPCO 2007.
"""

from ._metrics import (
    METRICS,
    JacobianRadius,
    Peak,
    UpdateSpectrum,
    as_matrix,
    delta_correlation_by_distance,
    effective_rank,
    gzip_ratio,
    jacobian_spectral_radius,
    persistent_peaks,
    singular_values,
    spectral_entropy_rank,
    spectrum_peaks,
    summarize,
    update_spectrum,
    weight_histogram,
    weight_histograms,
)
from ._recorder import Diagnostics

__all__ = [
    "Diagnostics",
    "JacobianRadius",
    "METRICS",
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
