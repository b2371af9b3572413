"""Hosts (admins only): what each agent reports, whether it is alive, what the scheduler
has bound to it; admins set the labels VMs' `host_labels` select on.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import Field

from nubes.api.context import Caller, CallerDep, ContextDep
from nubes.api.params import DEFAULT_PAGE, CursorQuery, LimitQuery
from nubes.api.records import Guards, Records
from nubes.api.vmops import Labels
from nubes.errors import InvalidInput
from nubes.model.common import Model
from nubes.model.host import HostLiveness, HostRecord, HostStatus
from nubes.scheduler.binding import read_allocations
from nubes.store.base import Store
from nubes.store.keys import Kind, host_alive_key, host_allocations_key, status_key

router = APIRouter(tags=["hosts"])

HostName = Annotated[str, Path(min_length=1, max_length=128, description="host name")]


class HostAllocated(Model):
    """What the scheduler has bound to the host (the sizes of its VMs)."""

    vcpus: int
    memory_mb: int
    disk_gb: int


class HostView(HostRecord):
    alive: bool = False
    state: HostLiveness = Field(
        default=HostLiveness.UP, description="down: its heartbeat expired (host monitor)"
    )
    state_since: datetime | None = None
    state_reason: str | None = None
    allocated: HostAllocated
    vms: int = 0


class HostPage(Model):
    items: list[HostView]
    next: str | None = None


class HostUpdate(Model):
    labels: Labels


async def _view(store: Store, record: HostRecord) -> HostView:
    alive = await store.get(host_alive_key(record.name)) is not None
    status_kv = await store.get(status_key(Kind.HOST, record.name))
    status = None
    if status_kv is not None:
        with contextlib.suppress(InvalidInput):
            status = HostStatus.from_json(status_kv.value)
    # No status yet: the monitor has not seen it go down; the heartbeat says the rest.
    state = status.state if status else (HostLiveness.UP if alive else HostLiveness.DOWN)
    allocations = read_allocations(await store.get(host_allocations_key(record.name)))
    return HostView(
        **record.model_dump(),
        alive=alive,
        state=state,
        state_since=status.since if status else None,
        state_reason=status.reason if status and state is HostLiveness.DOWN else None,
        allocated=HostAllocated(
            vcpus=allocations.vcpus,
            memory_mb=allocations.memory_mb,
            disk_gb=allocations.disk_gb,
        ),
        vms=len(allocations.vms),
    )


def _admin(caller: Caller) -> None:
    caller.require_admin("see or change hosts")


@router.get("/hosts")
async def list_hosts(
    ctx: ContextDep,
    caller: CallerDep,
    limit: LimitQuery = DEFAULT_PAGE,
    cursor: CursorQuery = None,
) -> HostPage:
    """The hosts, by name, with their heartbeat and allocations (admin)."""
    _admin(caller)
    items, following = await Records(ctx.store).page(
        Kind.HOST, HostRecord, caller, limit=limit, cursor=cursor
    )
    return HostPage(items=[await _view(ctx.store, record) for record, _ in items], next=following)


@router.get("/hosts/{name}")
async def get_host(name: HostName, ctx: ContextDep, caller: CallerDep) -> HostView:
    """One host (admin)."""
    _admin(caller)
    _, record = await Records(ctx.store).get(Kind.HOST, HostRecord, caller, name)
    return await _view(ctx.store, record)


@router.patch("/hosts/{name}")
async def update_host(
    name: HostName, body: HostUpdate, ctx: ContextDep, caller: CallerDep
) -> HostView:
    """Set a host's labels (admin); they replace the old ones."""
    _admin(caller)

    async def change(record: HostRecord) -> tuple[HostRecord, Guards | None]:
        return record.model_copy(update={"labels": dict(body.labels)}), None

    record, _ = await Records(ctx.store).mutate(Kind.HOST, HostRecord, caller, name, change)
    return await _view(ctx.store, record)
