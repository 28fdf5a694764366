"""Telemetry REST: bounded series per worker, metric and layer, real app and Redis."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from coord_helpers import worker_body

from tetherfed_coordinator.app import create_app
from tetherfed_coordinator.settings import Settings

pytestmark = pytest.mark.anyio
F = "/v1/federations"


def point(metric: str, layer: str, step: int, value: Any) -> dict[str, Any]:
    return {"metric": metric, "layer": layer, "step": step, "epoch": step // 10, "value": value}


async def registered(c: httpx.AsyncClient) -> str:
    assert (await c.post(F, json={"name": "f"})).status_code == 201
    return str((await c.post(f"{F}/f/workers", json=worker_body("a"))).json()["worker_id"])


async def test_series_are_listed_and_read_after_a_step(app_client: httpx.AsyncClient) -> None:
    c = app_client
    wid = await registered(c)
    points = [point("effective_rank", "fc1", s, 3.0 - s / 100) for s in (10, 20, 30)]
    points += [
        point("weight_histogram", "all", 10, [1, 2, 3]),
        point("jacobian_radius", "model", 10, None),
    ]

    r = await c.post(f"{F}/f/workers/{wid}/telemetry", json={"data": points})
    listing = (await c.get(f"{F}/f/workers/{wid}/telemetry")).json()
    series = (
        await c.get(f"{F}/f/workers/{wid}/telemetry?metric=effective_rank&layer=fc1&after=10")
    ).json()
    single = (await c.get(f"{F}/f/workers/{wid}/telemetry?metric=weight_histogram")).json()

    assert r.status_code == 204, r.text
    assert {(m["metric"], m["layer"], m["count"], m["last_step"]) for m in listing["data"]} == {
        ("effective_rank", "fc1", 3, 30),
        ("weight_histogram", "all", 1, 10),
        ("jacobian_radius", "model", 1, 10),
    }
    assert [p["step"] for p in series["data"]] == [20, 30] and series["last_step"] == 30
    assert [p["value"] for p in series["data"]] == [2.8, 2.7]
    assert single["layer"] == "all" and single["data"][0]["value"] == [1, 2, 3]


async def test_bad_queries_are_4xx_naming_the_problem(app_client: httpx.AsyncClient) -> None:
    c = app_client
    wid = await registered(c)
    points = [point("gzip_ratio", name, 1, 0.9) for name in ("fc1", "fc2")]
    await c.post(f"{F}/f/workers/{wid}/telemetry", json={"data": points})
    url = f"{F}/f/workers/{wid}/telemetry"

    unknown_metric = await c.get(f"{url}?metric=loss_landscape")
    absent_metric = await c.get(f"{url}?metric=effective_rank")
    unknown_layer = await c.get(f"{url}?metric=gzip_ratio&layer=fc9")
    ambiguous = await c.get(f"{url}?metric=gzip_ratio")
    unknown_worker = await c.get(f"{F}/f/workers/nobody/telemetry")
    too_big = await c.post(url, json={"data": [point("update_fft", "fc1", 1, [0.0] * 5000)]})
    bad_name = await c.post(url, json={"data": [point("rank", "fc1", 1, 1.0)]})

    assert unknown_metric.status_code == 422
    assert absent_metric.status_code == 404 and "gzip_ratio" in absent_metric.json()["detail"]
    assert unknown_layer.status_code == 404 and "fc1" in unknown_layer.json()["detail"]
    assert ambiguous.status_code == 422 and "layer" in ambiguous.json()["detail"]
    assert unknown_worker.status_code == 404
    assert too_big.status_code == 422 and bad_name.status_code == 422
    listing = (await c.get(url)).json()
    assert listing["count"] == 2, "a refused POST stores nothing"


async def test_series_are_bounded_and_a_retried_post_is_kept_once(
    coordinator_settings: Settings,
) -> None:
    app = create_app(coordinator_settings.model_copy(update={"telemetry_maxlen": 5}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://c") as c:
            wid = await registered(c)
            url = f"{F}/f/workers/{wid}/telemetry"
            body = {"data": [point("gzip_ratio", "all", s, s / 10) for s in range(1, 9)]}
            await c.post(url, json=body)
            await c.post(url, json=body)

            got = (await c.get(f"{url}?metric=gzip_ratio")).json()

    assert [p["step"] for p in got["data"]] == [4, 5, 6, 7, 8]


@pytest.mark.parametrize(
    "layer",
    ["<root>", "schicht.gewichte.ü", "blocks.0.attn.in_proj_weight", "x" * 256, "a/b:{c}"],
)
async def test_every_layer_name_the_layer_table_takes_has_telemetry(
    app_client: httpx.AsyncClient, layer: str
) -> None:
    """A model's diagnostics were silently dropped when its layer names were fine for the layer
    table but not for telemetry (a tethered root, non-ASCII, longer than 128 characters)."""
    c = app_client
    wid = await registered(c)

    r = await c.post(
        f"{F}/f/workers/{wid}/telemetry", json={"data": [point("gzip_ratio", layer, 1, 0.5)]}
    )
    served = await c.get(
        f"{F}/f/workers/{wid}/telemetry", params={"metric": "gzip_ratio", "layer": layer}
    )

    assert r.status_code == 204, r.text
    assert served.status_code == 200, served.text
    assert [p["value"] for p in served.json()["data"]] == [0.5]


async def test_a_layer_name_with_nul_is_refused_everywhere(app_client: httpx.AsyncClient) -> None:
    c = app_client
    wid = await registered(c)
    r = await c.post(
        f"{F}/f/workers/{wid}/telemetry", json={"data": [point("gzip_ratio", "a\x00b", 1, 0.5)]}
    )
    assert r.status_code == 422 and "layer" in r.text
