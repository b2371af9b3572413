"""Ports: a VM's plugs into a subnet, with the addresses IPAM gave them and their
security groups. Made here or with a VM (`nubes.api.netops.prepare_port`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import ConfigDict, Field

from nubes.api.context import CallerDep, ContextDep
from nubes.api.netops import (
    ResourceInUse,
    association_claim_key,
    create_port,
    find_groups,
    find_network,
    merge_guards,
    raced,
    release_port_guards,
    takes_reference,
)
from nubes.api.openapi_links import link, links
from nubes.api.params import CursorQuery, LimitQuery
from nubes.api.records import DEFAULT_PAGE, Guards, Records, name_guard
from nubes.errors import Conflict
from nubes.model.common import NAME_PATTERN, Model
from nubes.model.network import PortRecord, PortStatus, SubnetRecord
from nubes.store.base import Compare
from nubes.store.keys import Kind, name_key

router = APIRouter(tags=["ports"])

ATTEMPTS = 16


class PortCreate(Model):
    network: str = Field(min_length=1, max_length=128, description="a VPC, by id or name")
    subnet: str | None = Field(
        default=None, min_length=1, max_length=128, description="default: the oldest subnet"
    )
    fixed_ip: str | None = Field(
        default=None, max_length=64, description="an IPv4 of the subnet; default: a free one"
    )
    security_groups: list[str] | None = Field(
        default=None, max_length=16, description="ids or names; default: the project's `default`"
    )
    port_security: bool = True
    name: str | None = Field(default=None, pattern=NAME_PATTERN)

    # Named after what the networks' and security groups' examples make.
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"network": "example-net"},
                {"network": "example-net", "subnet": "example-subnet", "name": "example-port"},
                {
                    "network": "example-net",
                    "subnet": "example-subnet",
                    "fixed_ip": "10.20.0.50",
                    "security_groups": ["example-sg"],
                },
                {"network": "example-net-2", "port_security": False},
            ]
        }
    )


class PortUpdate(Model):
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    security_groups: list[str] | None = Field(default=None, max_length=16)
    port_security: bool | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"security_groups": ["example-sg", "default"]},
                {"name": "example-port-renamed", "port_security": True},
            ]
        }
    )


class PortView(PortRecord):
    status: PortStatus | None = None


class PortPage(Model):
    items: list[PortView]
    next: str | None = None


async def _view(records: Records, record: PortRecord) -> PortView:
    status = await records.status(Kind.PORT, PortStatus, record.id)
    return PortView(**record.model_dump(), status=status)


@router.post(
    "/ports",
    status_code=201,
    responses=links(
        201,
        vm=link("POST /vms", "make a VM on the port", body={"ports": ["$response.body#/id"]}),
        floating_ip=link(
            "POST /floating-ips",
            "take a floating IP for the port",
            body={"port": "$response.body#/id"},
        ),
    ),
)
async def create_port_route(body: PortCreate, ctx: ContextDep, caller: CallerDep) -> PortView:
    """Make a port on a VPC's subnet, with the next free address or `fixed_ip`."""
    record = await create_port(ctx.store, caller, **body.model_dump())
    return PortView(**record.model_dump())


@router.get("/ports")
async def list_ports(
    ctx: ContextDep,
    caller: CallerDep,
    limit: LimitQuery = DEFAULT_PAGE,
    cursor: CursorQuery = None,
    name: Annotated[str | None, Query(max_length=64)] = None,
    network: Annotated[str | None, Query(max_length=128, description="id or name")] = None,
    subnet: Annotated[str | None, Query(max_length=128, description="id or name")] = None,
    vm: Annotated[str | None, Query(max_length=128, description="VM id")] = None,
) -> PortPage:
    """The project's ports, by id."""
    records = Records(ctx.store)
    network_id = None if network is None else (await find_network(ctx.store, caller, network))[1].id
    subnet_id = None
    if subnet is not None:
        subnet_id = (await records.find(Kind.SUBNET, SubnetRecord, caller, subnet))[1].id

    def keep(record: PortRecord) -> bool:
        spec = record.spec
        return (
            (name is None or spec.name == name)
            and (network_id is None or spec.network == network_id)
            and (subnet_id is None or spec.subnet == subnet_id)
            and (vm is None or spec.vm == vm)
        )

    items, following = await records.page(
        Kind.PORT,
        PortRecord,
        caller,
        limit=limit,
        cursor=cursor,
        keep=keep,
        status_model=PortStatus,
    )
    views = [PortView(**record.model_dump(), status=status) for record, status in items]
    return PortPage(items=views, next=following)


@router.get("/ports/{port_id}")
async def get_port(port_id: str, ctx: ContextDep, caller: CallerDep) -> PortView:
    """One port, with what its host sees."""
    records = Records(ctx.store)
    _, record = await records.get(Kind.PORT, PortRecord, caller, port_id)
    return await _view(records, record)


@router.patch("/ports/{port_id}")
async def update_port(
    port_id: str, body: PortUpdate, ctx: ContextDep, caller: CallerDep
) -> PortView:
    """Rename a port, or change its security groups or port security (a running VM gets
    the change at its next start)."""
    store = ctx.store
    records = Records(store)
    for _ in range(ATTEMPTS):
        kv, record = await records.get(Kind.PORT, PortRecord, caller, port_id)
        spec = record.spec
        guards = Guards()
        if body.name is not None and body.name != spec.name:
            guards.names = name_guard(Kind.PORT, record.project, body.name, record.id)
            if spec.name is not None:
                guards.released_names = [name_key(Kind.PORT, record.project, spec.name)]
            spec = spec.model_copy(update={"name": body.name})
        if body.security_groups is not None:
            groups = await find_groups(store, caller, body.security_groups)
            added = [(kv, g) for kv, g in groups if g.id not in spec.security_groups]
            guards = merge_guards(
                guards, *(takes_reference(kv, group.id, record.id) for kv, group in added)
            )
            spec = spec.model_copy(update={"security_groups": [g.id for _, g in groups]})
        if body.port_security is not None:
            spec = spec.model_copy(update={"port_security": body.port_security})
        updated = record.model_copy(update={"spec": spec})
        if not await raced(store, guards, records.replace(caller, kv, updated, guards)):
            return await _view(records, updated)
    raise Conflict(f"port {port_id} kept changing", hint="try again")


@router.delete("/ports/{port_id}", status_code=204)
async def delete_port(port_id: str, ctx: ContextDep, caller: CallerDep) -> Response:
    """Delete a port no VM uses and no floating IP points at; its addresses become free."""
    store = ctx.store
    records = Records(store)
    for _ in range(ATTEMPTS):
        kv, record = await records.get(Kind.PORT, PortRecord, caller, port_id)
        if record.spec.vm is not None:
            raise ResourceInUse(
                f"port {port_id} is plugged into VM {record.spec.vm}",
                hint="detach it from the VM, or delete the VM",
            )
        associations = [association_claim_key(record.id, str(a)) for a in record.spec.ipv4]
        for key in associations:
            holder = await store.get(key)
            if holder is not None:
                raise ResourceInUse(
                    f"floating IP {holder.value} points at port {port_id}",
                    hint=f"disassociate floating IP {holder.value} first",
                )
        guards = release_port_guards(record)
        guards.compares.extend(Compare.absent(key) for key in associations)
        if await records.remove(caller, kv, guards) is not None:
            return Response(status_code=204)
    raise Conflict(f"port {port_id} kept changing while it was deleted", hint="try again")
