"""Pydantic models for everything that crosses the wire between workers, coordinator and users.

Every model forbids unknown fields, so a typo in a client is an error rather than a silent no-op.
Tensors never travel in these models: they travel in safetensors frames (see `frame`).
"""

from __future__ import annotations

import math
import re
import types
from datetime import UTC, datetime
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    ClassVar,
    Literal,
    Union,
    get_args,
    get_origin,
)

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

PROTOCOL_VERSION = 1

Measure = Literal["dot", "cosine", "pearson", "cka", "update_cosine"]
MergeScope = Literal["tethers", "weights", "model"]
FedAvgWithin = Literal["federation", "group"]
Action = Literal["merge", "drift", "hold"]
MergeOperator = Literal["average", "weighted"]
DriftOperator = Literal["repel", "decouple"]
Trigger = Literal["plateau", "every_publish"]
Pairing = Literal["best", "all"]
PairingBy = Literal["layer", "model"]
Relative = Literal["none", "zscore", "rank"]
WireDType = Literal["float32", "float16", "bfloat16"]
WorkerStatus = Literal["active", "lost", "left"]
Outcome = Literal["applied", "rejected"]
HoldCode = Literal[
    "warmup",
    "no_plateau",
    "schedule",
    "out_of_scope",
    "no_partner",
    "stale_partners",
    "cooldown",
    "within_thresholds",
    "merge_limit",
    "min_merge_score",
]
INCARNATION_HEADER = "X-Tether-Incarnation"
LAST_DECISION_HEADER = "X-Tether-Last-Decision"
# Acks in one `POST …/acks` (a FedAvg round of N workers × L layers gives (N − 1) × L a worker).
MAX_ACKS = 10_000
# Decision ids in one `GET …/workers/{wid}/decisions/tethers`: 500 ids of up to 19 digits keep
# the URL under 16 KB (servers refuse request lines from some tens of KB; uvicorn's did between
# 27 and 81 KB).
MAX_PARTNER_FETCH = 500

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
Name = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=_NAME_RE.pattern,
        description="Letters, digits, '_', '.', '-'; starts with a letter or digit; ≤ 128 chars.",
    ),
]

# A layer is named as the model names it (module paths, ``<root>``, any script): any text of 1 to
# 256 characters but NUL, which the coordinator uses to join a layer name with another in one key.
LayerName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=256,
        pattern=r"^[^\x00]+$",
        description="The layer's name as the model spells it: 1 to 256 characters, no NUL.",
    ),
]


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC (every timestamp on the wire is UTC)."""
    return datetime.now(UTC)


def unencodable(value: object) -> str | None:
    """The first string in `value` (a string, or lists and dicts of them, keys included) that
    UTF-8 cannot encode: a lone surrogate, which JSON may spell (`"\\ud800"`) but no
    UTF-8 text, Redis value or answer can hold. None when there is none."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode()
        except UnicodeEncodeError:
            return value
        return None
    if isinstance(value, dict):
        items: Any = (x for kv in value.items() for x in kv)
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        return None
    return next((bad for item in items if (bad := unencodable(item)) is not None), None)


def _may_hold_text(annotation: Any) -> bool:
    """Whether a field of this type can hold a `str` (nested models check their own fields;
    a Literal's strings are the model's own)."""
    if annotation is str:
        return True
    if get_origin(annotation) is Literal or isinstance(annotation, type):
        return False
    return any(_may_hold_text(arg) for arg in get_args(annotation))


def servable(value: Any) -> Any:
    """`value` with every string UTF-8 cannot encode spelled out (`\\ud800` as six
    characters), nested lists and dicts (keys included) rebuilt only where needed."""
    if isinstance(value, str):
        return (
            value
            if unencodable(value) is None
            else value.encode(errors="backslashreplace").decode()
        )
    if isinstance(value, dict):
        if unencodable(value) is None:
            return value
        return {servable(k): servable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return value if unencodable(value) is None else [servable(v) for v in value]
    return value


_TEXT_FIELDS: dict[tuple[type, str], bool] = {}
_NUMBER_FIELDS: dict[tuple[type, str], bool] = {}


def _number_only(annotation: Any) -> bool:
    """Whether a field of this type takes numbers and no boolean (int, float, optional ones,
    Annotated ones, lists of them): where JSON true/false must be refused, since pydantic's lax
    mode would read them as 1/0 while the schema says number."""
    if annotation in (int, float):
        return True
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _number_only(args[0])
    if origin is list:
        return bool(args) and _number_only(args[0])
    if origin in (Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return bool(kinds) and all(_number_only(a) for a in kinds)
    return False


def _holds_bool(value: Any) -> bool:
    return isinstance(value, bool) or (
        isinstance(value, list) and any(isinstance(v, bool) for v in value)
    )


class WireModel(BaseModel):
    """Base of every wire message: unknown fields are rejected, and so is any string that is
    not valid Unicode text (a lone surrogate), nested ones (dict keys, list items) included:
    what cannot be encoded cannot be stored or served back."""

    model_config = ConfigDict(extra="forbid", frozen=False)
    # "refuse" (requests, and what is written): a ValueError. "spell": such a string read
    # back from state stored before this check existed is served with the surrogate spelled
    # out rather than made an answer that cannot be encoded (a 500 on every later read).
    unencodable_text: ClassVar[Literal["refuse", "spell"]] = "refuse"

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """A JSON true/false where the field is a number (or a list of numbers) is refused:
        the schema says number, so a boolean is not one (pydantic's lax mode took it as 1/0)."""
        if not _holds_bool(value):
            return value
        key = (cls, info.field_name or "")
        number = _NUMBER_FIELDS.get(key)
        if number is None:
            field = cls.model_fields.get(key[1])
            number = _NUMBER_FIELDS[key] = field is not None and _number_only(field.annotation)
        if number:
            raise ValueError("must be a number, not a boolean")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _valid_text(cls, value: Any, info: ValidationInfo) -> Any:
        key = (cls, info.field_name or "")
        text = _TEXT_FIELDS.get(key)
        if text is None:
            field = cls.model_fields.get(key[1])
            text = _TEXT_FIELDS[key] = field is not None and _may_hold_text(field.annotation)
        if text and (bad := unencodable(value)) is not None:
            if cls.unencodable_text == "spell":
                return servable(value)
            spelled = bad.encode("utf-8", "backslashreplace").decode()
            raise ValueError(
                f"not valid Unicode text: '{spelled}' holds a lone surrogate, which cannot be "
                "encoded as UTF-8"
            )
        return value


class Versioned(WireModel):
    """A top-level message that carries the protocol version it was written for."""

    protocol: int = Field(
        default=PROTOCOL_VERSION,
        description="Protocol version.",
        json_schema_extra={"const": PROTOCOL_VERSION},
    )

    @field_validator("protocol")
    @classmethod
    def _supported(cls, value: int) -> int:
        if value != PROTOCOL_VERSION:
            raise ValueError(
                f"unsupported protocol version {value}; this side speaks {PROTOCOL_VERSION}"
            )
        return value


# --------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------

LayerScope = Annotated[list[str], Field(min_length=1)] | Literal["all", "middle", "last"]
NOISE_SDS = 3.0  # thresholds must sit this many estimator standard deviations away from 0


def noise_band(k: int) -> float:
    """Half-width (3/√k) of the band around 0 where a sketched cosine or pearson is noise."""
    return NOISE_SDS / math.sqrt(k)


class SketchPolicy(WireModel):
    """Score large layers on count sketches (`tether_protocol.sketch`; docs/how-to/sketches.md).

    Layers of at least `min_values` values are scored on k-value sketches hashed by `seed` (the
    same for the whole federation, so sketches compare); workers publish a sketch frame every
    time and the full tether every `full_every` publishes, which is what a partner fetches to
    apply a decision. A cosine or pearson estimate has standard deviation ≤ 1/√k, so thresholds
    inside ±3/√k are refused unless `force` is set.
    """

    min_values: int = Field(
        default=65_536, ge=1, description="Layers with at least this many values use sketches."
    )
    k: int = Field(default=1024, ge=16, le=1 << 20, description="Sketch length (buckets).")
    seed: int = Field(default=0, ge=0, lt=1 << 63, description="Hash seed shared by workers.")
    full_every: int = Field(
        default=10,
        ge=1,
        description="Workers publish their full tethers every this many publishes.",
    )
    force: bool = Field(
        default=False, strict=True, description="Accept thresholds inside the noise band."
    )


class MergeGate(WireModel):
    """Keep a merge only if it does not hurt: the worker evaluates its loss on its own probe
    batch before and after applying the merge, and rolls the merge back (acking `rejected` with
    both losses) when the loss rose by more than `probe_loss_rise` (a fraction of the loss
    before: 0.01 allows a 1 % rise)."""

    probe_loss_rise: float = Field(
        default=0.01, ge=0, description="Largest relative rise of probe loss a merge may cause."
    )


class Policy(WireModel):
    """How a federation turns compatibility scores into decisions (`tether_protocol.policy`).

    Defaults are for a normalized measure: `pearson` scores two independent U[0,1) tethers near 0
    and identical ones at 1, whatever the layer size, so one threshold fits every layer. (The raw
    `dot` of the prototype, examples/seed-prototype.toml, grows with layer size — two 64×64
    U[0,1) tethers score about 1,000 — so a fixed threshold on it passes or fails by layer size
    alone; only the `seed` preset uses it.)
    """

    measure: Measure = Field(
        default="pearson",
        description="Compatibility measure. pearson: cosine of centred tethers, in [-1, 1]; "
        "cosine: uncentred (two independent U[0,1) tethers score ≈ 0.75); dot: Σ Tᵢ⊙Tⱼ, "
        "unbounded; cka: linear CKA of the layer's outputs on the probe batch (Kornblith et al. "
        "2019), in [0, 1], blind to permutations of units; update_cosine: cosine of the updates "
        "Tᵢ − Tᵢ⁰ since each worker's first published tether (clustered FL, Sattler et al. "
        "2019), in [-1, 1], NaN for a zero update; it tells apart clusters that differ by a "
        "permutation of output units (relabelled classes), which cka scores alike.",
    )
    merge_threshold: float = Field(
        default=0.5, description="Merge when score > this (pearson 0.5: clearly shared structure)."
    )
    drift_threshold: float | None = Field(
        default=-0.5,
        description="Drift when score < this; None never drifts. Must be ≤ merge_threshold; "
        "between the two the pair holds.",
    )
    trigger: Trigger = Field(
        default="plateau",
        description="plateau: score when |Δloss| < loss_epsilon or grad-norm < grad_epsilon "
        "(the prototype); every_publish: score on every publish.",
    )
    loss_epsilon: float = Field(
        default=0.1, ge=0, description="Plateau: |lossₜ − lossₜ₋₁| below this."
    )
    grad_epsilon: float = Field(default=0.1, ge=0, description="Plateau: gradient norm below this.")
    max_merges_per_epoch: int = Field(
        default=5, ge=0, description="Merges one worker may receive per epoch (the prototype's 5)."
    )
    cooldown_steps: int = Field(
        default=10, ge=0, description="Steps a pair waits on a layer after a merge or drift."
    )
    max_staleness_steps: int | None = Field(
        default=1000,
        ge=0,
        description="A peer whose latest snapshot is this many steps behind (or ahead) is not "
        "eligible; None disables the bound.",
    )
    pairing: Pairing = Field(
        default="best",
        description="best: at most one merge per worker per round, with its most compatible "
        "eligible partner; all: merge with every eligible partner above the threshold.",
    )
    pairing_by: PairingBy = Field(
        default="layer",
        description="layer: each layer in scope picks its partners by its own scores; model: "
        "the partners are picked once a round by the mean of the layer scores over the layers "
        "in scope (NaN ones left out), and every layer in scope merges or drifts with them, so "
        "a worker's model joins one partner's as a whole, as clustered FL assigns whole models "
        "(IFCA, Ghosh et al. 2020; CFL, Sattler et al. 2019).",
    )
    layers: LayerScope = Field(
        default="all",
        description="Layers in scope: 'all', 'middle' (the middle entry of the layer table, as "
        "the prototype tethered only its hidden layer), 'last' (the last entry: the layer "
        "closest to what the model computes, where cka separates tasks), or a list of names.",
    )
    merge_operator: MergeOperator = Field(default="average", description="average or weighted.")
    merge_alpha: float = Field(
        default=0.5, gt=0, le=1, description="weighted: Tᵢ ← (1−α)Tᵢ + αTⱼ (small α: soft tether)."
    )
    drift_operator: DriftOperator = Field(
        default="decouple",
        description="decouple: no change, the pair cools down (as clustered FL does); repel: "
        "Tᵢ ← clip(Tᵢ + β(Tᵢ − Tⱼ), 0, 1).",
    )
    drift_beta: float = Field(default=0.05, gt=0, le=1, description="repel strength; keep small.")
    retain_generations: int = Field(
        default=8, ge=0, le=1024, description="Generation tensors kept per worker-layer."
    )
    warmup_steps: int = Field(
        default=0,
        ge=0,
        description="Publishes before this step start no round: the scores of barely trained "
        "models say little about their tasks.",
    )
    relative: Relative = Field(
        default="none",
        description="Thresholds on raw scores (none), or relative to the publisher's row: zscore "
        "(the score's z-score among the publisher's comparable, fresh partners; thresholds in "
        "standard deviations) or rank (1 for the best of those partners, 0 for the worst, "
        "evenly spaced; thresholds in [0, 1]).",
    )
    min_merge_score: float | None = Field(
        default=None,
        description="Under a relative rule, a merge also needs the raw score above this "
        "(None: no floor), so a row with no good partner merges with none.",
    )
    probe_seed: int = Field(
        default=0,
        ge=0,
        description="Seed of the probe batch every worker draws its inputs from (cka).",
    )
    probe_size: int = Field(
        default=64,
        ge=4,
        le=1024,
        description="Inputs in the probe batch: cka compares n × n probe Gram matrices.",
    )
    gate: MergeGate | None = Field(
        default=None,
        description="Merge gate (None: every merge is kept), e.g. {probe_loss_rise = 0.01}.",
    )
    sketch: SketchPolicy | None = Field(
        default=None,
        description="Score large layers on count sketches; None scores every "
        "layer on its full tether.",
    )
    fedavg_every: int | None = Field(
        default=None,
        ge=1,
        description="FedAvg baseline (McMahan et al. 2017): every this many steps each worker's "
        "tethers become the federation mean, whatever the scores; None: the thresholds decide.",
    )
    fedavg_within: FedAvgWithin = Field(
        default="federation",
        description="fedavg_every averages over the whole federation, or only within each "
        "worker's group (its registered meta `group`): the oracle of clustered FL, which is "
        "told the clusters (IFCA, Ghosh et al. 2020, compares against it).",
    )
    merge_scope: MergeScope = Field(
        default="tethers",
        description="What a merge or drift moves. tethers: the tether alone; weights: the "
        "tethered layer's weight and bias with its tether; model: also every untethered "
        "parameter and floating-point buffer (norms included), each carried by one tethered "
        "layer. Workers publish what the scope needs; scoring keeps its measure.",
    )
    sync_every: int | None = Field(
        default=None,
        ge=1,
        description="Synchronous rounds: every worker publishes at each multiple of this many "
        "steps and waits (at most sync_timeout_s) until that round's decisions are applied, as "
        "FedAvg's and IFCA's rounds do; None: asynchronous rounds.",
    )
    sync_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Synchronous rounds: the longest a worker waits for its peers' snapshots "
        "and its round's decisions before it trains on (logging the peers it waited for).",
    )

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> Policy:
        if self.drift_threshold is not None and self.drift_threshold > self.merge_threshold:
            raise ValueError(
                f"drift_threshold ({self.drift_threshold}) must be ≤ merge_threshold "
                f"({self.merge_threshold})"
            )
        self._thresholds_in_range()
        if isinstance(self.layers, list) and not self.layers:
            raise ValueError("layers must name at least one layer (or be 'all', 'middle', 'last')")
        self._thresholds_above_noise()
        return self

    def _thresholds_in_range(self) -> None:
        if self.min_merge_score is not None and self.relative == "none":
            raise ValueError("min_merge_score applies only with a relative rule (zscore, rank)")
        if self.relative == "zscore":
            return  # any number of standard deviations
        low, high, scale = (0.0, 1.0, "rank") if self.relative == "rank" else (-1.0, 1.0, "")
        if self.measure == "dot" and self.relative == "none":
            return
        for label, value in (("merge", self.merge_threshold), ("drift", self.drift_threshold)):
            if value is not None and not low <= value <= high:
                raise ValueError(
                    f"{label}_threshold {value} is outside [{low:g}, {high:g}], the range of "
                    f"{scale or self.measure}"
                )

    def _thresholds_above_noise(self) -> None:
        # Only raw thresholds on tether scores: relative rules threshold z-scores or ranks, and
        # cka compares probe Gram matrices, which are not sketched.
        sketch = self.sketch
        if sketch is None or sketch.force or self.measure in ("dot", "cka"):
            return
        if self.relative != "none":
            return
        band = noise_band(sketch.k)
        for label, value in (("merge", self.merge_threshold), ("drift", self.drift_threshold)):
            if value is not None and abs(value) < band:
                raise ValueError(
                    f"{label}_threshold {value} is inside the sketch noise band ±{band:.3g} "
                    f"(3/√k, k={sketch.k}): unrelated tethers would cross it by chance; use a "
                    "threshold further from 0, a larger sketch.k, or sketch.force"
                )

    def merge_params(self) -> dict[str, float]:
        """Parameters of the merge operator, as carried by a decision."""
        return {"alpha": self.merge_alpha} if self.merge_operator == "weighted" else {}

    def drift_params(self) -> dict[str, float]:
        """Parameters of the drift operator, as carried by a decision."""
        return {"beta": self.drift_beta} if self.drift_operator == "repel" else {}


def seed_policy() -> Policy:
    """The prototype the project started from (examples/seed-prototype.toml) as a policy: raw
    dot > 50, ≤ 5 merges an epoch, plateau trigger with both thresholds 0.1, the middle layer
    only, merge by averaging, never drift."""
    return Policy(
        measure="dot",
        merge_threshold=50.0,
        drift_threshold=None,
        trigger="plateau",
        loss_epsilon=0.1,
        grad_epsilon=0.1,
        max_merges_per_epoch=5,
        cooldown_steps=0,
        max_staleness_steps=None,
        pairing="best",
        layers="middle",
        merge_operator="average",
    )


def cka_policy() -> Policy:
    """Function-aware federation (the configuration measured in docs/results/does-it-work.md):
    linear CKA of the last layer on the shared probe batch, a rank rule (merge each worker with
    its closest partner only), no rounds before step 100, and the merge gate at a 1 % probe-loss
    rise."""
    return Policy(
        measure="cka",
        relative="rank",
        merge_threshold=0.9,
        drift_threshold=None,
        pairing="best",
        layers="last",
        trigger="every_publish",
        warmup_steps=100,
        cooldown_steps=10,
        max_merges_per_epoch=1000,
        # 200, not 50: at 30–50 steps/s a decision reaches its worker 50–80 steps after the
        # snapshot it was made from, and 50 rejected 71 of 85 merges as stale
        # (docs/results/does-it-work.md), before the gate could judge them.
        max_staleness_steps=200,
        probe_size=64,
        gate=MergeGate(probe_loss_rise=0.01),
    )


def clustered_policy() -> Policy:
    """Clustered FL on updates (Sattler, Müller & Samek 2019, "Clustered Federated Learning"):
    the cosine of each worker's tether update since its first publish (`update_cosine`) on
    every layer (clusters of rotated inputs differ first in the first layer, relabelled ones
    in the last), partners picked on the mean over the layers (`pairing_by = "model"`), with
    the `cka` preset's rank rule, warm-up, staleness bound and merge gate.
    For workers from one shared init, whose clusters may differ by a relabelling of outputs
    that cka (blind to permutations of units) cannot see; `cka` suits independent inits."""
    return Policy(
        measure="update_cosine",
        relative="rank",
        merge_threshold=0.9,
        drift_threshold=None,
        pairing="best",
        pairing_by="model",
        layers="all",
        trigger="every_publish",
        warmup_steps=100,
        cooldown_steps=10,
        max_merges_per_epoch=1000,
        max_staleness_steps=200,  # as the cka preset, for the same reason
        gate=MergeGate(probe_loss_rise=0.01),
    )


PRESETS: dict[str, Any] = {
    "default": Policy,
    "seed": seed_policy,
    "cka": cka_policy,
    "clustered": clustered_policy,
}


def policy_preset(name: str) -> Policy:
    """A named policy preset: 'default', 'seed', 'cka' or 'clustered'. Raises KeyError naming
    the known presets."""
    try:
        return PRESETS[name]()  # type: ignore[no-any-return]
    except KeyError:
        raise KeyError(f"unknown policy preset {name!r}; known: {', '.join(PRESETS)}") from None


class _PolicyPatchBase(WireModel):
    """What `PolicyPatch` adds to its fields (which are derived from `Policy`'s below)."""

    def apply(self, policy: Policy) -> Policy:
        """The patched policy; raises pydantic.ValidationError if the result is invalid."""
        # null for a field the policy cannot hold null in means unchanged, as the schema
        # (every patch field nullable) says; drift_threshold: null still means never drift.
        given = {
            name: value
            for name, value in self.model_dump(exclude_unset=True).items()
            if value is not None or type(None) in get_args(Policy.model_fields[name].annotation)
        }
        return Policy.model_validate(policy.model_dump() | given)


def _optional(field: FieldInfo) -> tuple[Any, Any]:
    """A `Policy` field as a patch field: the same type, constraints and validators for a value
    that is given, None (unchanged) by default, the same description."""
    given: Any = (
        Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    )
    return given | None, Field(default=None, description=field.description)


# Built from `Policy.model_fields`, so a field added to `Policy` can be patched at once. Type
# checkers see a class declaration instead: create_model's result is a value, not a type.
if TYPE_CHECKING:

    class PolicyPatch(_PolicyPatchBase):
        """A partial policy update (PATCH): the given fields change, then the whole is
        validated. Every field of `Policy`, optional."""

else:
    PolicyPatch = create_model(
        "PolicyPatch",
        __base__=_PolicyPatchBase,
        __module__=__name__,
        __doc__="A partial policy update (PATCH): the given fields change, then the whole is "
        "validated.",
        **{name: _optional(field) for name, field in Policy.model_fields.items()},
    )


# --------------------------------------------------------------------------------------------
# Federations
# --------------------------------------------------------------------------------------------


class FederationCreate(Versioned):
    """Create a federation; `policy` is a full policy or a preset name."""

    name: Name
    policy: Policy | Literal["default", "seed", "cka", "clustered"] = "default"

    def resolved_policy(self) -> Policy:
        """The policy object, with a preset name expanded."""
        return policy_preset(self.policy) if isinstance(self.policy, str) else self.policy


class FederationPublic(WireModel):
    """A federation as REST shows it."""

    name: str
    policy: Policy
    created_at: datetime
    workers: int = Field(description="Registered workers (any status).")
    decisions: int = Field(description="Decisions issued so far (the last decision id).")
    incarnation: str = Field(
        description="Id made when the federation was created: a federation deleted and "
        "created again (or lost by Redis and created again) has a new one."
    )


class FederationsPublic(WireModel):
    data: list[FederationPublic]
    count: int


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------


class LayerSpec(WireModel):
    """One tethered layer: its name, the tether's shape, and the wire dtype it publishes."""

    name: LayerName
    shape: list[Annotated[int, Field(ge=1)]] = Field(min_length=1, max_length=8)
    dtype: WireDType = "float32"

    @property
    def numel(self) -> int:
        """Number of values in the tether."""
        n = 1
        for d in self.shape:
            n *= d
        return n


class WorkerCreate(Versioned):
    """Register a worker with its layer table."""

    name: Name
    layers: list[LayerSpec] = Field(
        min_length=1,
        max_length=4096,
        description="The worker's tethered layers. Each `name` appears once: a table naming "
        "a layer twice is refused with a 422 that names it (JSON Schema's uniqueItems compares "
        "whole items, so the document cannot state uniqueness of one key).",
    )
    meta: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

    @field_validator("layers")
    @classmethod
    def _unique_layers(cls, layers: list[LayerSpec]) -> list[LayerSpec]:
        seen: set[str] = set()
        for layer in layers:
            if layer.name in seen:
                raise ValueError(f"layer {layer.name!r} appears twice in the layer table")
            seen.add(layer.name)
        return layers


class WorkerRegistered(WireModel):
    """The answer to a registration: the worker's id and its own bearer token."""

    worker_id: str
    token: str
    federation: str
    policy: Policy
    incarnation: str = Field(description="The federation's incarnation the worker joined.")


class Heartbeat(Versioned):
    """A worker's liveness signal with its latest training progress."""

    step: int = Field(ge=0)
    epoch: int = Field(ge=0)
    loss: float | None = None
    grad_norm: float | None = None
    session: str | None = Field(
        default=None,
        max_length=64,
        description="Id of the worker process: while one session heartbeats, another under the "
        "same worker id is refused (409), so two processes never share an identity.",
    )
    ending: bool = Field(
        default=False, description="The process stops: release its session (a clean exit)."
    )


class Hold(WireModel):
    """Why a worker's latest scoring round decided nothing for it to apply (between the
    thresholds, or no eligible partner, the worker holds: `tether_protocol.policy`). One per
    worker, replaced by each round: never a stream of its own, never something to apply or ack.

    `code` is machine-readable: `warmup` (step < policy.warmup_steps), `no_plateau` (the
    plateau trigger did not fire), `schedule` (fedavg: no multiple of fedavg_every crossed),
    `out_of_scope` (no layer of the worker is in policy.layers), `no_partner` (no other worker
    has a comparable snapshot of the layer), `stale_partners` (every comparable partner is more
    than max_staleness_steps away), `cooldown` (every fresh partner is cooling down),
    `within_thresholds` (the best score sits between the thresholds), `merge_limit` (merge
    budget of the epoch spent), `min_merge_score` (relative rule: best raw score under the
    floor)."""

    code: HoldCode
    reason: str = Field(description="The same for a person, with the numbers.")
    layer: str | None = Field(default=None, description="The layer the reason is about.")
    step: int = Field(ge=0, description="The worker's step in the scored snapshot.")
    version: int = Field(ge=0, description="The scored snapshot's version.")
    at: datetime


class WorkerPublic(WireModel):
    """A worker as REST shows it."""

    unencodable_text: ClassVar[Literal["refuse", "spell"]] = "spell"

    worker_id: str
    name: str
    federation: str
    status: WorkerStatus
    layers: list[LayerSpec]
    meta: dict[str, str | int | float | bool | None]
    step: int | None = None
    epoch: int | None = None
    loss: float | None = None
    generation: int = Field(default=0, description="Decisions applied so far (sum over layers).")
    snapshot_version: int = Field(default=0, description="Publishes accepted so far.")
    registered_at: datetime
    last_seen: datetime | None = None
    hold: Hold | None = Field(
        default=None,
        description="Why the worker's latest scoring round gave it nothing to apply (None: it "
        "has not been scored yet, or its latest round decided a merge or drift).",
    )


class WorkersPublic(WireModel):
    data: list[WorkerPublic]
    count: int


# --------------------------------------------------------------------------------------------
# Snapshots and tethers
# --------------------------------------------------------------------------------------------


class SnapshotMeta(Versioned):
    """What a publish says about the training state it was taken at (in the frame's metadata)."""

    worker_id: str
    step: int = Field(ge=0)
    epoch: int = Field(ge=0)
    loss: float | None = None
    grad_norm: float | None = None
    plateau: bool = Field(default=False, description="The worker saw the plateau trigger fire.")
    wire_dtype: WireDType = "float32"
    generations: dict[str, int] = Field(
        default_factory=dict, description="Generation of each layer's tether in this snapshot."
    )

    @field_validator("loss", "grad_norm")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class SnapshotRef(WireModel):
    """Points at one published snapshot of one worker (the partner's tether a decision uses)."""

    worker_id: str
    version: int = Field(ge=1)
    step: int = Field(ge=0)


class PublishAccepted(WireModel):
    """202 answer to a publish: the snapshot's version (monotonic per worker)."""

    worker_id: str
    version: int
    step: int
    layers: int
    bytes: int


class SketchAccepted(PublishAccepted):
    """202 answer to a sketch publish; `full_requested`: a decision needs this worker's
    current tether, publish it in full next."""

    full_requested: bool = False


class TetherStats(WireModel):
    """Summary statistics of one tether (JSON; raw values come as safetensors)."""

    layer: str
    shape: list[int]
    dtype: WireDType
    version: int
    generation: int
    step: int
    mean: float
    std: float
    min: float
    max: float
    histogram: list[int] = Field(description="32 equal bins over [min, max].")
    bin_edges: list[float]


class TethersPublic(WireModel):
    worker_id: str
    version: int
    step: int
    data: list[TetherStats]
    count: int


class GenerationRecord(WireModel):
    """One generation of a worker-layer tether and where it came from."""

    generation: int
    parents: list[SnapshotRef | None] = Field(
        description="Own previous snapshot, then the partner snapshot the decision used."
    )
    decision_id: int | None
    action: Action | None
    created_at: datetime
    retained: bool = Field(description="Whether the tensor of this generation is still stored.")


class GenerationsPublic(WireModel):
    worker_id: str
    layer: str
    data: list[GenerationRecord]
    count: int


# --------------------------------------------------------------------------------------------
# Compatibility
# --------------------------------------------------------------------------------------------


class CompatibilityPublic(WireModel):
    """All-pairs compatibility of a federation on one layer; null where not comparable."""

    layer: str
    measure: Measure
    workers: list[str]
    matrix: list[list[float | None]]
    versions: dict[str, int]
    computed_at: datetime


class CompatibilitiesPublic(WireModel):
    data: list[CompatibilityPublic]
    count: int


# --------------------------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------------------------


class Decision(Versioned):
    """A decision about one worker's tether on one layer, relative to one partner.

    The worker named by `worker_id` applies it (the partner's own tether is changed only by the
    partner's own decisions). `id` is monotonic over the federation.
    """

    id: int = Field(ge=1)
    federation: str
    layer: str
    worker_id: str
    partner_id: str | None
    action: Action
    score: float | None
    measure: Measure
    merge_threshold: float
    drift_threshold: float | None
    operator: MergeOperator | DriftOperator | None
    params: dict[str, float] = Field(default_factory=dict)
    partner_snapshot: SnapshotRef | None
    own_snapshot: SnapshotRef
    epoch: int
    reason: str
    created_at: datetime = Field(default_factory=utcnow)


class DecisionsPublic(WireModel):
    data: list[Decision]
    count: int
    last_id: int = Field(description="Highest decision id in this page (or the `after` cursor).")
    hold: Hold | None = Field(
        default=None,
        description="A worker's own long-poll only: why its latest scoring round gave it "
        "nothing to apply (see Hold); None on federation-wide pages.",
    )


class AckCreate(Versioned):
    """A worker's acknowledgement that it applied (or refused) a decision: `applied` needs the
    new `generation`, `rejected` a non-empty `reason` (both stated in the JSON Schema too)."""

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {
                    "if": {"properties": {"outcome": {"const": "applied"}}},
                    "then": {
                        "required": ["generation"],
                        "properties": {"generation": {"type": "integer", "minimum": 0}},
                    },
                },
                {
                    "if": {"properties": {"outcome": {"const": "rejected"}}},
                    "then": {
                        "required": ["reason"],
                        "properties": {"reason": {"type": "string", "minLength": 1}},
                    },
                },
            ]
        }
    )

    outcome: Outcome
    generation: int | None = Field(default=None, ge=0)
    reason: str | None = Field(default=None, max_length=1024)
    probe_loss_before: float | None = Field(
        default=None, description="Merge gate: probe loss before the merge was applied."
    )
    probe_loss_after: float | None = Field(
        default=None, description="Merge gate: probe loss with the merge applied."
    )

    @model_validator(mode="after")
    def _reason_for_rejection(self) -> AckCreate:
        if self.outcome == "rejected" and not self.reason:
            raise ValueError("a rejected ack needs a reason")
        if self.outcome == "applied" and self.generation is None:
            raise ValueError("an applied ack needs the new generation")
        return self


class AckPublic(WireModel):
    decision_id: int
    worker_id: str
    outcome: Outcome
    generation: int | None
    reason: str | None
    probe_loss_before: float | None = None
    probe_loss_after: float | None = None
    acked_at: datetime


class AckItem(AckCreate):
    """One ack of a batch (`POST …/acks`): an AckCreate and the decision it acknowledges."""

    decision_id: int = Field(ge=1, le=2**63 - 1, description="The decision acknowledged.")


class AcksCreate(Versioned):
    """Several acks in one request, recorded in order, each as `POST …/decisions/{id}/ack`
    records it: a worker acks every decision of a round in one round trip."""

    data: list[AckItem] = Field(min_length=1, max_length=MAX_ACKS)


class AckResult(WireModel):
    """What one ack of a batch came to: `status` is what `POST …/decisions/{id}/ack` would have
    answered (201 recorded, 200 the same ack again, 403/404/409 refused with `detail`)."""

    decision_id: int
    status: int
    ack: AckPublic | None = None
    detail: str | None = None


class AcksPublic(WireModel):
    data: list[AckResult]
    count: int


class ErrorBody(WireModel):
    """Every 4xx/5xx body: a stable, human-readable `detail`."""

    detail: str | list[dict[str, Any]]
