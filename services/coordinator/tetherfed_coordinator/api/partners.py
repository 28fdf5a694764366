"""The partner tethers a page of decisions names, in one frame: what a worker fetches to apply
a round."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response
from pydantic import Field

from tether_protocol.frame import MISSING_KEY, encode_frame, tensor_view
from tether_protocol.messages import MAX_PARTNER_FETCH, Decision, WireDType

from ..errors import DecisionNotFound, NotFound
from ..store import Snapshot, Store
from .decisions import MAX_ID
from .deps import StoreDep, WorkerOrAdminAuth
from .tethers import SAFETENSORS, pinned_layer_of

router = APIRouter(prefix="/v1/federations/{fed}/workers/{wid}", tags=["tethers"])

DecisionIds = Annotated[
    list[Annotated[int, Field(ge=1, le=MAX_ID)]],
    Query(
        alias="decision",
        min_length=1,
        max_length=MAX_PARTNER_FETCH,
        description="A decision id of this worker; repeat for several (`?decision=7&decision=8`).",
    ),
]


@router.get(
    "/decisions/tethers",
    dependencies=[WorkerOrAdminAuth],
    responses=SAFETENSORS,
    response_model=None,
)
async def decision_tethers(fed: str, wid: str, store: StoreDep, decision: DecisionIds) -> Response:
    """The partner tethers this worker's decisions name, in one frame: for each decision id `i`
    the tether of exactly the partner snapshot it names (`partner_snapshot.version`, kept until
    the decision is acked) under the name `"i"`, and the parts published with it as `"i@weight"`,
    `"i@bias"`, `"i@model:<path>"`; what one decision's `GET …/tethers/{layer}?version=v` would
    serve, for a whole page of decisions at once. A decision whose tether cannot be served (not
    this worker's, no partner, its snapshot no longer stored) is left out, with the reason, in
    the frame's metadata `tetherfed.missing` (a JSON object, decision id → sentence). Tethers are
    sent in their published dtype when all share one, else as float32."""
    await store.worker_record(fed, wid)  # 404 for an unknown worker
    ids = list(dict.fromkeys(decision))
    found = await store.decisions_by_id(fed, ids)
    read = [await _partner_tether(store, fed, wid, i, d) for i, d in zip(ids, found, strict=True)]
    missing: dict[str, str] = {}
    tensors: dict[str, Any] = {}
    dtypes: set[WireDType] = set()
    for i, d, got in zip(ids, found, read, strict=True):
        if isinstance(got, str):
            missing[str(i)] = got
            continue
        assert d is not None
        entries, dtype = got
        for name, value in entries.items():  # "fc1" → "7", "fc1@weight" → "7@weight"
            tensors[str(i) + name[len(d.layer) :]] = value
        dtypes.add(dtype)
    body = encode_frame(
        tensors,
        dtype=dtypes.pop() if len(dtypes) == 1 else "float32",
        extra_metadata={MISSING_KEY: json.dumps(missing)},
    )
    return Response(body, media_type="application/octet-stream")


async def _partner_tether(
    store: Store, fed: str, wid: str, decision_id: int, d: Decision | None
) -> tuple[dict[str, Any], WireDType] | str:
    """Decision `decision_id`'s partner tether and parts with the tether's dtype, or why not."""
    why = _unservable(fed, wid, decision_id, d)
    if why is not None:
        return why
    assert d is not None and d.partner_id is not None and d.partner_snapshot is not None
    try:
        snap = await store.snapshot_layer(fed, d.partner_id, d.layer)
        version = d.partner_snapshot.version
        if version != snap.version:
            snap = await pinned_layer_of(store, fed, d.partner_id, version, d.layer, snap.version)
        return _layer_tensors(snap, d.partner_id, d.layer), snap.entries[d.layer].dtype
    except (HTTPException, NotFound) as error:
        return str(error.detail)


def _unservable(fed: str, wid: str, decision_id: int, d: Decision | None) -> str | None:
    """Why decision `decision_id`'s partner tether is not served, before reading it."""
    if d is None:
        return DecisionNotFound(fed, decision_id).detail
    if d.worker_id != wid:
        return f"decision {decision_id} is addressed to worker {d.worker_id!r}, not {wid!r}"
    if d.partner_id is None or d.partner_snapshot is None or d.operator == "decouple":
        return f"decision {decision_id} names no partner tether"
    return None


def _layer_tensors(snap: Snapshot, wid: str, layer: str) -> dict[str, Any]:
    """A layer's tether and the parts published with it, as `GET …/tethers/{layer}` serves them."""
    entry = snap.entries.get(layer)
    if entry is None:
        raise HTTPException(404, f"worker {wid!r} has no layer {layer!r}")
    parts = {name: tensor_view(snap.buf, e) for name, e in snap.parts.get(layer, {}).items()}
    return {layer: tensor_view(snap.buf, entry), **parts}
