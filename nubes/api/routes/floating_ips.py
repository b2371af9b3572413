"""Floating IPs: addresses of an external network a project holds and points at one of its
ports, reached from outside through the port's VPC's external gateway."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import ConfigDict, Field

from nubes.api.context import Caller, CallerDep, ContextDep
from nubes.api.netops import (
    RACE_ATTEMPTS,
    AddressInUse,
    address_claim_key,
    association_claim_key,
    find_external,
    free_external_address,
    merge_guards,
    raced,
    references_key,
    takes_reference,
)
from nubes.api.openapi_links import link, links
from nubes.api.params import CursorQuery, LimitQuery
from nubes.api.records import DEFAULT_PAGE, Guards, Records, not_found
from nubes.errors import Conflict, InvalidInput
from nubes.ids import IdKind, new_id
from nubes.model.common import Model, now
from nubes.model.network import (
    FloatingIpRecord,
    FloatingIpSpec,
    FloatingIpStatus,
    NetworkRecord,
    PortRecord,
)
from nubes.model.project import Usage
from nubes.store.base import Compare, Put, Store
from nubes.store.keys import Kind, resource_key

router = APIRouter(tags=["floating-ips"])

REF = Field(min_length=1, max_length=128)


class NoExternalGateway(Conflict):
    """The port's VPC has no way out on the floating IP's external network."""

    code = "no_external_gateway"


class FloatingIpCreate(Model):
    network: str = Field(min_length=1, max_length=128, description="an external network")
    address: str | None = Field(default=None, max_length=64, description="default: a free one")
    port: str | None = Field(default=None, min_length=1, max_length=128, description="associate")
    fixed_ip: str | None = Field(default=None, max_length=64, description="which IPv4 of the port")

    # Named after what the networks' and ports' examples make.
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"network": "example-ext"},
                {"network": "example-ext", "address": "198.18.0.100"},
                {"network": "example-ext", "port": "example-port-2"},
            ]
        }
    )


class FloatingIpAssociate(Model):
    port: str = REF
    fixed_ip: str | None = Field(default=None, max_length=64, description="default: its first")

    model_config = ConfigDict(json_schema_extra={"examples": [{"port": "example-port-2"}]})


class FloatingIpView(FloatingIpRecord):
    status: FloatingIpStatus | None = None


class FloatingIpPage(Model):
    items: list[FloatingIpView]
    next: str | None = None


def association_of(spec: FloatingIpSpec) -> str | None:
    """The claim key a floating IP holds on its port's fixed IP, if associated."""
    if spec.port is None or spec.fixed_ip is None:
        return None
    return association_claim_key(spec.port, spec.fixed_ip)


async def _association(
    store: Store,
    caller: Caller,
    fip_id: str,
    external: NetworkRecord,
    port_ref: str,
    fixed_ip: str | None,
) -> tuple[str, str, Guards]:
    """The port id and fixed IP the floating IP will point at, and the guards of that.

    Raises:
        NotFound: no such port in the project. InvalidInput: the fixed IP is not the port's.
        NoExternalGateway: the port's VPC has no gateway on the external network.
        AddressInUse: another floating IP points at that fixed IP.
    """
    port_kv, port = await Records(store).find(Kind.PORT, PortRecord, caller, port_ref)
    vpc_kv = await store.get(resource_key(Kind.NETWORK, port.spec.network))
    if vpc_kv is None:
        raise not_found(Kind.NETWORK, port.spec.network)
    vpc = NetworkRecord.from_json(vpc_kv.value)
    if vpc.spec.gateway is None or vpc.spec.gateway.network != external.id:
        raise NoExternalGateway(
            f"port {port.id} is in network {vpc.spec.name}, which has no external gateway "
            f"on external network {external.spec.name}",
            hint=f"set the network's external gateway first: PATCH /v1/networks/{vpc.id} "
            f'with {{"external_gateway": "{external.spec.name}"}}',
        )
    addresses = [str(address) for address in port.spec.ipv4]
    if not addresses:
        raise InvalidInput(
            f"port {port.id} has no IPv4 address to forward to",
            hint="use a port on a subnet with IPAM manual or automatic",
        )
    chosen = addresses[0] if fixed_ip is None else fixed_ip
    if chosen not in addresses:
        raise InvalidInput(
            f"{fixed_ip} is not an IPv4 address of port {port.id} ({', '.join(addresses)})",
            hint="leave fixed_ip out to use the port's first address",
        )
    key = association_claim_key(port.id, chosen)
    holder = await store.get(key)
    if holder is not None and holder.value != fip_id:
        raise AddressInUse(
            f"floating IP {holder.value} already points at {chosen} of port {port.id}",
            hint="disassociate that one first",
        )
    guards = Guards(
        claims={} if holder is not None else {key: fip_id},
        compares=[
            Compare.unchanged(vpc_kv),
            Compare.create_revision(port_kv.key, "==", port_kv.create_revision),
        ],
        operations=[Put(references_key(vpc.id), fip_id)],
    )
    return port.id, chosen, guards


async def _view(records: Records, record: FloatingIpRecord) -> FloatingIpView:
    status = await records.status(Kind.FLOATING_IP, FloatingIpStatus, record.id)
    return FloatingIpView(**record.model_dump(), status=status)


@router.post(
    "/floating-ips",
    status_code=201,
    responses=links(
        201,
        associate=link(
            "POST /floating-ips/{fip_id}/associate",
            "forward the floating IP to a port",
            parameters={"fip_id": "$response.body#/id"},
        ),
        disassociate=link(
            "POST /floating-ips/{fip_id}/disassociate",
            "stop forwarding the floating IP",
            parameters={"fip_id": "$response.body#/id"},
        ),
    ),
)
async def create_floating_ip(
    body: FloatingIpCreate, ctx: ContextDep, caller: CallerDep
) -> FloatingIpView:
    """Take an address of an external network (counts against the `floating_ips` quota)."""
    store = ctx.store
    if body.port is None and body.fixed_ip is not None:
        raise InvalidInput("fixed_ip needs a port", hint="give the port too, or leave both out")
    for _ in range(RACE_ATTEMPTS):
        external_kv, external = await find_external(store, caller, body.network)
        address = str(await free_external_address(store, external, body.address))
        fip_id = new_id(IdKind.FLOATING_IP)
        guards = merge_guards(
            Guards(
                claims={address_claim_key(external.id, address): fip_id},
                usage=Usage(floating_ips=1),
            ),
            takes_reference(external_kv, external.id, fip_id),
        )
        spec = FloatingIpSpec(network=external.id, address=address)
        if body.port is not None:
            port_id, fixed_ip, associated = await _association(
                store, caller, fip_id, external, body.port, body.fixed_ip
            )
            spec = spec.model_copy(update={"port": port_id, "fixed_ip": fixed_ip})
            guards = merge_guards(guards, associated)
        record = FloatingIpRecord(id=fip_id, project=caller.project, spec=spec, created_at=now())
        written = Records(store).create(caller, Kind.FLOATING_IP, fip_id, record, guards)
        if not await raced(store, guards, written):
            return FloatingIpView(**record.model_dump())
    raise Conflict("the external network kept changing", hint="try again")


@router.get("/floating-ips")
async def list_floating_ips(
    ctx: ContextDep,
    caller: CallerDep,
    limit: LimitQuery = DEFAULT_PAGE,
    cursor: CursorQuery = None,
    port: Annotated[str | None, Query(max_length=128, description="port id")] = None,
    address: Annotated[str | None, Query(max_length=64)] = None,
) -> FloatingIpPage:
    """The project's floating IPs, by id."""

    def keep(record: FloatingIpRecord) -> bool:
        return (port is None or record.spec.port == port) and (
            address is None or record.spec.address == address
        )

    items, following = await Records(ctx.store).page(
        Kind.FLOATING_IP,
        FloatingIpRecord,
        caller,
        limit=limit,
        cursor=cursor,
        keep=keep,
        status_model=FloatingIpStatus,
    )
    views = [FloatingIpView(**record.model_dump(), status=status) for record, status in items]
    return FloatingIpPage(items=views, next=following)


@router.get("/floating-ips/{fip_id}")
async def get_floating_ip(fip_id: str, ctx: ContextDep, caller: CallerDep) -> FloatingIpView:
    """One floating IP, with what its host sees."""
    records = Records(ctx.store)
    _, record = await records.get(Kind.FLOATING_IP, FloatingIpRecord, caller, fip_id)
    return await _view(records, record)


async def _point(
    store: Store, caller: Caller, fip_id: str, target: FloatingIpAssociate | None
) -> FloatingIpView:
    """Points the floating IP at `target` (None: at nothing), releasing its old fixed IP."""
    records = Records(store)
    for _ in range(RACE_ATTEMPTS):
        kv, record = await records.get(Kind.FLOATING_IP, FloatingIpRecord, caller, fip_id)
        old = association_of(record.spec)
        guards = Guards()
        spec = record.spec.model_copy(update={"port": None, "fixed_ip": None})
        if target is not None:
            _, external = await find_external(store, caller, record.spec.network)
            port_id, fixed_ip, guards = await _association(
                store, caller, record.id, external, target.port, target.fixed_ip
            )
            spec = spec.model_copy(update={"port": port_id, "fixed_ip": fixed_ip})
        new = association_of(spec)
        if old is not None and old != new:
            guards.released_claims.append(old)
        if new is not None and new != old:
            guards.claims[new] = record.id
        updated = record.model_copy(update={"spec": spec})
        if not await raced(store, guards, records.replace(caller, kv, updated, guards)):
            return await _view(records, updated)
    raise Conflict(f"floating IP {fip_id} kept changing", hint="try again")


@router.post("/floating-ips/{fip_id}/associate")
async def associate_floating_ip(
    fip_id: str, body: FloatingIpAssociate, ctx: ContextDep, caller: CallerDep
) -> FloatingIpView:
    """Point a floating IP at a port (moving it when it points elsewhere)."""
    return await _point(ctx.store, caller, fip_id, body)


@router.post("/floating-ips/{fip_id}/disassociate")
async def disassociate_floating_ip(
    fip_id: str, ctx: ContextDep, caller: CallerDep
) -> FloatingIpView:
    """Point a floating IP at nothing; the project keeps the address."""
    return await _point(ctx.store, caller, fip_id, None)


@router.delete("/floating-ips/{fip_id}", status_code=204)
async def release_floating_ip(fip_id: str, ctx: ContextDep, caller: CallerDep) -> Response:
    """Give a floating IP's address back to its external network."""
    records = Records(ctx.store)
    for _ in range(RACE_ATTEMPTS):
        kv, record = await records.get(Kind.FLOATING_IP, FloatingIpRecord, caller, fip_id)
        claims = [address_claim_key(record.spec.network, record.spec.address)]
        association = association_of(record.spec)
        if association is not None:
            claims.append(association)
        guards = Guards(released_claims=claims, freed=Usage(floating_ips=1))
        if await records.remove(caller, kv, guards) is not None:
            return Response(status_code=204)
    raise Conflict(f"floating IP {fip_id} kept changing while it was released", hint="try again")
