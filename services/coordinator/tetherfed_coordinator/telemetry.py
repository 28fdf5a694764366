"""Telemetry in Redis: bounded series of diagnostics points per worker, metric and layer.

A point is stored as its JSON in a sorted set scored by step (`Keys.telemetry`), trimmed to the
newest `telemetry_maxlen`; the worker's index hash names every series and its last step. A point
sent twice (a retried POST) is the same member, so it is kept once.
"""

from __future__ import annotations

from collections.abc import Sequence

from tether_protocol.telemetry import (
    Metric,
    TelemetryMetric,
    TelemetryMetrics,
    TelemetryPoint,
    TelemetrySeries,
)

from . import replies
from .errors import Invalid, NotFound
from .replies import Fields
from .store import FIELD_SEP, Store

MAX_READ = 10_000  # points one GET returns at most (the series is trimmed shorter by default)


async def add(store: Store, fed: str, wid: str, points: Sequence[TelemetryPoint]) -> None:
    """Append points to their series and trim each; one round trip."""
    keys, keep = store.keys, store.settings.telemetry_maxlen
    last: dict[tuple[str, str], int] = {}
    async with store.r.pipeline(transaction=False) as pipe:
        for point in points:
            key = keys.telemetry(fed, wid, point.metric, point.layer)
            pipe.zadd(key, {point.model_dump_json(): point.step})
            series = (point.metric, point.layer)
            last[series] = max(last.get(series, point.step), point.step)
        for metric, layer in last:
            pipe.zremrangebyrank(keys.telemetry(fed, wid, metric, layer), 0, -keep - 1)
        mapping: Fields = {f"{m}{FIELD_SEP}{layer}": step for (m, layer), step in last.items()}
        pipe.hset(keys.telemetry_index(fed, wid), mapping=mapping)
        await pipe.execute()


async def listing(store: Store, fed: str, wid: str) -> TelemetryMetrics:
    """Every series of the worker: metric, layer, points kept, last step (sorted by name)."""
    index = replies.record(await store.r.hgetall(store.keys.telemetry_index(fed, wid)))
    names = sorted(_series_of(field) for field in index)
    async with store.r.pipeline(transaction=False) as pipe:
        for metric, layer in names:
            pipe.zcard(store.keys.telemetry(fed, wid, metric, layer))
        counts = await pipe.execute()
    # The stored metric names are a `Metric`'s (`add` wrote them); the model checks them again.
    data = [
        TelemetryMetric.model_validate(
            {
                "metric": m,
                "layer": layer,
                "count": n,
                "last_step": int(index[f"{m}{FIELD_SEP}{layer}"]),
            }
        )
        for (m, layer), n in zip(names, counts, strict=True)
    ]
    return TelemetryMetrics(data=data, count=len(data))


def _series_of(field: str) -> tuple[str, str]:
    """(metric, layer) of a field of the worker's index hash."""
    metric, layer = field.split(FIELD_SEP, 1)
    return metric, layer


async def series(
    store: Store, fed: str, wid: str, metric: Metric, layer: str | None, after: int | None
) -> TelemetrySeries:
    """Points of one series with step > `after`, oldest first. NotFound naming the series the
    worker has when the metric or layer has none; Invalid when the layer is needed but missing."""
    index = [
        _series_of(f)
        for f in replies.texts(await store.r.hkeys(store.keys.telemetry_index(fed, wid)))
    ]
    layers = sorted(layer for m, layer in index if m == metric)
    if not layers:
        have = sorted({m for m, _ in index})
        raise NotFound(f"worker {wid!r} has no {metric!r} telemetry; it has {have}")
    if layer is None:
        if len(layers) > 1:
            raise Invalid(f"{metric!r} has several layers, pass layer= one of {layers}")
        layer = layers[0]
    if layer not in layers:
        raise NotFound(
            f"worker {wid!r} has no {metric!r} telemetry for layer {layer!r}; layers: {layers}"
        )
    low = f"({after}" if after is not None else "-inf"
    key = store.keys.telemetry(fed, wid, metric, layer)
    raw = replies.texts(await store.r.zrangebyscore(key, low, "+inf", start=0, num=MAX_READ))
    data = [TelemetryPoint.model_validate_json(item) for item in raw]
    last = data[-1].step if data else after
    return TelemetrySeries(metric=metric, layer=layer, data=data, count=len(data), last_step=last)
