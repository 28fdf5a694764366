"""Telemetry on the wire: the weight diagnostics a worker reports (docs/how-to/diagnostics.md).

A worker posts batches of points (`TelemetryCreate`); the coordinator keeps a bounded series per
worker, metric and layer and serves it (`TelemetrySeries`) and the list of what it has
(`TelemetryMetrics`). Values are small: a number, or a short list (a histogram, a max-pooled
spectrum, rows of tracked weights); the full arrays stay in the worker's `diagnostics.safetensors`.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, field_validator

from .messages import LayerName, WireModel

Metric = Literal[
    "effective_rank",
    "singular_values",
    "gzip_ratio",
    "weight_histogram",
    "delta_corr_by_distance",
    "update_fft",
    "update_wavelet",
    "persistent_peaks",
    "jacobian_radius",
    "tracked_weights",
]
METRICS: tuple[str, ...] = get_args(Metric)
MAX_VALUES = 4096  # numbers in one point's value, nested lists counted flat
MAX_POINTS = 512  # points in one POST

Value = float | None | list[float | None] | list[list[float | None]]


def _count(value: Value) -> int:
    if not isinstance(value, list):
        return 1
    return sum(len(v) if isinstance(v, list) else 1 for v in value)


class TelemetryPoint(WireModel):
    """One value of one metric for one layer at one step.

    `layer`: a layer name, ``all`` (every layer together) or ``model`` (the whole network).
    `value`: a number (null for NaN), or a list of at most 4,096 numbers (a list of rows counts
    all of their numbers)."""

    metric: Metric
    layer: LayerName
    step: int = Field(ge=0)
    epoch: int = Field(ge=0)
    value: Value

    @field_validator("value")
    @classmethod
    def _small(cls, value: Value) -> Value:
        if _count(value) > MAX_VALUES:
            raise ValueError(f"a telemetry value holds at most {MAX_VALUES} numbers")
        return value


class TelemetryCreate(WireModel):
    """A batch of points a worker posts (at most 512)."""

    data: list[TelemetryPoint] = Field(min_length=1, max_length=MAX_POINTS)


class TelemetrySeries(WireModel):
    """Points of one worker's metric and layer with step > `after`, oldest first."""

    metric: Metric
    layer: str
    data: list[TelemetryPoint]
    count: int
    last_step: int | None = Field(description="Step of the last point returned (the next `after`).")


class TelemetryMetric(WireModel):
    """One series a worker has: its metric and layer, how many points are kept, the last step."""

    metric: Metric
    layer: str
    count: int
    last_step: int


class TelemetryMetrics(WireModel):
    """Every series of one worker."""

    data: list[TelemetryMetric]
    count: int
