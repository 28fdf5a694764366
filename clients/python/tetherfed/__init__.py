"""tetherfed: federate the tethers of models that train at the same time.

    import tetherfed
    model = tetherfed.tether(model, mode="static", seed=seed)    # W_eff = W ⊙ T
    with tetherfed.Federation(url, "demo", model) as fed:
        for x, y in loader:
            ...                                                  # your step
            fed.step(loss=loss.item(), epoch=epoch)              # never blocks on the network

The SDK (`Client`, `AsyncClient`) covers every REST call of the coordinator.

The package by concern (each imports only those below it):

    cli/          the `tetherfed` command (argparse, console output)
    experiment/   specs, the sweep runner, results tables      report/   the HTML report
    launch/       run plans and folders; local, Ray and Slurm engines
    worker/       `tetherfed worker`: options, built-in tasks, the training loop
    federation/   `Federation`, a model's link to the coordinator while it trains
    diagnostics/  weight diagnostics: pure metrics and their recorder
    tethers/      `tether()`, operators and probe batches (torch)
    client/       the REST SDK (httpx; no torch)

`import tetherfed` imports none of them: the names below load on first use (PEP 562), so the SDK
and the coordinator's commands work without torch installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

if TYPE_CHECKING:
    from .client import (
        APIError,
        AsyncClient,
        AuthError,
        BadRequestError,
        Client,
        ConflictError,
        NotFoundError,
        RefusedError,
        RetryPolicy,
        ServerError,
        TetherError,
        TransportError,
    )
    from .diagnostics import (
        Diagnostics,
    )
    from .federation import (
        Federation,
        GateCheck,
        StepReport,
    )
    from .tethers import (
        ROOT_LAYER,
        Coverage,
        OperatorError,
        Probe,
        Task,
        TetherMode,
        TetherParametrization,
        apply_operator_,
        get_tether,
        layer_table,
        load_plain_state_dict,
        register_tetherable,
        set_tether_,
        tether,
        tether_coverage,
        tethered_layers,
        untether,
        update_importance,
        without_tethers,
    )
    from .worker import (
        WorkerConfig,
        WorkerInfo,
        build_model,
        default_model,
        load_task,
        run_worker,
    )

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    **dict.fromkeys(
        [
            "APIError",
            "AsyncClient",
            "AuthError",
            "BadRequestError",
            "Client",
            "ConflictError",
            "NotFoundError",
            "RefusedError",
            "RetryPolicy",
            "ServerError",
            "TetherError",
            "TransportError",
        ],
        ".client",
    ),
    **dict.fromkeys(
        [
            "Coverage",
            "OperatorError",
            "Probe",
            "ROOT_LAYER",
            "Task",
            "TetherMode",
            "TetherParametrization",
            "apply_operator_",
            "get_tether",
            "layer_table",
            "load_plain_state_dict",
            "register_tetherable",
            "set_tether_",
            "tether",
            "tether_coverage",
            "tethered_layers",
            "untether",
            "update_importance",
            "without_tethers",
        ],
        ".tethers",
    ),
    **dict.fromkeys(
        [
            "Diagnostics",
        ],
        ".diagnostics",
    ),
    **dict.fromkeys(
        [
            "Federation",
            "GateCheck",
            "StepReport",
        ],
        ".federation",
    ),
    **dict.fromkeys(
        [
            "WorkerConfig",
            "WorkerInfo",
            "build_model",
            "default_model",
            "load_task",
            "run_worker",
        ],
        ".worker",
    ),
}

__all__ = [
    "APIError",
    "AsyncClient",
    "AuthError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "Coverage",
    "Diagnostics",
    "Federation",
    "GateCheck",
    "NotFoundError",
    "OperatorError",
    "Probe",
    "ROOT_LAYER",
    "RefusedError",
    "RetryPolicy",
    "ServerError",
    "StepReport",
    "Task",
    "TetherError",
    "TetherMode",
    "TetherParametrization",
    "TransportError",
    "WorkerConfig",
    "WorkerInfo",
    "__version__",
    "apply_operator_",
    "build_model",
    "default_model",
    "get_tether",
    "layer_table",
    "load_plain_state_dict",
    "load_task",
    "register_tetherable",
    "run_worker",
    "set_tether_",
    "tether",
    "tether_coverage",
    "tethered_layers",
    "untether",
    "update_importance",
    "without_tethers",
]


__getattr__ = lazy_exports(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted(__all__)
