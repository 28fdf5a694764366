"""Decisions: query, Server-Sent Events stream, worker long-poll, acks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse

from tether_protocol.messages import AckCreate, AckPublic, Action, Decision, DecisionsPublic

from ..store import Store
from .deps import ActingWorker, ReaderAuth, SettingsDep, StoreDep, WorkerOrAdminAuth

router = APIRouter(prefix="/v1/federations/{fed}", tags=["decisions"])

After = Annotated[int, Query(ge=0, description="Only decisions with a larger id.")]
Limit = Annotated[int, Query(ge=1, le=10_000)]


def page(data: list[Decision], after: int) -> DecisionsPublic:
    """A page of decisions with its cursor."""
    return DecisionsPublic(data=data, count=len(data), last_id=data[-1].id if data else after)


@router.get("/decisions", dependencies=[ReaderAuth])
async def list_decisions(
    fed: str, store: StoreDep, worker: str | None = None, layer: str | None = None,
    action: Action | None = None, after: After = 0, limit: Limit = 100,
) -> DecisionsPublic:  # fmt: skip
    """Decisions in id order, filtered by worker, layer and action."""
    await store.policy(fed)
    data = await store.decisions(fed, after, limit, worker_id=worker, layer=layer, action=action)
    return page(data, after)


def sse_event(decision: Decision) -> bytes:
    """One SSE event carrying a decision."""
    return f"id: {decision.id}\nevent: decision\ndata: {decision.model_dump_json()}\n\n".encode()


async def _events(
    request: Request, store: Store, fed: str, after: int, keepalive_s: float
) -> AsyncIterator[bytes]:
    key = store.keys.decisions(fed)
    last = after
    yield b": connected\n\n"
    while not await request.is_disconnected():
        got = await store.blocking.xread(
            {key: f"{last}-0"}, count=100, block=int(keepalive_s * 1000)
        )
        if not got:
            yield b": keep-alive\n\n"
            continue
        for _, fields in got[0][1]:
            decision = Decision.model_validate_json(fields["d"])
            last = decision.id
            yield sse_event(decision)


@router.get(
    "/decisions/stream",
    dependencies=[ReaderAuth],
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "decision events"}},
)
async def stream_decisions(
    fed: str, request: Request, store: StoreDep, settings: SettingsDep, after: After = 0,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:  # fmt: skip
    """Server-Sent Events of new decisions (`id:` is the decision id); resumes after
    `Last-Event-ID` (or `?after=`); `: keep-alive` comments while idle."""
    await store.policy(fed)
    if last_event_id:
        if not last_event_id.strip().isdigit():
            raise HTTPException(400, "Last-Event-ID must be a decision id")
        after = int(last_event_id)
    events = _events(request, store, fed, after, settings.sse_keepalive_s)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


@router.get("/workers/{wid}/decisions", dependencies=[WorkerOrAdminAuth])
async def worker_decisions(
    fed: str, wid: str, store: StoreDep, settings: SettingsDep, after: After = 0,
    wait: Annotated[float, Query(ge=0)] = 0.0, limit: Limit = 100,
) -> DecisionsPublic:  # fmt: skip
    """Merge/drift decisions for this worker after `after`; waits up to `wait` s (long poll,
    capped by the server) when there are none yet."""
    await store.worker_record(fed, wid)
    wait_s = min(wait, settings.long_poll_max_s)
    data = await store.worker_decisions(fed, wid, after, limit, wait_s)
    return page(data, after)


@router.post("/decisions/{decision_id}/ack", responses={200: {"model": AckPublic}})
async def ack(
    fed: str, decision_id: int, body: AckCreate, store: StoreDep, owner: ActingWorker,
    response: Response,
) -> AckPublic:  # fmt: skip
    """Ack a decision as applied or rejected: 201 first time, 200 for the same ack again, 409 for
    a different one; 403 when the decision is addressed to another worker."""
    decision = await store.decision(fed, decision_id)
    if owner is not None and owner != decision.worker_id:
        raise HTTPException(
            403,
            f"decision {decision_id} is addressed to worker {decision.worker_id!r}, not {owner!r}",
        )
    if decision.action == "hold":
        raise HTTPException(409, f"decision {decision_id} is a hold; there is nothing to ack")
    result, created = await store.ack(fed, decision, body)
    response.status_code = 201 if created else 200
    return result


@router.get("/decisions/{decision_id}/ack", dependencies=[ReaderAuth])
async def get_ack(fed: str, decision_id: int, store: StoreDep) -> AckPublic:
    """The ack of a decision (404 until acked)."""
    await store.decision(fed, decision_id)
    found = await store.acked(fed, decision_id)
    if found is None:
        raise HTTPException(404, f"decision {decision_id} has not been acked")
    return found
