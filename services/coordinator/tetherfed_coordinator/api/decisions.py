"""Decisions: query, Server-Sent Events stream, worker long-poll, acks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import APIRouter, Header, HTTPException, Path, Query, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from tether_protocol.messages import (
    LAST_DECISION_HEADER,
    AckCreate,
    AckItem,
    AckPublic,
    AckResult,
    AcksCreate,
    AcksPublic,
    Action,
    Decision,
    DecisionsPublic,
)
from tether_protocol.stream import KEEPALIVE_HEADER

from .. import replies
from ..edges import status_of
from ..errors import CoordinatorError, DecisionNotFound
from ..store import Store, hold_of
from .deps import ActingWorker, ReaderAuth, SettingsDep, StoreDep, WorkerOrAdminAuth
from .workers import incarnation_header

router = APIRouter(prefix="/v1/federations/{fed}", tags=["decisions"])

# Decision ids are Redis stream ids and counters: 64-bit. Larger ones are a 422, not a 500.
MAX_ID = 2**63 - 1
After = Annotated[int, Query(ge=0, le=MAX_ID, description="Only decisions with a larger id.")]
DecisionId = Annotated[int, Path(ge=1, le=MAX_ID, description="A decision id.")]
Limit = Annotated[int, Query(ge=1, le=10_000)]
# The stream's resume point: the schema states it (a decision id), so a header that is not one
# (`Last-Event-ID: null`) is refused by the same rule the document shows, with a 422.
LastEventId = Annotated[
    int | None,
    Header(
        ge=0,
        le=MAX_ID,
        description="Resume after this decision id (the `id:` of the last event received); "
        "a decimal integer, as `after`.",
    ),
]


def page(data: list[Decision], after: int) -> DecisionsPublic:
    """A page of decisions with its cursor."""
    return DecisionsPublic(data=data, count=len(data), last_id=data[-1].id if data else after)


@router.get("/decisions", dependencies=[ReaderAuth])
async def list_decisions(
    fed: str,
    store: StoreDep,
    worker: str | None = None,
    layer: str | None = None,
    action: Action | None = None,
    after: After = 0,
    limit: Limit = 100,
) -> DecisionsPublic:
    """Decisions in id order, filtered by worker, layer and action."""
    await store.policy(fed)
    data = await store.decisions(fed, after, limit, worker_id=worker, layer=layer, action=action)
    return page(data, after)


def sse_event(decision: Decision) -> ServerSentEvent:
    """One SSE event carrying a decision (`id:` is the decision id)."""
    return ServerSentEvent(decision.model_dump_json(), event="decision", id=str(decision.id))


async def _events(
    store: Store, fed: str, after: int, keepalive_s: float
) -> AsyncIterator[ServerSentEvent]:
    key = store.keys.decisions(fed)
    last = after
    yield ServerSentEvent(comment="connected")
    while True:
        try:
            rows = replies.read_entries(
                await store.blocking.xread(
                    {key: f"{last}-0"}, count=100, block=int(keepalive_s * 1000)
                )
            )
        except (aioredis.TimeoutError, aioredis.ResponseError):
            rows = []  # Redis unblocks a read on a deleted stream with an error: check below
        for _, fields in rows:
            decision = Decision.model_validate_json(fields["d"])
            last = decision.id
            yield sse_event(decision)
        if not rows:
            if not await store.r.exists(store.keys.federation(fed)):
                # The federation went away: end the stream with a last event, not a cut chunk.
                yield ServerSentEvent(f"federation {fed!r} was deleted", event="end")
                return
            yield ServerSentEvent(comment="keep-alive")


@router.get(
    "/decisions/stream",
    dependencies=[ReaderAuth],
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "decision events",
            "headers": {
                KEEPALIVE_HEADER: {
                    "description": "Seconds between keep-alive comments of an idle stream.",
                    "schema": {"type": "string"},
                }
            },
        }
    },
)
async def stream_decisions(
    fed: str,
    store: StoreDep,
    settings: SettingsDep,
    after: After = 0,
    last_event_id: LastEventId = None,
) -> EventSourceResponse:
    """Server-Sent Events of new decisions (`event: decision`, `id:` the decision id); resumes
    after `Last-Event-ID` (or `?after=`); `: keep-alive` comments while idle, every
    `X-Tether-Keepalive` seconds (the `sse_keepalive_s` setting: a client's idle bound follows
    it, `tether_protocol.stream`); a last `event: end` when the federation is deleted."""
    await store.policy(fed)
    if last_event_id is not None:
        after = last_event_id
    keepalive_s = settings.sse_keepalive_s
    events = _events(store, fed, after, keepalive_s)
    headers = {
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
        KEEPALIVE_HEADER: f"{keepalive_s:g}",
    }
    # sse-starlette's own ping comment keeps the same period (its default is a fixed 15 s), so
    # the stated period holds whichever of the two speaks.
    return EventSourceResponse(events, headers=headers, ping=keepalive_s)


@router.get("/workers/{wid}/decisions", dependencies=[WorkerOrAdminAuth])
async def worker_decisions(
    fed: str,
    wid: str,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
    after: After = 0,
    wait: Annotated[float, Query(ge=0)] = 0.0,
    limit: Limit = 100,
) -> DecisionsPublic:
    """Merge/drift decisions for this worker after `after`; waits up to `wait` s (long poll,
    capped by the server) when there are none yet. `hold`: why the worker's latest scoring
    round gave it nothing to apply. `X-Tether-Last-Decision`: the federation's last decision id
    when the poll began (below `after`: decisions the worker saw were lost)."""
    record, last = await store.poll_context(fed, wid)
    response.headers.update(incarnation_header(record) | {LAST_DECISION_HEADER: str(last)})
    wait_s = min(wait, settings.long_poll_max_s)
    data = await store.worker_decisions(fed, wid, after, limit, wait_s)
    return page(data, after).model_copy(update={"hold": hold_of(record)})


@router.post("/decisions/{decision_id}/ack", responses={200: {"model": AckPublic}})
async def ack(
    fed: str,
    decision_id: DecisionId,
    body: AckCreate,
    store: StoreDep,
    owner: ActingWorker,
    response: Response,
) -> AckPublic:
    """Ack a decision as applied or rejected: 201 first time, 200 for the same ack again, 409 for
    a different one; 403 when the decision is addressed to another worker."""
    result, created = await _record_ack(store, fed, decision_id, body, owner)
    response.status_code = 201 if created else 200
    return result


@router.post("/acks")
async def ack_many(fed: str, body: AcksCreate, store: StoreDep, owner: ActingWorker) -> AcksPublic:
    """Several acks in one request, recorded in order: each item's `status` is what
    `POST …/decisions/{id}/ack` would answer for it (201, 200, or 403/404/409 with `detail`), so
    one refused ack does not refuse the others. Redis failing midway is a 503 for the whole
    request; sending the batch again is safe (the same ack again is a 200)."""
    decisions = await store.decisions_by_id(fed, [item.decision_id for item in body.data])
    results: list[AckResult | None] = []
    todo: list[tuple[int, Decision, AckItem]] = []
    for item, decision in zip(body.data, decisions, strict=True):
        refused = _refusal(fed, item.decision_id, decision, owner)
        if refused is not None:
            status, detail = refused
            results.append(AckResult(decision_id=item.decision_id, status=status, detail=detail))
            continue
        assert decision is not None
        todo.append((len(results), decision, item))
        results.append(None)
    recorded = await store.record_acks(fed, [(d, item) for _, d, item in todo])
    for (at, decision, _), outcome in zip(todo, recorded, strict=True):
        if isinstance(outcome, CoordinatorError):
            results[at] = AckResult(
                decision_id=decision.id, status=status_of(outcome), detail=outcome.detail
            )
        else:
            ack, created = outcome
            results[at] = AckResult(
                decision_id=decision.id, status=201 if created else 200, ack=ack
            )
    data = [r for r in results if r is not None]
    return AcksPublic(data=data, count=len(data))


def _refusal(
    fed: str, decision_id: int, decision: Decision | None, owner: str | None
) -> tuple[int, str] | None:
    """Why an ack of this decision is refused before anything is recorded, as (status, detail)."""
    if decision is None:
        error = DecisionNotFound(fed, decision_id)
        return status_of(error), error.detail
    if owner is not None and owner != decision.worker_id:
        return 403, (
            f"decision {decision_id} is addressed to worker {decision.worker_id!r}, not {owner!r}"
        )
    if decision.action == "hold":
        return 409, f"decision {decision_id} is a hold; there is nothing to ack"
    return None


async def _record_ack(
    store: Store, fed: str, decision_id: int, body: AckCreate, owner: str | None
) -> tuple[AckPublic, bool]:
    decision = await store.decision(fed, decision_id)
    refused = _refusal(fed, decision_id, decision, owner)
    if refused is not None:
        raise HTTPException(*refused)
    return await store.ack(fed, decision, body)


@router.get("/decisions/{decision_id}/ack", dependencies=[ReaderAuth])
async def get_ack(fed: str, decision_id: DecisionId, store: StoreDep) -> AckPublic:
    """The ack of a decision (404 until acked)."""
    await store.decision(fed, decision_id)
    found = await store.acked(fed, decision_id)
    if found is None:
        raise HTTPException(404, f"decision {decision_id} has not been acked")
    return found
