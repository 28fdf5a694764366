"""The experiment spec: a TOML file checked by pydantic, expanded into runs.

    [experiment]   name, out, repeats, seed, steps | epochs, publish_every, io_budget, jobs,
                   fail_fast, fedavg_every, device, reference_arm
    init = "independent" | "shared"        arms = ["federated", "independent", "fedavg", "oracle"]
    [arm.<name>]   base (a built-in arm) and policy = {field = value, …}: a named variant
    [[groups]]     name, count, and any worker option (task, task_args, shard, model, lr, …)
    [policy]       preset (demo, default, seed, cka, clustered) plus any policy field as an override
    [grid]         "dotted.key" = [values, …]   full product
    [[zip]]        "dotted.key" = [values, …]   axes of one table move together

Dotted keys address the spec: `policy.merge_threshold`, `experiment.steps`, `init`, and
`groups.<group name>.<option>`. Every error names the offending key by its dotted path.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic import model_validator as _model_validator

from tether_protocol.messages import Name, Policy, PolicyPatch
from tetherfed.launch._launch import Arm, Init, RunPlan, arm_policy, plan_workers, preset_policy
from tetherfed.worker._options import WorkerOptions

ARMS: tuple[Arm, ...] = ("federated", "independent", "fedavg", "oracle")
REPEAT_SEED_STRIDE = 1000  # repeat r runs with seeds seed + 1000·r + worker index


class SpecError(ValueError):
    """An invalid spec; the message names the key (dotted path) and the problem."""


class ExperimentSection(BaseModel):
    """`[experiment]`: what the whole sweep shares."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    out: Path | None = Field(default=None, description="Results folder (default runs/<name>).")
    repeats: int = Field(default=1, ge=1, description="Repeats of every cell and arm.")
    seed: int = Field(default=0, ge=0, description="Base seed; repeat r uses seed + 1000·r.")
    steps: int | None = Field(default=None, ge=1, description="Steps per worker (groups inherit).")
    epochs: int | None = Field(default=None, ge=1, description="Epochs, when steps is not set.")
    publish_every: int = Field(default=10, ge=1, description="Publish every K steps (inherited).")
    io_budget: float = Field(
        default=0.05,
        gt=0,
        le=1,
        description="The most of the wall time publishing may take, 0 < F ≤ 1 (inherited).",
    )
    jobs: int = Field(default=1, ge=1, description="Runs in parallel.")
    fail_fast: bool = Field(default=False, description="Stop the sweep at the first failed run.")
    fedavg_every: int = Field(default=50, ge=1, description="fedavg arm: average every K steps.")
    device: Literal["auto", "cpu"] = Field(default="auto", description="auto: CUDA round-robin.")
    reference_arm: str = Field(
        default="independent",
        description="summary.csv pairs every arm's metrics against this arm's, repeat by repeat.",
    )


class GroupSpec(WorkerOptions):
    """`[[groups]]`: `count` workers with these options (a group: who *should* merge)."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    count: int = Field(ge=1, description="Workers in this group.")

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        from tetherfed.worker._tasks import task_names  # noqa: PLC0415 (torch, only when checking)

        if task not in task_names() and ":" not in task:
            raise ValueError(
                f"unknown task {task!r}; built-in: {', '.join(task_names())}, or module:function"
            )
        return task

    @_model_validator(mode="after")
    def _known_task_args(self) -> GroupSpec:
        """A built-in task's args are checked by name here (a user task's when it loads)."""
        from tetherfed.worker._tasks import check_task_args, task_names  # noqa: PLC0415 (torch)

        if self.task_args and self.task in task_names():
            check_task_args(self.task, self.task_args)
        return self


class ArmSpec(BaseModel):
    """`[arm.<name>]`: a named arm over a built-in one, with policy overrides applied before
    the arm's own (so `{base = "oracle", policy = {merge_scope = "model"}}` is FedAvg within
    the groups that averages whole models)."""

    model_config = ConfigDict(extra="forbid")

    base: Arm = Field(description="The built-in arm: federated, independent, fedavg or oracle.")
    policy: PolicyPatch = Field(
        default_factory=PolicyPatch, description="Policy fields this arm sets over [policy]."
    )


class PolicySpec(PolicyPatch):
    """`[policy]`: a preset plus overrides of any policy field."""

    preset: Literal["demo", "default", "seed", "cka", "clustered"] = "default"

    def resolve(self) -> Policy:
        """The preset with the overrides applied (validated as a whole)."""
        patch = PolicyPatch(**self.model_dump(exclude={"preset"}, exclude_unset=True))
        return patch.apply(preset_policy(self.preset))


class Spec(BaseModel):
    """A whole experiment spec; `tetherfed experiment schema` prints its JSON Schema."""

    model_config = ConfigDict(extra="forbid")

    experiment: ExperimentSection
    init: Init = Field(default="independent", description="shared: one init for all workers.")
    arms: list[Name] = Field(
        default=["federated", "independent"],
        min_length=1,
        description="Arms to run: built-in (federated, independent, fedavg, oracle) or named in "
        "[arm.<name>].",
    )
    arm: dict[Name, ArmSpec] = Field(
        default_factory=dict, description="Named arms over the built-in ones."
    )
    groups: list[GroupSpec] = Field(min_length=1, description="At least one group.")
    policy: PolicySpec = Field(default_factory=PolicySpec)
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Full product.")
    zip: list[dict[str, list[Any]]] = Field(default_factory=list, description="Moving together.")

    @_model_validator(mode="after")
    def _consistent(self) -> Spec:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"group names must be unique, got {names}")
        self._arms_defined()
        reference = self.experiment.reference_arm
        if "reference_arm" in self.experiment.model_fields_set and reference not in self.arms:
            raise ValueError(
                f"experiment.reference_arm {reference!r} is not one of the arms {self.arms}"
            )
        for i, block in enumerate(self.zip):
            lengths = {len(v) for v in block.values()}
            if len(lengths) > 1:
                raise ValueError(
                    f"zip[{i}]: every list must have the same length, got {sorted(lengths)}"
                )
        for key, values in [*self.grid.items(), *(kv for b in self.zip for kv in b.items())]:
            if not values:
                raise ValueError(f"axis {key!r} has no values")
        return self

    def _arms_defined(self) -> None:
        """Arms are unique, built-in or defined in [arm.<name>], and each makes a valid policy."""
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms repeat: {self.arms}")
        shadowing = sorted(set(self.arm) & set(ARMS))
        if shadowing:
            raise ValueError(f"[arm.<name>] cannot redefine the built-in arm(s) {shadowing}")
        unknown = [a for a in self.arms if a not in ARMS and a not in self.arm]
        if unknown:
            raise ValueError(
                f"arms: unknown arm(s) {unknown}: built-in arms are {', '.join(ARMS)}; define "
                "others in [arm.<name>] with a base arm and policy overrides"
            )
        for name in self.arm:
            try:
                self.arm_policy(name)
            except ValidationError as error:
                problems = "; ".join(e["msg"] for e in error.errors())
                raise ValueError(f"arm.{name}.policy makes an invalid policy: {problems}") from None

    def group_options(self, group: GroupSpec) -> WorkerOptions:
        """A group's worker options, with steps/epochs/publish_every/io_budget inherited when
        unset."""
        inherited = {
            "steps": self.experiment.steps,
            "epochs": self.experiment.epochs,
            "publish_every": self.experiment.publish_every,
            "io_budget": self.experiment.io_budget,
        }
        own = group.model_dump(exclude={"name", "count"}, exclude_unset=True)
        base = group.model_dump(exclude={"name", "count"})
        return WorkerOptions(**(base | inherited | own))

    def arm_policy(self, arm: str) -> Policy:
        """The policy a run of `arm` gets: [policy], then the arm's overrides, then its base
        arm's rule (`launch.arm_policy`). ValueError when the overrides make it invalid."""
        policy, base = self.policy.resolve(), arm
        variant = self.arm.get(arm)
        if variant is not None:
            policy, base = variant.policy.apply(policy), variant.base
        return arm_policy(policy, cast(Arm, base), self.experiment.fedavg_every)


# -- errors --------------------------------------------------------------------------------------


def _path(loc: Sequence[int | str], raw: Mapping[str, Any]) -> str:
    """A pydantic error location as a dotted key; list items of groups by their name."""
    parts: list[str] = []
    node: Any = raw
    for item in loc:
        if isinstance(item, int) and isinstance(node, list):
            name = (
                node[item].get("name")
                if item < len(node) and isinstance(node[item], dict)
                else None
            )
            parts[-1] += f"[{item}]" if name is None else f"[{item}]({name})"
            node = node[item] if item < len(node) else None
        else:
            parts.append(str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts) or "(spec)"


def spec_error(error: ValidationError, raw: Mapping[str, Any], where: str = "") -> SpecError:
    """A SpecError listing each problem as `dotted.key: message`."""
    lines = []
    for e in error.errors():
        loc = [x for x in e["loc"] if not (isinstance(x, str) and x in ("function-after",))]
        message = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{_path(loc, raw)}: {message}")
    return SpecError(f"invalid spec{where}:\n  " + "\n  ".join(lines))


def validate(raw: Mapping[str, Any], where: str = "") -> Spec:
    """The Spec of a parsed TOML document (SpecError naming the keys otherwise)."""
    try:
        return Spec.model_validate(raw)
    except ValidationError as error:
        raise spec_error(error, raw, where) from None


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file (SpecError with the line on a syntax error)."""
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{path}: not valid TOML: {error}") from None


# -- overrides and expansion ---------------------------------------------------------------------


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` (dotted; `groups.<name>.<option>` finds the group by name) in a raw spec."""
    parts = key.split(".")
    if parts[0] == "groups":
        groups = raw.get("groups", [])
        match = [g for g in groups if isinstance(g, dict) and g.get("name") == parts[1]]
        if len(parts) != 3 or not match:
            raise SpecError(f"{key}: expected groups.<name>.<option> naming one of the groups")
        match[0][parts[2]] = value
        return
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError(f"{key}: {part!r} is not a table")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` (VALUE read as a TOML value, else as a string) from --set."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def cells(spec: Spec) -> list[dict[str, Any]]:
    """Every cell of the grid × zip product, as {dotted key: value} (one empty cell if none)."""
    axes: list[list[dict[str, Any]]] = [[{k: v} for v in vs] for k, vs in spec.grid.items()]
    for block in spec.zip:
        n = len(next(iter(block.values()), []))
        axes.append([{k: vs[i] for k, vs in block.items()} for i in range(n)])
    return [dict(kv for part in combo for kv in part.items()) for combo in itertools.product(*axes)]


@dataclass(frozen=True)
class PlannedRun:
    """One (cell, arm, repeat): its id, the values of its cell and its RunPlan."""

    run_id: str
    cell: int
    arm: str
    repeat: int
    params: dict[str, Any]
    plan: RunPlan


_PLACE = ("index", "group_index", "index_in_group", "group_size")


# Policy fields added after results folders of the same schema were made, at their defaults:
# left out of run ids so those folders resume.
_NEWER_POLICY_FIELDS: dict[str, Any] = {"pairing_by": "layer"}


def run_id(plan: RunPlan) -> str:
    """A short hash (10 hex) of the resolved run config plus its repeat.

    A worker's place in the run (`_PLACE`) follows from the order and groups of the workers,
    already hashed, and options at their defaults that older versions lacked (`task_args`,
    `shard`, `io_budget`) are left out, as are policy fields newer than the first folders at
    their defaults, so a folder's run ids stay those it was started with."""
    body = plan.model_dump(mode="json", exclude={"run_id", "federation"})
    for key, default in _NEWER_POLICY_FIELDS.items():
        if body["policy"].get(key) == default:
            body["policy"].pop(key, None)
    for worker in body["workers"]:
        for key in _PLACE:
            worker.pop(key, None)
        options = worker["options"]
        for key, default in (("task_args", {}), ("shard", None), ("io_budget", 0.05)):
            if options.get(key) == default:
                options.pop(key, None)
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return digest[:10]


def _cell_spec(raw: Mapping[str, Any], params: Mapping[str, Any], index: int) -> Spec:
    cell = copy.deepcopy(dict(raw))
    cell.pop("grid", None)
    cell.pop("zip", None)
    for key, value in params.items():
        set_dotted(cell, key, value)
    return validate(cell, where=f" (cell {index}: {params})" if params else "")


def _plan(spec: Spec, arm: str, repeat: int, params: dict[str, Any], devices: int) -> RunPlan:
    seed = spec.experiment.seed + REPEAT_SEED_STRIDE * repeat
    groups = [(g.name, g.count, spec.group_options(g)) for g in spec.groups]
    policy = spec.arm_policy(arm)
    plan = RunPlan(
        federation="pending",
        policy=policy,
        arm=arm,
        init=spec.init,
        seed=seed,
        workers=plan_workers(groups, seed, spec.init, devices),
        repeat=repeat,
        params=params,
    )
    rid = run_id(plan)
    return plan.model_copy(update={"run_id": rid, "federation": f"{spec.experiment.name}-{rid}"})


def expand(raw: Mapping[str, Any], devices: int = 0) -> tuple[Spec, list[PlannedRun]]:
    """Validate a raw spec and expand it into runs, ordered repeat-major (every cell and arm of
    repeat 0 first, so a partial sweep has complete pairs). Raises SpecError."""
    spec = validate(raw)
    specs = [(i, p, _cell_spec(raw, p, i)) for i, p in enumerate(cells(spec))]
    runs = []
    for repeat in range(spec.experiment.repeats):
        for index, params, cell in specs:
            for arm in cell.arms:
                plan = _plan(cell, arm, repeat, params, devices)
                assert plan.run_id is not None
                runs.append(PlannedRun(plan.run_id, index, arm, repeat, params, plan))
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise SpecError("two runs resolve to the same config (a grid axis that changes nothing?)")
    return spec, runs
