"""Workers: register, heartbeat, leave, list, read."""

from __future__ import annotations

from fastapi import APIRouter, Response

from tether_protocol.messages import (
    INCARNATION_HEADER,
    Heartbeat,
    WorkerCreate,
    WorkerPublic,
    WorkerRegistered,
    WorkersPublic,
)

from ..errors import WorkerLeft
from .deps import AdminAuth, ReaderAuth, StoreDep, WorkerAuth, WorkerOrAdminAuth

router = APIRouter(prefix="/v1/federations/{fed}/workers", tags=["workers"])


@router.post("", status_code=201, dependencies=[AdminAuth])
async def register_worker(fed: str, body: WorkerCreate, store: StoreDep) -> WorkerRegistered:
    """Register a worker with its layer table; returns its id and its own token (shown once).
    422 naming the layer when the federation's `merge_scope` is weights or model and the table
    differs (a layer missing, or another shape) from an active worker's."""
    return await store.register(fed, body)


@router.get("", dependencies=[ReaderAuth])
async def list_workers(fed: str, store: StoreDep) -> WorkersPublic:
    """Every worker with status active | lost | left."""
    data = await store.workers(fed)
    return WorkersPublic(data=data, count=len(data))


@router.get("/{wid}", dependencies=[ReaderAuth])
async def get_worker(fed: str, wid: str, store: StoreDep, response: Response) -> WorkerPublic:
    """One worker (with `hold`: why its latest scoring round gave it nothing to apply)."""
    worker = await store.worker_public(fed, wid)
    made = await store.worker_incarnation(fed, wid)
    response.headers.update(incarnation_header({"incarnation": made}))
    return worker


@router.post("/{wid}/heartbeat", status_code=204, dependencies=[WorkerAuth])
async def heartbeat(fed: str, wid: str, body: Heartbeat, store: StoreDep) -> Response:
    """Renew liveness and record progress; 409 after the worker left, or while another process
    (`session`) runs under this worker id."""
    record = await store.heartbeat(
        fed, wid, body.step, body.epoch, body.loss, body.grad_norm, body.session, body.ending
    )
    return Response(status_code=204, headers=incarnation_header(record))


@router.delete("/{wid}", status_code=204, dependencies=[WorkerOrAdminAuth])
async def leave(fed: str, wid: str, store: StoreDep) -> Response:
    """The worker leaves: it stops being scored; its records stay readable."""
    await store.leave(fed, wid)
    return Response(status_code=204)


@router.post("/{wid}/rejoin", dependencies=[WorkerAuth])
async def rejoin(fed: str, wid: str, store: StoreDep) -> WorkerPublic:
    """A worker that left (or was lost) comes back under the same id, e.g. resumed from a
    checkpoint: it publishes and is scored again. Needs the worker's own token."""
    return await store.rejoin(fed, wid)


def incarnation_header(record: dict[str, str]) -> dict[str, str]:
    """`X-Tether-Incarnation`: the federation incarnation the worker record belongs to, on every
    worker-facing answer, so a worker notices a federation created anew under its feet (none
    for records written before incarnations)."""
    made = record.get("incarnation")
    return {INCARNATION_HEADER: made} if made else {}


def ensure_member(record: dict[str, str], fed: str, wid: str) -> None:
    """409 when the worker has left (it may no longer publish)."""
    if record.get("status") == "left":
        raise WorkerLeft(fed, wid)
