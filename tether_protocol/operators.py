"""Merge and drift operators: the numpy reference (workers run on-device torch twins that agree).

Each operator maps (own tether, partner tether) to the new own tether. `out` may alias `own` for an
in-place update. Operators never change the partner's tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt

from .messages import DriftOperator, MergeOperator

Array = npt.NDArray[np.floating]


class OperatorError(ValueError):
    """An operator was asked for with an unknown name, bad parameters, or mismatched tensors."""


def average(own: Array, partner: Array, out: Array | None = None) -> Array:
    """Merge by averaging: Tᵢ ← (Tᵢ + Tⱼ) / 2 (the prototype)."""
    return weighted(own, partner, 0.5, out=out)


def weighted(own: Array, partner: Array, alpha: float, out: Array | None = None) -> Array:
    """Soft merge: Tᵢ ← (1 − α) Tᵢ + α Tⱼ, α ∈ (0, 1]."""
    if not 0.0 < alpha <= 1.0:
        raise OperatorError(f"weighted merge needs 0 < alpha <= 1, got {alpha}")
    delta = (partner - own) * alpha
    return np.add(own, delta, out=out)


def repel(own: Array, partner: Array, beta: float, out: Array | None = None) -> Array:
    """Drift apart: Tᵢ ← clip(Tᵢ + β (Tᵢ − Tⱼ), 0, 1)."""
    if not 0.0 < beta <= 1.0:
        raise OperatorError(f"repel needs 0 < beta <= 1, got {beta}")
    step = (own - partner) * beta
    result = np.add(own, step, out=out)
    return np.clip(result, 0.0, 1.0, out=result)


def decouple(own: Array, partner: Array, out: Array | None = None) -> Array:
    """Drift by decoupling: the tether is unchanged; the pair only enters cooldown."""
    if out is None:
        return own.copy()
    if out is not own:
        np.copyto(out, own)
    return out


def apply_operator(
    name: MergeOperator | DriftOperator,
    params: Mapping[str, float],
    own: Array,
    partner: Array,
    out: Array | None = None,
) -> Array:
    """Apply a named operator with the parameters a decision carries."""
    if own.shape != partner.shape:
        raise OperatorError(f"tether shapes differ: own {own.shape}, partner {partner.shape}")
    table: dict[str, Callable[[], Array]] = {
        "average": lambda: average(own, partner, out=out),
        "weighted": lambda: weighted(own, partner, _param(params, "alpha"), out=out),
        "repel": lambda: repel(own, partner, _param(params, "beta"), out=out),
        "decouple": lambda: decouple(own, partner, out=out),
    }
    if name not in table:
        raise OperatorError(f"unknown operator {name!r}; known: {', '.join(table)}")
    return table[name]()


def _param(params: Mapping[str, float], key: str) -> float:
    if key not in params:
        raise OperatorError(f"operator parameter {key!r} is missing")
    return float(params[key])
