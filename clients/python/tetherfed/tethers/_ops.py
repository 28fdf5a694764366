"""On-device torch twins of the merge/drift operators in ``tether_protocol.operators``.

The worker applies a decision to its own tether where the tether lives (CPU or GPU), in place,
between optimizer steps. The arithmetic follows the numpy reference step for step, so both agree
to float32 rounding.

Under `Policy.merge_scope` weights or model the same operator also moves the layer's parts
(weights, biases, untethered tensors: `tetherfed.tethers.layer_parts`), with ``unit=False``:
repel then does not clip to [0, 1], which only tethers live in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from tether_protocol import operators as reference

__all__ = ["OPERATOR_NAMES", "OperatorError", "apply_operator_"]


class OperatorError(reference.OperatorError):
    """Unknown operator name, bad or missing parameter, or mismatched tensors (a ``ValueError``)."""


def _weighted_(own: Tensor, partner: Tensor, params: Mapping[str, float], unit: bool) -> None:
    alpha = _param(params, "alpha")
    if not 0.0 < alpha <= 1.0:
        raise OperatorError(f"weighted merge needs 0 < alpha <= 1, got {alpha}")
    own.add_((partner - own).mul_(alpha))


def _average_(own: Tensor, partner: Tensor, params: Mapping[str, float], unit: bool) -> None:
    own.add_((partner - own).mul_(0.5))


def _repel_(own: Tensor, partner: Tensor, params: Mapping[str, float], unit: bool) -> None:
    beta = _param(params, "beta")
    if not 0.0 < beta <= 1.0:
        raise OperatorError(f"repel needs 0 < beta <= 1, got {beta}")
    own.add_((own - partner).mul_(beta))
    if unit:
        own.clamp_(0.0, 1.0)


def _decouple_(own: Tensor, partner: Tensor, params: Mapping[str, float], unit: bool) -> None:
    """Decoupling leaves the tether as it is; the pair only cools down."""


_OPERATORS: Mapping[str, Callable[[Tensor, Tensor, Mapping[str, float], bool], None]] = {
    "average": _average_,
    "weighted": _weighted_,
    "repel": _repel_,
    "decouple": _decouple_,
}
OPERATOR_NAMES: tuple[str, ...] = tuple(_OPERATORS)


def apply_operator_(
    name: str,
    params: Mapping[str, float],
    own: Tensor,
    partner: Tensor | np.ndarray,
    *,
    unit: bool = True,
) -> Tensor:
    """Apply the named operator to ``own`` in place and return it.

    ``partner`` may live on another device (it is copied to ``own``'s device and dtype with a
    non-blocking copy) or be a numpy array; the two have one shape. ``unit`` (tethers, the
    default) clips repel's result to [0, 1]; ``unit=False`` (a layer's weights, biases and other
    parts under ``merge_scope`` weights or model) leaves it unbounded. Raises
    :class:`OperatorError` for an unknown name, a missing or out-of-range parameter, or a shape
    mismatch; ``own`` is then left unchanged.
    """
    operator = _OPERATORS.get(name)
    if operator is None:
        raise OperatorError(f"unknown operator {name!r}; known: {', '.join(OPERATOR_NAMES)}")
    other = torch.as_tensor(partner)
    if tuple(own.shape) != tuple(other.shape):
        raise OperatorError(
            f"tether shapes differ: own {tuple(own.shape)}, partner {tuple(other.shape)}"
        )
    other = other.to(device=own.device, dtype=own.dtype, non_blocking=True)
    with torch.no_grad():
        operator(own, other, params, unit)
    return own


def _param(params: Mapping[str, float], key: str) -> float:
    if key not in params:
        raise OperatorError(f"operator parameter {key!r} is missing")
    return float(params[key])
