"""Weight diagnostics (DESIGN §8): pure functions on weights, weight updates and models.

Every function takes numpy arrays or torch tensors (moved to the host as float64) and returns
numpy values or plain floats; none of them keeps state or changes its input. The names of the
metrics a worker records (``Diagnostics``, ``diagnostics.jsonl``, the coordinator's telemetry)
are in :data:`METRICS`.

Sources: seed 002 (gzip complexity, weight histograms, singular values and effective rank,
|ΔW| correlation against layer distance), seed 000 (FFT and db4 wavelet spectra of weight
updates, peaks that persist across epochs and their phase agreement), seed 004 (the spectral
radius of the input→output Jacobian, the first epoch it exceeds 1) and seed 001 (the loss against
two tracked weights). Effective rank: O. Roy and M. Vetterli, "The effective rank: a measure of
effective dimensionality", EUSIPCO 2007.
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
