"""Tethers in torch: `tether()` a model (W_eff = W ⊙ T on every tethered layer), apply the
federation's operators to its tethers, and compute the probe batches `cka` and the gate use."""

from ._ops import OperatorError, apply_operator_
from ._probe import Probe
from ._task import CLASSIFICATION_METRICS, MetricFn, Task, accuracy, probe_inputs
from ._tethering import (
    ROOT_LAYER,
    Coverage,
    SkippedModules,
    TetherMode,
    TetherParametrization,
    get_tether,
    layer_table,
    load_plain_state_dict,
    pre_tether_weight,
    register_tetherable,
    set_tether_,
    tether,
    tether_coverage,
    tetherable_weights,
    tethered_layers,
    untether,
    update_importance,
)

__all__ = [
    "CLASSIFICATION_METRICS",
    "ROOT_LAYER",
    "Coverage",
    "OperatorError",
    "Probe",
    "SkippedModules",
    "MetricFn",
    "Task",
    "TetherMode",
    "TetherParametrization",
    "accuracy",
    "apply_operator_",
    "get_tether",
    "layer_table",
    "load_plain_state_dict",
    "pre_tether_weight",
    "probe_inputs",
    "register_tetherable",
    "set_tether_",
    "tether",
    "tether_coverage",
    "tetherable_weights",
    "tethered_layers",
    "untether",
    "update_importance",
]
