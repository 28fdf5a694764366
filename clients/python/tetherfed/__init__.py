"""tetherfed: federate the tethers of models that train at the same time.

    import tetherfed
    model = tetherfed.tether(model, mode="static", seed=seed)    # W_eff = W ⊙ T
    with tetherfed.Federation(url, "demo", model) as fed:
        for x, y in loader:
            ...                                                  # your step
            fed.step(loss=loss.item(), epoch=epoch)              # never blocks on the network

The SDK (`Client`, `AsyncClient`) covers every REST call of the coordinator.
"""

from ._diagnostics import Diagnostics
from ._errors import (
    APIError,
    AuthError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    RefusedError,
    ServerError,
    TetherError,
    TransportError,
)
from ._federation import Federation, GateCheck, StepReport
from ._ops import OperatorError, apply_operator_
from ._probe import Probe
from ._retry import RetryPolicy
from ._sdk import AsyncClient, Client
from ._tasks import Task, build_model, default_model, load_task
from ._tethering import (
    ROOT_LAYER,
    TetherMode,
    TetherParametrization,
    get_tether,
    layer_table,
    load_plain_state_dict,
    set_tether_,
    tether,
    tethered_layers,
    untether,
    update_importance,
)
from ._worker import WorkerConfig, run_worker

__version__ = "0.1.0"

__all__ = [
    "ROOT_LAYER",
    "APIError",
    "AsyncClient",
    "AuthError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "Diagnostics",
    "Federation",
    "GateCheck",
    "NotFoundError",
    "RefusedError",
    "OperatorError",
    "Probe",
    "RetryPolicy",
    "ServerError",
    "StepReport",
    "Task",
    "TetherError",
    "TetherMode",
    "TetherParametrization",
    "TransportError",
    "WorkerConfig",
    "__version__",
    "apply_operator_",
    "build_model",
    "default_model",
    "get_tether",
    "layer_table",
    "load_plain_state_dict",
    "untether",
    "load_task",
    "run_worker",
    "set_tether_",
    "tether",
    "tethered_layers",
    "update_importance",
]
