"""Flavors: the named sizes VMs are made with. Everyone reads them; admins make them."""

from __future__ import annotations

from fastapi import APIRouter, Response
from pydantic import Field

from nubes.api.context import CallerDep, ContextDep
from nubes.api.params import DEFAULT_PAGE, CursorQuery, LimitQuery
from nubes.api.records import Records
from nubes.errors import Conflict
from nubes.model.common import NAME_PATTERN, Model, now
from nubes.model.project import FlavorRecord
from nubes.model.vm import MAX_MEMORY_MB, MAX_VCPUS
from nubes.store.keys import Kind

router = APIRouter(tags=["flavors"])


class FlavorCreate(Model):
    name: str = Field(pattern=NAME_PATTERN)
    vcpus: int = Field(ge=1, le=MAX_VCPUS)
    memory_mb: int = Field(ge=32, le=MAX_MEMORY_MB)
    disk_gb: int = Field(default=0, ge=0, le=16 * 1024)


class FlavorPage(Model):
    items: list[FlavorRecord]
    next: str | None = None


@router.post("/flavors", status_code=201)
async def create_flavor(body: FlavorCreate, ctx: ContextDep, caller: CallerDep) -> FlavorRecord:
    """Make a flavor (admin)."""
    caller.require_admin("make flavors")
    record = FlavorRecord(**body.model_dump(), created_at=now())
    await Records(ctx.store).create(caller, Kind.FLAVOR, body.name, record)
    return record


@router.get("/flavors")
async def list_flavors(
    ctx: ContextDep,
    caller: CallerDep,
    limit: LimitQuery = DEFAULT_PAGE,
    cursor: CursorQuery = None,
) -> FlavorPage:
    """The flavors, by name."""
    items, following = await Records(ctx.store).page(
        Kind.FLAVOR, FlavorRecord, caller, limit=limit, cursor=cursor
    )
    return FlavorPage(items=[record for record, _ in items], next=following)


@router.get("/flavors/{name}")
async def get_flavor(name: str, ctx: ContextDep, caller: CallerDep) -> FlavorRecord:
    """One flavor."""
    _, record = await Records(ctx.store).get(Kind.FLAVOR, FlavorRecord, caller, name)
    return record


@router.delete("/flavors/{name}", status_code=204)
async def delete_flavor(name: str, ctx: ContextDep, caller: CallerDep) -> Response:
    """Delete a flavor (admin). VMs made with it keep their size."""
    caller.require_admin("delete flavors")
    records = Records(ctx.store)
    kv, _ = await records.get(Kind.FLAVOR, FlavorRecord, caller, name)
    if await records.remove(caller, kv) is None:
        raise Conflict(f"flavor {name} changed while it was being deleted", hint="try again")
    return Response(status_code=204)
