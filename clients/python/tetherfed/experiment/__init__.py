"""Experiments: a TOML spec expands into runs (sweeps × arms × repeats); the runner executes them
into one folder and writes `results.csv` and `summary.csv`.

    import tetherfed.experiment
    rows = tetherfed.experiment.run("cluster-recovery")
"""

from ._results import summarize
from ._runner import (
    ExperimentError,
    examples,
    plan,
    print_dry_run,
    reference_arm,
    run,
    status,
    summary_table,
)
from ._spec import Spec, SpecError

__all__ = [
    "ExperimentError",
    "Spec",
    "SpecError",
    "examples",
    "plan",
    "print_dry_run",
    "reference_arm",
    "run",
    "status",
    "summarize",
    "summary_table",
]
