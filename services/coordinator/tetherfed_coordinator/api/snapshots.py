"""Several layers of one snapshot in one frame: what a worker fetches to apply a round."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response

from tether_protocol.frame import encode_frame, tensor_view

from ..store import Snapshot
from .deps import ReaderAuth, StoreDep
from .tethers import SAFETENSORS, Version, pinned_layer_of

router = APIRouter(prefix="/v1/federations/{fed}/workers/{wid}", tags=["tethers"])

# Layers one request may name (a frame's layer table is bounded by the registration's).
MAX_LAYERS = 4096
Layers = Annotated[
    list[str],
    Query(
        alias="layer",
        min_length=1,
        max_length=MAX_LAYERS,
        description="A layer to include; repeat for several (`?layer=fc1&layer=fc2`).",
    ),
]


@router.get("/snapshot", dependencies=[ReaderAuth], responses=SAFETENSORS, response_model=None)
async def snapshot_layers(
    fed: str, wid: str, store: StoreDep, layer: Layers, version: Version = None
) -> Response:
    """The named layers of one snapshot as one safetensors frame: each layer's tether, then the
    parts published with it (as `GET …/tethers/{layer}` serves one layer), in the order named,
    each once. `?version=v`: snapshot v exactly, the latest or, once superseded, the layers an
    unacked decision names (else 410 saying why); without it, the latest snapshot, every layer
    from the same one. 404 for a layer the worker does not have. `X-Tether-Version` names the
    version served."""
    await store.worker_record(fed, wid)  # 404 for an unknown worker, before its snapshot
    tensors: dict[str, Any] = {}
    meta, dtype = None, None
    for name in dict.fromkeys(layer):
        snap = await store.snapshot_layer(fed, wid, name)
        if version is None:
            version = snap.version
        elif version != snap.version:
            snap = await pinned_layer_of(store, fed, wid, version, name, snap.version)
        tensors.update(_layer_tensors(snap, wid, name))
        meta, dtype = meta or snap.meta, dtype or snap.entries[name].dtype
    body = encode_frame(
        tensors,
        meta=meta,
        dtype=dtype or "float32",
        extra_metadata={"tetherfed.version": str(version)},
    )
    return Response(
        body, media_type="application/octet-stream", headers={"X-Tether-Version": str(version)}
    )


def _layer_tensors(snap: Snapshot, wid: str, layer: str) -> dict[str, Any]:
    entry = snap.entries.get(layer)
    if entry is None:
        raise HTTPException(404, f"worker {wid!r} has no layer {layer!r}")
    parts = {name: tensor_view(snap.buf, e) for name, e in snap.parts.get(layer, {}).items()}
    return {layer: tensor_view(snap.buf, entry), **parts}
