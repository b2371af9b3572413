"""Networks and subnets: a project's VPCs (with an optional way out through an external
network) and their subnets; external networks, which admins make and every project sees.

External network names live in one scope shared by every project (a VPC's name wins when
a project names one the same); only admins change external networks.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from pydantic import ConfigDict, Field, ValidationError

from nubes.api.context import Caller, CallerDep, ContextDep
from nubes.api.netops import (
    EXTERNAL_SCOPE,
    RACE_ATTEMPTS,
    ResourceInUse,
    address_claim_key,
    claimed_values,
    find_external,
    find_network,
    find_vpc,
    free_external_address,
    merge_guards,
    raced,
    references_key,
    references_snapshot,
    scan,
    shown,
    takes_reference,
    vni_claim_key,
)
from nubes.api.openapi_links import link, links
from nubes.api.params import CursorQuery, LimitQuery
from nubes.api.records import DEFAULT_PAGE, Guards, Records, name_guard
from nubes.errors import Conflict, InvalidInput
from nubes.ids import IdKind, new_id
from nubes.ipam import allocate_vni
from nubes.model.common import NAME_PATTERN, Model, now
from nubes.model.network import (
    DEFAULT_MTU,
    ExternalGateway,
    ExternalSpec,
    FloatingIpRecord,
    IpamMode,
    NetworkRecord,
    NetworkSpec,
    PortRecord,
    SubnetRecord,
    SubnetSpec,
)
from nubes.store.base import Compare, Delete, Put, Store
from nubes.store.keys import Kind, claim_key, name_key

router = APIRouter(tags=["networks"])

# The canonical spellings, for the OpenAPI document only (validation is the model's: it
# also takes a netmask, and says why a CIDR with host bits or a wrong length is refused).
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IPV4 = rf"^{_OCTET}(\.{_OCTET}){{3}}$"
SUBNET_CIDR = rf"^{_OCTET}(\.{_OCTET}){{3}}/(1[6-9]|2[0-9])$"


class NetworkCreate(Model):
    name: str = Field(pattern=NAME_PATTERN)
    mtu: int = Field(default=DEFAULT_MTU, ge=1280, le=9000)
    external_gateway: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="an external network (id or name) the VPC reaches the outside through",
    )
    external: ExternalSpec | None = Field(
        default=None, description="admins only: make an external network instead of a VPC"
    )

    # The examples make what the other operations' examples name: networks `example-ext`
    # (external; admins only) and `example-net`, then `example-net-2` reaching out through it.
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "example-ext",
                    "external": {
                        "physical_network": "external",
                        "cidr": "198.18.0.0/24",
                        "gateway": "198.18.0.1",
                    },
                },
                {"name": "example-net"},
                {"name": "example-net-2", "mtu": 1400, "external_gateway": "example-ext"},
            ]
        }
    )


class NetworkUpdate(Model):
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    mtu: int | None = Field(default=None, ge=1280, le=9000)
    external_gateway: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="an external network (id or name); null removes the VPC's way out",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"mtu": 1400},
                {"external_gateway": "example-ext"},
                {"external_gateway": None},
            ]
        }
    )


class NetworkPage(Model):
    items: list[NetworkRecord]
    next: str | None = None


class SubnetCreate(Model):
    name: str = Field(pattern=NAME_PATTERN)
    network: str = Field(min_length=1, max_length=128, description="a VPC, by id or name")
    cidr: str = Field(
        max_length=64,
        description="IPv4, /16 to /29, no host bits set",
        json_schema_extra={"pattern": SUBNET_CIDR},
    )
    gateway: str | None = Field(
        default=None,
        max_length=64,
        description="default: first address",
        json_schema_extra={"pattern": IPV4},
    )
    ipv6_cidr: str | None = Field(default=None, max_length=64, description="an IPv6 /64")
    ipam: IpamMode = IpamMode.AUTOMATIC
    dhcp: bool = True
    dns_nameservers: list[str] = Field(default_factory=list, max_length=4)

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"name": "example-subnet", "network": "example-net", "cidr": "10.20.0.0/24"},
                {
                    "name": "example-subnet-2",
                    "network": "example-net-2",
                    "cidr": "10.30.0.0/24",
                    "gateway": "10.30.0.254",
                    "ipv6_cidr": "fd00:30::/64",
                    "dns_nameservers": ["198.18.0.53"],
                },
                {
                    "name": "example-manual",
                    "network": "example-net",
                    "cidr": "10.21.0.0/28",
                    "ipam": "manual",
                },
            ]
        }
    )


class SubnetUpdate(Model):
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    dhcp: bool | None = None
    dns_nameservers: list[str] | None = Field(default=None, max_length=4)

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"dhcp": False}, {"dns_nameservers": ["198.18.0.53", "2001:db8::53"]}]
        }
    )


class SubnetPage(Model):
    items: list[SubnetRecord]
    next: str | None = None


def cidrs_key(network: str) -> str:
    """Touched by every subnet create of a network, so two overlapping creates cannot both
    pass their overlap check."""
    return claim_key("cidrs", network)


def _network_name_key(record: NetworkRecord, name: str) -> str:
    scope = EXTERNAL_SCOPE if record.spec.external is not None else record.project
    return name_key(Kind.NETWORK, scope, name)


def _checked_subnet(**fields: Any) -> SubnetSpec:
    try:
        return SubnetSpec.model_validate(fields)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'subnet'}: {problem['msg']}"
            for problem in error.errors()
        )
        raise InvalidInput(
            f"invalid subnet: {problems}", hint="fix the fields named and send it again"
        ) from None


async def _gateway_guards(
    store: Store, caller: Caller, vpc_id: str, ref: str
) -> tuple[ExternalGateway, Guards]:
    """A SNAT address on the external network `ref` for VPC `vpc_id`, and its claim."""
    external_kv, external = await find_external(store, caller, ref)
    address = str(await free_external_address(store, external))
    guards = merge_guards(
        Guards(claims={address_claim_key(external.id, address): vpc_id}),
        takes_reference(external_kv, external.id, vpc_id),
    )
    return ExternalGateway(network=external.id, address=address), guards


@router.post(
    "/networks",
    status_code=201,
    responses=links(
        201,
        subnet=link(
            "POST /subnets", "make a subnet in the VPC", body={"network": "$response.body#/id"}
        ),
        port=link("POST /ports", "make a port on the VPC", body={"network": "$response.body#/id"}),
        floating_ip=link(
            "POST /floating-ips",
            "take a floating IP from the external network",
            body={"network": "$response.body#/id"},
        ),
    ),
)
async def create_network(body: NetworkCreate, ctx: ContextDep, caller: CallerDep) -> NetworkRecord:
    """Make a VPC, or (admin, with `external`) an external network every project sees."""
    records = Records(ctx.store)
    if body.external is not None:
        caller.require_admin("make external networks")
        if body.external_gateway is not None:
            raise InvalidInput(
                "an external network has no external gateway", hint="leave external_gateway out"
            )
        network_id = new_id(IdKind.NETWORK)
        record = NetworkRecord(
            id=network_id,
            project=caller.project,
            spec=NetworkSpec(name=body.name, external=body.external, mtu=body.mtu),
            created_at=now(),
        )
        guards = Guards(names={_network_name_key(record, body.name): network_id})
        if body.external.gateway is not None:
            guards.claims[address_claim_key(network_id, body.external.gateway)] = network_id
        await records.create(caller, Kind.NETWORK, network_id, record, guards)
        return record
    for _ in range(RACE_ATTEMPTS):
        network_id = new_id(IdKind.NETWORK)
        guards = Guards(names=name_guard(Kind.NETWORK, caller.project, body.name, network_id))
        gateway = None
        if body.external_gateway is not None:
            gateway, taken = await _gateway_guards(
                ctx.store, caller, network_id, body.external_gateway
            )
            guards = merge_guards(guards, taken)
        spec = NetworkSpec(name=body.name, mtu=body.mtu, gateway=gateway)
        record = NetworkRecord(id=network_id, project=caller.project, spec=spec, created_at=now())
        written = records.create(caller, Kind.NETWORK, network_id, record, guards)
        if not await raced(ctx.store, guards, written):
            return record
    raise Conflict("the external network kept changing", hint="try again")


@router.get("/networks")
async def list_networks(
    ctx: ContextDep,
    caller: CallerDep,
    limit: LimitQuery = DEFAULT_PAGE,
    cursor: CursorQuery = None,
    name: Annotated[str | None, Query(max_length=64)] = None,
    external: Annotated[
        bool | None, Query(description="only external networks, or only VPCs")
    ] = None,
) -> NetworkPage:
    """The project's VPCs and every external network, by id."""

    def keep(record: NetworkRecord) -> bool:
        is_external = record.spec.external is not None
        return (
            (is_external or record.project == caller.project)
            and (name is None or record.spec.name == name)
            and (external is None or external == is_external)
        )

    items, following = await Records(ctx.store).page(
        Kind.NETWORK, NetworkRecord, None, limit=limit, cursor=cursor, keep=keep
    )
    return NetworkPage(items=[record for record, _ in items], next=following)


@router.get("/networks/{network_id}")
async def get_network(network_id: str, ctx: ContextDep, caller: CallerDep) -> NetworkRecord:
    """One network."""
    _, record = await find_network(ctx.store, caller, network_id)
    return record


@router.patch("/networks/{network_id}")
async def update_network(
    network_id: str, body: NetworkUpdate, ctx: ContextDep, caller: CallerDep
) -> NetworkRecord:
    """Rename a network, change its MTU, or set or remove a VPC's external gateway."""
    store = ctx.store
    _, found = await find_network(store, caller, network_id)
    if found.spec.external is not None:
        caller.require_admin("change external networks")
        if "external_gateway" in body.model_fields_set:
            raise InvalidInput("an external network has no external gateway")
    records = Records(store)
    for _ in range(RACE_ATTEMPTS):
        kv, record = await find_network(store, caller, found.id)
        spec = record.spec
        guards = Guards()
        if "external_gateway" in body.model_fields_set:
            gateway, guards = await _change_gateway(store, caller, record, body.external_gateway)
            spec = spec.model_copy(update={"gateway": gateway})
        if body.name is not None and body.name != spec.name:
            guards.names = {_network_name_key(record, body.name): record.id}
            guards.released_names = [_network_name_key(record, spec.name)]
            spec = spec.model_copy(update={"name": body.name})
        if body.mtu is not None:
            spec = spec.model_copy(update={"mtu": body.mtu})
        updated = record.model_copy(update={"spec": spec})
        if not await raced(store, guards, records.replace(caller, kv, updated, guards)):
            return updated
    raise Conflict(f"network {network_id} kept changing", hint="try again")


async def _change_gateway(
    store: Store, caller: Caller, vpc: NetworkRecord, ref: str | None
) -> tuple[ExternalGateway | None, Guards]:
    """The VPC's new way out (None: none) and the guards of the change.

    Raises:
        ResourceInUse: floating IPs reach the VPC's ports through the old one.
    """
    old = vpc.spec.gateway
    guards = Guards()
    if old is not None:
        target = None if ref is None else (await find_external(store, caller, ref))[1].id
        if target == old.network:
            return old, guards
        guards.compares.append(await references_snapshot(store, vpc.id))
        ports = {
            port.id
            for port in await scan(store, Kind.PORT, PortRecord, lambda p: p.spec.network == vpc.id)
        }
        floating = await scan(
            store,
            Kind.FLOATING_IP,
            FloatingIpRecord,
            lambda f: f.spec.port in ports and f.spec.network == old.network,
        )
        if floating:
            raise ResourceInUse(
                f"floating IPs {shown(f.id for f in floating)} reach ports of network "
                f"{vpc.spec.name} through its external gateway",
                hint="disassociate them first",
            )
        guards.released_claims.append(address_claim_key(old.network, old.address))
    gateway = None
    if ref is not None:
        gateway, taken = await _gateway_guards(store, caller, vpc.id, ref)
        guards = merge_guards(guards, taken)
    return gateway, guards


@router.delete("/networks/{network_id}", status_code=204)
async def delete_network(network_id: str, ctx: ContextDep, caller: CallerDep) -> Response:
    """Delete a network that nothing uses any more."""
    store = ctx.store
    records = Records(store)
    for _ in range(RACE_ATTEMPTS):
        kv, record = await find_network(store, caller, network_id)
        snapshot = await references_snapshot(store, record.id)
        guards = Guards(
            compares=[snapshot],
            released_names=[_network_name_key(record, record.spec.name)],
            operations=[Delete(references_key(record.id)), Delete(cidrs_key(record.id))],
        )
        if record.spec.external is not None:
            caller.require_admin("delete external networks")
            await _refuse_external_in_use(store, record)
            if record.spec.external.gateway is not None:
                guards.released_claims.append(
                    address_claim_key(record.id, record.spec.external.gateway)
                )
        else:
            await _refuse_vpc_in_use(store, record)
            if record.spec.gateway is not None:
                gateway = record.spec.gateway
                guards.released_claims.append(address_claim_key(gateway.network, gateway.address))
        if await records.remove(caller, kv, guards) is not None:
            return Response(status_code=204)
    raise Conflict(f"network {network_id} kept changing while it was deleted", hint="try again")


async def _refuse_vpc_in_use(store: Store, vpc: NetworkRecord) -> None:
    subnets = await scan(store, Kind.SUBNET, SubnetRecord, lambda s: s.spec.network == vpc.id)
    if subnets:
        raise ResourceInUse(
            f"network {vpc.spec.name} still has subnets {shown(s.id for s in subnets)}",
            hint="delete its ports and subnets first",
        )
    ports = await scan(store, Kind.PORT, PortRecord, lambda p: p.spec.network == vpc.id)
    if ports:
        raise ResourceInUse(
            f"network {vpc.spec.name} still has ports {shown(p.id for p in ports)}",
            hint="delete its ports first",
        )


async def _refuse_external_in_use(store: Store, external: NetworkRecord) -> None:
    floating = await scan(
        store, Kind.FLOATING_IP, FloatingIpRecord, lambda f: f.spec.network == external.id
    )
    if floating:
        raise ResourceInUse(
            f"external network {external.spec.name} still has floating IPs "
            f"{shown(f.id for f in floating)}",
            hint="their projects must release them first",
        )
    vpcs = await scan(
        store,
        Kind.NETWORK,
        NetworkRecord,
        lambda n: n.spec.gateway is not None and n.spec.gateway.network == external.id,
    )
    if vpcs:
        raise ResourceInUse(
            f"networks {shown(n.id for n in vpcs)} reach the outside through "
            f"external network {external.spec.name}",
            hint="remove their external gateways first",
        )


# -- subnets -----------------------------------------------------------------------------


@router.post(
    "/subnets",
    status_code=201,
    responses=links(
        201,
        port=link(
            "POST /ports",
            "make a port on the subnet",
            body={"network": "$response.body#/spec/network", "subnet": "$response.body#/id"},
        ),
        vm=link(
            "POST /vms",
            "make a VM with a port on the subnet",
            body={
                "networks": [
                    {"network": "$response.body#/spec/network", "subnet": "$response.body#/id"}
                ]
            },
        ),
        network=link(
            "GET /networks/{network_id}",
            "the subnet's VPC",
            parameters={"network_id": "$response.body#/spec/network"},
        ),
    ),
)
async def create_subnet(body: SubnetCreate, ctx: ContextDep, caller: CallerDep) -> SubnetRecord:
    """Make a subnet in a VPC; its VNI comes from the pool."""
    store = ctx.store
    if body.ipam is IpamMode.NONE and body.gateway is not None:
        raise InvalidInput(
            "a subnet with IPAM mode none has no gateway", hint="leave the gateway out"
        )
    for _ in range(RACE_ATTEMPTS):
        network_kv, network = await find_vpc(store, caller, body.network)
        cidrs = await store.get(cidrs_key(network.id))
        subnet_id = new_id(IdKind.SUBNET)
        used = [int(value) for value in await claimed_values(store, "vni") if value.isdigit()]
        spec = _checked_subnet(
            **body.model_dump(exclude={"network"}), network=network.id, vni=allocate_vni(used)
        )
        if spec.gateway is None and spec.ipam is not IpamMode.NONE:
            spec = spec.model_copy(update={"gateway": str(spec.gateway_v4)})
        await _refuse_overlap(store, network, spec)
        guards = merge_guards(
            Guards(
                names=name_guard(Kind.SUBNET, caller.project, body.name, subnet_id),
                claims={vni_claim_key(spec.vni): subnet_id},
                compares=[
                    Compare.absent(cidrs_key(network.id))
                    if cidrs is None
                    else Compare.unchanged(cidrs)
                ],
                operations=[Put(cidrs_key(network.id), subnet_id)],
            ),
            takes_reference(network_kv, network.id, subnet_id),
        )
        record = SubnetRecord(id=subnet_id, project=caller.project, spec=spec, created_at=now())
        written = Records(store).create(caller, Kind.SUBNET, subnet_id, record, guards)
        if not await raced(store, guards, written):
            return record
    raise Conflict(f"network {body.network} kept changing", hint="try again")


class CidrOverlap(Conflict):
    """A subnet's CIDR overlaps another subnet of the same VPC."""

    code = "cidr_overlap"


async def _refuse_overlap(store: Store, network: NetworkRecord, spec: SubnetSpec) -> None:
    others = await scan(store, Kind.SUBNET, SubnetRecord, lambda s: s.spec.network == network.id)
    for other in others:
        pairs: list[tuple[str | None, str | None]] = [
            (spec.cidr, other.spec.cidr),
            (spec.ipv6_cidr, other.spec.ipv6_cidr),
        ]
        for mine, theirs in pairs:
            if (
                mine
                and theirs
                and ipaddress.ip_network(mine).overlaps(ipaddress.ip_network(theirs))
            ):
                raise CidrOverlap(
                    f"{mine} overlaps {theirs} of subnet {other.spec.name} ({other.id}) "
                    f"in network {network.spec.name}",
                    hint="choose a CIDR that overlaps none of the network's subnets",
                )


@router.get("/subnets")
async def list_subnets(
    ctx: ContextDep,
    caller: CallerDep,
    limit: LimitQuery = DEFAULT_PAGE,
    cursor: CursorQuery = None,
    name: Annotated[str | None, Query(max_length=64)] = None,
    network: Annotated[str | None, Query(max_length=128, description="id or name")] = None,
) -> SubnetPage:
    """The project's subnets, by id."""
    network_id = None if network is None else (await find_network(ctx.store, caller, network))[1].id

    def keep(record: SubnetRecord) -> bool:
        return (name is None or record.spec.name == name) and (
            network_id is None or record.spec.network == network_id
        )

    items, following = await Records(ctx.store).page(
        Kind.SUBNET, SubnetRecord, caller, limit=limit, cursor=cursor, keep=keep
    )
    return SubnetPage(items=[record for record, _ in items], next=following)


@router.get("/subnets/{subnet_id}")
async def get_subnet(subnet_id: str, ctx: ContextDep, caller: CallerDep) -> SubnetRecord:
    """One subnet."""
    _, record = await Records(ctx.store).get(Kind.SUBNET, SubnetRecord, caller, subnet_id)
    return record


@router.patch("/subnets/{subnet_id}")
async def update_subnet(
    subnet_id: str, body: SubnetUpdate, ctx: ContextDep, caller: CallerDep
) -> SubnetRecord:
    """Rename a subnet, or change its DHCP and DNS servers."""

    async def change(record: SubnetRecord) -> tuple[SubnetRecord, Guards | None]:
        updates: dict[str, Any] = body.model_dump(exclude_none=True)
        guards = Guards()
        if body.name is not None and body.name != record.spec.name:
            guards.names = name_guard(Kind.SUBNET, record.project, body.name, record.id)
            guards.released_names = [name_key(Kind.SUBNET, record.project, record.spec.name)]
        spec = _checked_subnet(**{**record.spec.model_dump(), **updates})
        return record.model_copy(update={"spec": spec}), guards

    updated, _ = await Records(ctx.store).mutate(
        Kind.SUBNET, SubnetRecord, caller, subnet_id, change
    )
    return updated


@router.delete("/subnets/{subnet_id}", status_code=204)
async def delete_subnet(subnet_id: str, ctx: ContextDep, caller: CallerDep) -> Response:
    """Delete a subnet no port uses; its VNI goes back to the pool."""
    store = ctx.store
    records = Records(store)
    for _ in range(RACE_ATTEMPTS):
        kv, record = await records.get(Kind.SUBNET, SubnetRecord, caller, subnet_id)
        snapshot = await references_snapshot(store, record.id)
        ports = await scan(store, Kind.PORT, PortRecord, lambda p: p.spec.subnet == subnet_id)
        if ports:
            raise ResourceInUse(
                f"subnet {record.spec.name} still has ports {shown(p.id for p in ports)}",
                hint="delete its ports (or the VMs they are plugged into) first",
            )
        guards = Guards(
            compares=[snapshot],
            released_names=[name_key(Kind.SUBNET, record.project, record.spec.name)],
            released_claims=[vni_claim_key(record.spec.vni)],
            operations=[Delete(references_key(record.id))],
        )
        if await records.remove(caller, kv, guards) is not None:
            return Response(status_code=204)
    raise Conflict(f"subnet {subnet_id} kept changing while it was deleted", hint="try again")
