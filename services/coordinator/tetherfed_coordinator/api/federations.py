"""Federations: create, list, read, patch the policy, delete."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response
from pydantic import ValidationError

from tether_protocol.messages import (
    FederationCreate,
    FederationPublic,
    FederationsPublic,
    Policy,
    PolicyPatch,
)

from .deps import AdminAuth, ReadAllAuth, ReaderAuth, StoreDep

router = APIRouter(prefix="/v1/federations", tags=["federations"])


@router.post("", status_code=201, dependencies=[AdminAuth])
async def create_federation(body: FederationCreate, store: StoreDep) -> FederationPublic:
    """Create a federation with a policy (object or preset name); 409 if the name exists."""
    return await store.create_federation(body.name, body.resolved_policy())


@router.get("", dependencies=[ReadAllAuth])
async def list_federations(store: StoreDep) -> FederationsPublic:
    """Every federation (admin or read-only token)."""
    data = await store.federations()
    return FederationsPublic(data=data, count=len(data))


@router.get("/{fed}", dependencies=[ReaderAuth])
async def get_federation(fed: str, store: StoreDep) -> FederationPublic:
    """One federation."""
    return await store.federation(fed)


@router.patch("/{fed}/policy", dependencies=[AdminAuth])
async def patch_policy(fed: str, body: PolicyPatch, store: StoreDep) -> Policy:
    """Change some policy fields; the result is validated as a whole (422 naming the problem)."""
    current = await store.policy(fed)
    try:
        policy = body.apply(current)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "policy"
        raise HTTPException(422, f"invalid policy: {where}: {err['msg']}") from None
    await store.set_policy(fed, policy)
    return policy


@router.delete("/{fed}", status_code=204, dependencies=[AdminAuth])
async def delete_federation(fed: str, store: StoreDep) -> Response:
    """Delete the federation and all its state."""
    await store.delete_federation(fed)
    return Response(status_code=204)
