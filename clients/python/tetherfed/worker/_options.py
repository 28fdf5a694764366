"""The training options of a worker: one typed model, read by `tetherfed worker`, `tetherfed up`,
the launcher and experiment specs (a spec's `[[groups]]` take exactly these keys).

Pure pydantic (no torch), so the CLI can build its parser from it without loading torch, and no
module needs to import the CLI back.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import FieldInfo

from tether_protocol.messages import WireDType

TaskArg = int | float | str


@dataclass(frozen=True)
class WorkerInfo:
    """Where a worker stands in its run; a task function taking ``worker=`` receives it.

    ``index``: the worker's index in the run (0 …); ``group``: its group's name and
    ``group_index`` the group's position among the run's groups (0 …, the spec's order);
    ``index_in_group`` (0 … ``group_size`` − 1) and ``group_size``: its place in the group;
    ``repeat``: the experiment repeat (0 outside experiments); ``seed``: the run's seed, shared by
    every worker of the run (experiment seed + 1000 · repeat; a lone worker's ``--seed``).
    """

    index: int = 0
    group: str = "default"
    group_index: int = 0
    index_in_group: int = 0
    group_size: int = 1
    repeat: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.index, self.group_index, self.index_in_group, self.repeat) < 0:
            raise ValueError(f"worker indices and repeat must be ≥ 0: {self}")
        if not 0 <= self.index_in_group < self.group_size:
            raise ValueError(
                f"index_in_group {self.index_in_group} outside a group of {self.group_size}"
            )


class ShardSpec(BaseModel):
    """The part of its task's training set a worker of a group trains on (the validation set is
    never sharded).

    ``disjoint``: worker k of the group gets examples [k·size, (k+1)·size) of a permutation of
    the training set seeded by the run's seed and the group's index, so the group's shards are
    disjoint; ``iid``: an independent sample of ``size`` examples seeded by the worker's data
    seed (shards of one group may overlap). Either way both come from the training examples left
    once the group's held-out gate reserve is set aside (see ``tetherfed.worker._tasks.shard``).
    """

    model_config = ConfigDict(extra="forbid")

    size: int = Field(ge=1, description="training examples per worker")
    scheme: Literal["disjoint", "iid"] = "disjoint"

    def __str__(self) -> str:
        return f"size={self.size},scheme={self.scheme}"


class WorkerOptions(BaseModel):
    """How one worker trains (everything but where it connects, its seeds and its device)."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(
        default="random-classification", description="built-in task or module:function"
    )
    task_args: dict[str, TaskArg] = Field(
        default_factory=dict,
        description="keyword arguments of the task function (e.g. k=4 clusters of digits-rot)",
    )
    shard: ShardSpec | None = Field(
        default=None,
        description="train on a shard of the task's training set: size=N[,scheme=disjoint|iid]",
    )
    model: str | None = Field(
        default=None, description="built-in model or module:function (default: the task's)"
    )
    steps: int | None = Field(default=None, ge=1, description="optimizer steps to run")
    epochs: int | None = Field(
        default=None, ge=1, description="epochs to run (when --steps is not given)"
    )
    batch_size: int = Field(default=32, ge=1, description="samples per step")
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0, description="learning rate")
    weight_decay: float = Field(default=0.0, ge=0, description="weight decay")
    scheduler: Literal["none", "cosine", "step"] = "none"
    layer_lr: dict[str, float] = Field(
        default_factory=dict, description="per-layer LR multiplier by module-name prefix"
    )
    publish_every: int = Field(default=10, ge=1, description="publish tethers every K steps")
    io_budget: float = Field(
        default=0.05,
        gt=0,
        le=1,
        description="the most of the wall time publishing may take, 0 < F ≤ 1 (scheduled "
        "publishes past it are skipped, the latest snapshot wins; 1: no pause, publish on every "
        "scheduled step whatever it costs)",
    )
    tether_mode: Literal["static", "learned", "importance"] = "static"
    train: Literal["tethers", "weights", "both"] = Field(
        default="both",
        description="what the optimizer trains: tethers only over frozen weights and biases "
        "(supermask-style; needs learned tethers), the weights only (learned tethers frozen), "
        "or both",
    )
    wire_dtype: WireDType = "float32"
    log_every: int = Field(default=10, ge=1, description="metrics line every K steps")
    eval_every: int = Field(default=100, ge=1, description="validation + checkpoint every K steps")
    diagnostics: str | None = Field(
        default=None,
        description="weight diagnostics into the worker folder and to the coordinator: "
        "every=epoch|N[,budget=F]; None: off",
    )

    @field_validator("task_args")
    @classmethod
    def _task_arg_names(cls, value: dict[str, TaskArg]) -> dict[str, TaskArg]:
        reserved = {"seed", "worker"} & set(value)
        if reserved:
            raise ValueError(f"task_args cannot set {sorted(reserved)}: the worker passes them")
        bad = [k for k in value if not k.isidentifier()]
        if bad:
            raise ValueError(f"task_args names must be identifiers, got {bad}")
        return value

    @field_validator("diagnostics")
    @classmethod
    def _diagnostics_spec(cls, value: str | None) -> str | None:
        if value is not None:
            from tetherfed.diagnostics._recorder import parse_spec  # noqa: PLC0415 (torch, only when set)

            parse_spec(value)
        return value

    @model_validator(mode="after")
    def _trainable(self) -> WorkerOptions:
        if self.train == "tethers" and self.tether_mode != "learned":
            raise ValueError(
                f"train='tethers' needs tether_mode='learned' (a {self.tether_mode} tether "
                "has no parameters): nothing would train"
            )
        return self


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    """`int | None` → int; a Literal stays as it is."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def at_least_one(text: str) -> int:
    """argparse type: an integer ≥ 1 (a count of workers, of CPUs)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _layer_lr(item: str) -> tuple[str, float]:
    prefix, _, factor = item.partition("=")
    try:
        return prefix, float(factor)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layer-lr expects PREFIX=FACTOR, got {item!r}"
        ) from None


def _task_arg(item: str) -> tuple[str, TaskArg]:
    """`KEY=VALUE` with VALUE an int, else a float, else the string."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--task-arg expects KEY=VALUE, got {item!r}")
    for kind in (int, float):
        try:
            return key, kind(text)
        except ValueError:
            pass
    return key, text


def _shard(value: str) -> ShardSpec:
    """`size=N[,scheme=S]` (or just `N`) as a ShardSpec."""
    fields: dict[str, str] = {}
    for part in value.split(","):
        key, sep, text = part.partition("=")
        if not sep:
            key, text = "size", key
        fields[key.strip()] = text.strip()
    try:
        return ShardSpec.model_validate(fields)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--shard {value!r}: {error}") from None


def _diagnostics(value: str) -> str:
    try:
        WorkerOptions(diagnostics=value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def _add_option(parser: argparse.ArgumentParser, name: str, info: FieldInfo) -> None:
    kind = _diagnostics if name == "diagnostics" else _base_type(info.annotation)
    default = info.get_default(call_default_factory=True)
    help_text = info.description or name.replace("_", " ")
    if name == "layer_lr":
        parser.add_argument(
            _flag(name),
            action="append",
            type=_layer_lr,
            default=[],
            metavar="PREFIX=FACTOR",
            help=help_text,
        )
    elif name == "task_args":
        parser.add_argument(
            "--task-arg",
            dest=name,
            action="append",
            type=_task_arg,
            default=[],
            metavar="KEY=VALUE",
            help=help_text + "; VALUE reads as int, else float, else string (repeat the flag)",
        )
    elif name == "shard":
        parser.add_argument(
            _flag(name), type=_shard, default=None, metavar="size=N[,scheme=S]", help=help_text
        )
    elif typing.get_origin(kind) is Literal:
        parser.add_argument(
            _flag(name), choices=list(typing.get_args(kind)), default=default, help=help_text
        )
    else:
        parser.add_argument(_flag(name), type=kind, default=default, help=help_text)


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    """Add one option per `WorkerOptions` field (`layer_lr` as repeated `--layer-lr P=F`,
    `task_args` as repeated `--task-arg K=V`)."""
    for name, info in WorkerOptions.model_fields.items():
        _add_option(parser, name, info)


def options_from_args(args: argparse.Namespace) -> WorkerOptions:
    """The `WorkerOptions` of a namespace parsed with `add_worker_args`."""
    values = {name: getattr(args, name) for name in WorkerOptions.model_fields}
    values["layer_lr"] = dict(values["layer_lr"] or [])
    values["task_args"] = dict(values["task_args"] or [])
    return WorkerOptions(**values)


def options_argv(options: WorkerOptions) -> list[str]:
    """`options` as `tetherfed worker` arguments (only the values that differ from the default)."""
    argv: list[str] = []
    defaults = WorkerOptions()
    for name in WorkerOptions.model_fields:
        value = getattr(options, name)
        if value is None or value == getattr(defaults, name):
            continue
        if name == "layer_lr":
            argv += [a for prefix, f in value.items() for a in ("--layer-lr", f"{prefix}={f}")]
        elif name == "task_args":
            argv += [a for key, v in value.items() for a in ("--task-arg", f"{key}={v}")]
        else:
            argv += [_flag(name), str(value)]
    return argv


def parse_options(argv: Sequence[str]) -> WorkerOptions:
    """Parse worker options from argv (the inverse of `options_argv`; for tests and tools)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_worker_args(parser)
    return options_from_args(parser.parse_args(list(argv)))
