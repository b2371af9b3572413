"""What the networking routes share: finding networks (a project's VPCs, everyone's external
networks), claim keys for addresses, MACs and VNIs, port preparation, and reference guards.

Reference guards keep a delete from stranding a record made meanwhile: a write that makes a
child point at a parent checks the parent still exists and touches the parent's reference key;
a delete reads that key before it looks for users and commits only if it did not change.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

from nubes.api.context import Caller
from nubes.api.records import Guards, Records, name_guard, not_found
from nubes.errors import Conflict, InvalidInput, NotFound, QuotaExceeded
from nubes.ids import IdKind, new_id
from nubes.ipam import allocate_ipv4, random_mac, slaac_address
from nubes.model.common import Model, now
from nubes.model.network import IpamMode, NetworkRecord, PortRecord, PortSpec, SubnetRecord
from nubes.model.security_group import (
    Direction,
    EtherType,
    SecurityGroupRecord,
    SecurityGroupRule,
    SecurityGroupSpec,
    default_rules,
)
from nubes.store.base import (
    Compare,
    Delete,
    KeyValue,
    Put,
    Store,
    TxnOperation,
    compare_holds,
)
from nubes.store.keys import Kind, claim_key, kind_prefix, name_key, resource_key, status_key

R = TypeVar("R", bound=Model)

# Names of external networks live in this scope, not a project's: every project finds them.
# No project can be called this (project names start with a letter or digit).
EXTERNAL_SCOPE = "@external"
DEFAULT_GROUP = "default"
# How often a write that lost a race for an address, a VNI or a reference is prepared again.
RACE_ATTEMPTS = 64


class ResourceInUse(Conflict):
    """A delete or change would strand the records that use the resource."""

    code = "in_use"


class AddressInUse(Conflict):
    """An address asked for by the client belongs to someone else."""

    code = "address_in_use"


class NoFreeAddress(Conflict):
    """A subnet or external network has no address left to give."""

    code = "no_free_address"


# -- claim keys --------------------------------------------------------------------------


def address_claim_key(scope: str, address: str) -> str:
    """The claim giving `address` to one owner within `scope` (a subnet id, or an external
    network id for SNAT and floating addresses)."""
    return claim_key(f"ip-{scope}", address)


def mac_claim_key(network: str, mac: str) -> str:
    """The claim that makes a MAC address unique within a VPC."""
    return claim_key(f"mac-{network}", mac)


def vni_claim_key(vni: int) -> str:
    """The claim giving a VXLAN network identifier to one subnet."""
    return claim_key("vni", str(vni))


def association_claim_key(port: str, fixed_ip: str) -> str:
    """The claim giving one IPv4 of a port to at most one floating IP."""
    return claim_key(f"fip-{port}", fixed_ip)


def references_key(parent: str) -> str:
    """The key every new user of `parent` touches (see the module docstring)."""
    return claim_key("refs", parent)


async def claimed_values(store: Store, what: str) -> list[str]:
    """The values claimed under `what` (the addresses of a subnet, the VNIs in use)."""
    prefix = claim_key(what, "_")[:-1]
    result = await store.range(prefix)
    return [kv.key[len(prefix) :] for kv in result.kvs]


# -- guards ------------------------------------------------------------------------------


def takes_reference(parent: KeyValue, parent_id: str, child_id: str) -> Guards:
    """Guards of a write that makes `child_id` use `parent`: the parent must still exist when
    it commits, and its reference key changes under any delete that looked before."""
    return Guards(
        compares=[Compare.create_revision(parent.key, "==", parent.create_revision)],
        operations=[Put(references_key(parent_id), child_id)],
    )


async def references_snapshot(store: Store, parent_id: str) -> Compare:
    """Read before looking for `parent_id`'s users; a delete committed with it fails when a
    user came meanwhile."""
    key = references_key(parent_id)
    kv = await store.get(key)
    return Compare.absent(key) if kv is None else Compare.unchanged(kv)


def merge_guards(*parts: Guards) -> Guards:
    """One Guards holding every part's, for one transaction (a VM with its new ports).

    Writes to the same key are kept once (the last), since etcd refuses a transaction that
    names a key twice.

    Raises:
        Conflict: two parts claim the same value or name (two ports asking for one address).
    """
    merged = Guards()
    writes: dict[str, TxnOperation] = {}
    for part in parts:
        for mine, theirs in ((merged.names, part.names), (merged.claims, part.claims)):
            for key, owner in theirs.items():
                if key in mine and mine[key] != owner:
                    raise Conflict(
                        f"{key.rsplit('/', 1)[-1]} is asked for twice in this request",
                        hint="give each port its own address and name",
                    )
                mine[key] = owner
        merged.released_names.extend(part.released_names)
        merged.released_claims.extend(part.released_claims)
        for usage_field in ("usage", "freed"):
            value = getattr(part, usage_field)
            if value is not None:
                current = getattr(merged, usage_field)
                setattr(merged, usage_field, value if current is None else current.plus(value))
        merged.compares.extend(c for c in part.compares if c not in merged.compares)
        for operation in part.operations:
            writes.pop(operation.key, None)
            writes[operation.key] = operation
    merged.operations = list(writes.values())
    return merged


async def lost_race(store: Store, guards: Guards) -> bool:
    """Whether a write with `guards` failed because something it read changed or something it
    picked was claimed meanwhile: then prepare it again. False for a taken name or quota."""
    for compare in guards.compares:
        if not compare_holds(compare, await store.get(compare.key)):
            return True
    for key, owner in guards.claims.items():
        kv = await store.get(key)
        if kv is not None and kv.value != owner:
            return True
    return False


async def raced(store: Store, guards: Guards, write: Awaitable[int | None]) -> bool:
    """Awaits `write`, a Records create or replace carrying `guards`: False once it is
    written, True when it lost a race (something it read or picked changed meanwhile:
    prepare it again). Any other conflict (a taken name, the quota) is raised."""
    try:
        return await write is None
    except QuotaExceeded:
        raise
    except Conflict:
        if await lost_race(store, guards):
            return True
        raise


# -- lookups -----------------------------------------------------------------------------


def _usable(ref: str) -> bool:
    return 0 < len(ref) <= 128 and ref.isascii() and ref.isprintable() and "/" not in ref


async def find_network(store: Store, caller: Caller, ref: str) -> tuple[KeyValue, NetworkRecord]:
    """The network `ref` names: a VPC of the caller's project (id or name), or an external
    network (id or name), which every project sees.

    Raises:
        NotFound: no such network the caller may see.
    """
    try:
        return await Records(store).find(Kind.NETWORK, NetworkRecord, caller, ref)
    except NotFound:
        pass
    kv = None
    if _usable(ref):
        kv = await store.get(resource_key(Kind.NETWORK, ref))
        if kv is None:
            guard = await store.get(name_key(Kind.NETWORK, EXTERNAL_SCOPE, ref))
            if guard is not None and isinstance(guard.value, str):
                kv = await store.get(resource_key(Kind.NETWORK, guard.value))
    if kv is not None:
        record = NetworkRecord.from_json(kv.value)
        if record.spec.external is not None:
            return kv, record
    raise not_found(Kind.NETWORK, ref)


async def find_vpc(store: Store, caller: Caller, ref: str) -> tuple[KeyValue, NetworkRecord]:
    """The caller's VPC `ref` names.

    Raises:
        NotFound: no such network. InvalidInput: it is an external network.
    """
    kv, record = await find_network(store, caller, ref)
    if record.spec.external is not None:
        raise InvalidInput(
            f"network {ref!r} is an external network; subnets and ports go on a VPC",
            hint="name one of your own networks; external networks give floating IPs",
        )
    return kv, record


async def find_external(store: Store, caller: Caller, ref: str) -> tuple[KeyValue, NetworkRecord]:
    """The external network `ref` names.

    Raises:
        NotFound: no such network. InvalidInput: it is a VPC, not an external network.
    """
    kv, record = await find_network(store, caller, ref)
    if record.spec.external is None:
        raise InvalidInput(
            f"network {ref!r} is a VPC, not an external network",
            hint="list external networks with `nubes network list --external`",
        )
    return kv, record


async def scan(store: Store, kind: Kind, model: type[R], keep: Callable[[R], bool]) -> list[R]:
    """Every record of `kind` that `keep` accepts (a full read, for finding users)."""
    prefix = kind_prefix(kind)
    result = await store.range(prefix)
    found = []
    for kv in result.kvs:
        if "/" in kv.key[len(prefix) :]:
            continue
        record = model.from_json(kv.value)
        if keep(record):
            found.append(record)
    return found


def shown(ids: Iterable[str], limit: int = 5) -> str:
    """A few ids for a message, with how many more there are."""
    items = sorted(ids)
    text = ", ".join(items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


# -- external addresses ------------------------------------------------------------------


def _ipv4(value: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise InvalidInput(
            f"{what} {value!r} is not an IPv4 address", hint="give one like 198.18.0.10"
        ) from None


async def free_external_address(
    store: Store, external: NetworkRecord, wanted: str | None = None
) -> ipaddress.IPv4Address:
    """An address of the external network nobody holds (`wanted` when given): never its
    network, broadcast or gateway address, a VPC's SNAT address or a floating IP.

    Raises:
        InvalidInput: `wanted` is not a host address of the network, or is its gateway.
        AddressInUse: `wanted` is held. NoFreeAddress: every address is held.
    """
    assert external.spec.external is not None
    outside = external.spec.external
    network = ipaddress.IPv4Network(outside.cidr)
    gateway = ipaddress.IPv4Address(outside.gateway) if outside.gateway else None
    if wanted is not None:
        address = _ipv4(wanted, "address")
        if address not in network or address in (
            network.network_address,
            network.broadcast_address,
        ):
            raise InvalidInput(
                f"{address} is not a host address of {external.spec.name} ({network})",
                hint="leave the address out to get a free one",
            )
        if address == gateway:
            raise InvalidInput(
                f"{address} is the gateway of {external.spec.name}",
                hint="leave the address out to get a free one",
            )
        holder = await store.get(address_claim_key(external.id, str(address)))
        if holder is not None:
            raise AddressInUse(
                f"{address} of {external.spec.name} is in use by {holder.value}",
                hint="leave the address out to get a free one",
            )
        return address
    used = {ipaddress.ip_address(v) for v in await claimed_values(store, f"ip-{external.id}")}
    for address in network.hosts():
        if address != gateway and address not in used:
            return address
    raise NoFreeAddress(
        f"external network {external.spec.name} ({network}) has no free address left",
        hint="release unused floating IPs, or ask an admin for a larger external network",
    )


# -- security groups ---------------------------------------------------------------------


def default_group(project: str, group_id: str) -> SecurityGroupRecord:
    """A project's `default` group: all egress, and ingress from its own members."""
    members = [
        SecurityGroupRule(direction=Direction.INGRESS, ethertype=ethertype, remote_group=group_id)
        for ethertype in (EtherType.IPV4, EtherType.IPV6)
    ]
    spec = SecurityGroupSpec(
        name=DEFAULT_GROUP,
        description="made for the project's first port: all egress, ingress from its members",
        rules=[*default_rules(), *members],
    )
    return SecurityGroupRecord(id=group_id, project=project, spec=spec, created_at=now())


async def ensure_default_group(
    store: Store, caller: Caller
) -> tuple[KeyValue, SecurityGroupRecord]:
    """The project's `default` security group, made when the project has none.

    Raises:
        Conflict: it could not be made (the store kept changing).
    """
    records = Records(store)
    for _ in range(4):
        try:
            return await records.find(
                Kind.SECURITY_GROUP, SecurityGroupRecord, caller, DEFAULT_GROUP
            )
        except NotFound:
            pass
        group_id = new_id(IdKind.SECURITY_GROUP)
        guards = Guards(
            names=name_guard(Kind.SECURITY_GROUP, caller.project, DEFAULT_GROUP, group_id)
        )
        try:
            await records.create(
                caller,
                Kind.SECURITY_GROUP,
                group_id,
                default_group(caller.project, group_id),
                guards,
            )
        except Conflict:
            continue  # another request made it first: find it
    return await records.find(Kind.SECURITY_GROUP, SecurityGroupRecord, caller, DEFAULT_GROUP)


async def find_groups(
    store: Store, caller: Caller, refs: Iterable[str]
) -> list[tuple[KeyValue, SecurityGroupRecord]]:
    """The caller's security groups `refs` name (ids or names), each once, in order.

    Raises:
        NotFound: one of them is not a group of the project.
    """
    found: dict[str, tuple[KeyValue, SecurityGroupRecord]] = {}
    for ref in refs:
        kv, record = await Records(store).find(
            Kind.SECURITY_GROUP, SecurityGroupRecord, caller, ref
        )
        found.setdefault(record.id, (kv, record))
    return list(found.values())


# -- ports -------------------------------------------------------------------------------


async def first_subnet(store: Store, network: NetworkRecord) -> tuple[KeyValue, SubnetRecord]:
    """The network's oldest subnet.

    Raises:
        Conflict: the network has no subnet.
    """
    subnets = await scan(store, Kind.SUBNET, SubnetRecord, lambda s: s.spec.network == network.id)
    for subnet in sorted(subnets, key=lambda s: (s.created_at, s.id)):
        kv = await store.get(resource_key(Kind.SUBNET, subnet.id))
        if kv is not None:
            return kv, subnet
    raise Conflict(
        f"network {network.spec.name} has no subnet to put a port on",
        hint=f"make one: `nubes subnet create --network {network.spec.name} --cidr ...`",
    )


async def _choose_ipv4(
    store: Store, subnet: SubnetRecord, fixed_ip: str | None, taken: Mapping[str, str]
) -> ipaddress.IPv4Address:
    spec = subnet.spec
    if fixed_ip is not None:
        address = _ipv4(fixed_ip, "fixed_ip")
        network = spec.network_v4
        hint = "leave fixed_ip out to get a free address"
        if address not in network:
            raise InvalidInput(
                f"fixed_ip {address} is not in subnet {spec.name} ({network})", hint=hint
            )
        if address in (network.network_address, network.broadcast_address):
            raise InvalidInput(
                f"fixed_ip {address} is the network or broadcast address of {network}", hint=hint
            )
        if address == spec.gateway_v4:
            raise InvalidInput(
                f"fixed_ip {address} is the gateway of subnet {spec.name}", hint=hint
            )
        key = address_claim_key(subnet.id, str(address))
        holder = taken.get(key) or getattr(await store.get(key), "value", None)
        if holder is not None:
            raise AddressInUse(
                f"{address} of subnet {spec.name} is in use by {holder}",
                hint="choose another address, or " + hint,
            )
        return address
    used: set[ipaddress.IPv4Address] = set()
    prefix = address_claim_key(subnet.id, "_")[:-1]
    values = await claimed_values(store, f"ip-{subnet.id}")
    values += [key[len(prefix) :] for key in taken if key.startswith(prefix)]
    for value in values:
        held = ipaddress.ip_address(value)
        if isinstance(held, ipaddress.IPv4Address):
            used.add(held)
    try:
        return allocate_ipv4(spec, used)
    except Conflict as full:
        raise NoFreeAddress(full.message, hint=full.hint) from None


async def _choose_mac(store: Store, network: str, taken: Mapping[str, str]) -> str:
    while True:
        mac = random_mac()
        key = mac_claim_key(network, mac)
        if key not in taken and await store.get(key) is None:
            return mac


async def prepare_port(
    store: Store,
    caller: Caller,
    *,
    network: str,
    subnet: str | None = None,
    fixed_ip: str | None = None,
    security_groups: list[str] | None = None,
    port_security: bool = True,
    vm: str | None = None,
    auto_delete: bool = False,
    name: str | None = None,
    also_claimed: Mapping[str, str] | None = None,
) -> tuple[str, PortRecord, Guards]:
    """Resolves the references of a new port and allocates its addresses, without writing.

    `network`, `subnet` and `security_groups` are ids or names in the caller's project;
    `subnet` defaults to the network's oldest subnet, `security_groups` to the project's
    `default` group (made here if missing: the only write this does). The IPv4 is
    `fixed_ip` or the subnet's lowest free address (none when the subnet's IPAM is `none`);
    the IPv6 is the SLAAC address of the random MAC when the subnet has an IPv6 /64.
    `also_claimed` holds the claims of ports prepared earlier for the same transaction
    (a VM's other NICs): they are not picked again.

    Returns the new port's id, its record, and the Guards to commit it with: address and
    MAC claims, the name guard, and references to the network, subnet and groups. To write
    it, commit `merge_guards(guards, port_write_guards(port_id, record), ...)` (for a lone
    port, `Records.create(caller, Kind.PORT, port_id, record, guards)`). When the commit
    raises Conflict and `lost_race(store, guards)` is True, an address was taken or a
    referenced record changed meanwhile: call prepare_port again and retry (create_port
    does this for a lone port).

    Raises:
        NotFound: the network, subnet or a group is not the caller's.
        InvalidInput: the network is external, the subnet is in another network, or
            `fixed_ip` is not a usable address of the subnet.
        AddressInUse: `fixed_ip` is held by another port.
        NoFreeAddress: the subnet is full.
        Conflict: the network has no subnet.
    """
    records = Records(store)
    network_kv, network_record = await find_vpc(store, caller, network)
    if subnet is None:
        subnet_kv, subnet_record = await first_subnet(store, network_record)
    else:
        subnet_kv, subnet_record = await records.find(Kind.SUBNET, SubnetRecord, caller, subnet)
        if subnet_record.spec.network != network_record.id:
            raise InvalidInput(
                f"subnet {subnet!r} is in network {subnet_record.spec.network}, "
                f"not in {network_record.spec.name} ({network_record.id})",
                hint="name a subnet of the port's network, or leave it out",
            )
    if security_groups is None:
        groups = [await ensure_default_group(store, caller)]
    else:
        groups = await find_groups(store, caller, security_groups)
    port_id = new_id(IdKind.PORT)
    taken = also_claimed or {}
    mac = await _choose_mac(store, network_record.id, taken)
    spec = subnet_record.spec
    fixed_ips: list[str] = []
    if spec.ipam is IpamMode.NONE:
        if fixed_ip is not None:
            raise InvalidInput(
                f"subnet {spec.name} has IPAM mode none: its ports have no addresses",
                hint="leave fixed_ip out, or use a subnet with IPAM manual or automatic",
            )
    else:
        fixed_ips.append(str(await _choose_ipv4(store, subnet_record, fixed_ip, taken)))
        if spec.network_v6 is not None:
            fixed_ips.append(str(slaac_address(spec.network_v6, mac)))
    record = PortRecord(
        id=port_id,
        project=caller.project,
        spec=PortSpec(
            network=network_record.id,
            subnet=subnet_record.id,
            mac=mac,
            fixed_ips=fixed_ips,
            security_groups=[group.id for _, group in groups],
            port_security=port_security,
            vm=vm,
            name=name,
            auto_delete=auto_delete,
        ),
        created_at=now(),
    )
    own = Guards(claims=dict.fromkeys(port_claim_keys(record, names=False), port_id))
    if name is not None:
        own.names = name_guard(Kind.PORT, caller.project, name, port_id)
    guards = merge_guards(
        own,
        takes_reference(network_kv, network_record.id, port_id),
        takes_reference(subnet_kv, subnet_record.id, port_id),
        *(takes_reference(kv, group.id, port_id) for kv, group in groups),
    )
    return port_id, record, guards


def port_write_guards(port_id: str, record: PortRecord) -> Guards:
    """The writes of a prepared port's record, to merge into another record's create."""
    key = resource_key(Kind.PORT, port_id)
    return Guards(compares=[Compare.absent(key)], operations=[Put(key, record.to_json())])


async def create_port(store: Store, caller: Caller, **options: Any) -> PortRecord:
    """Prepares and writes a port (options as prepare_port's), again when it lost a race.

    Raises:
        what prepare_port raises; Conflict: its name is taken, or it kept losing races.
    """
    for _ in range(RACE_ATTEMPTS):
        port_id, record, guards = await prepare_port(store, caller, **options)
        if not await raced(
            store, guards, Records(store).create(caller, Kind.PORT, port_id, record, guards)
        ):
            return record
    raise Conflict("the port's subnet kept changing while it was made", hint="try again")


def port_claim_keys(port: PortRecord, *, names: bool = True) -> list[str]:
    """The guard keys a port holds while it exists: its address claims (subnet + each fixed
    IP), its MAC claim (network + MAC) and, when it has a name, its name guard. Whoever
    deletes a port record deletes these in the same transaction."""
    keys = [address_claim_key(port.spec.subnet, address) for address in port.spec.fixed_ips]
    keys.append(mac_claim_key(port.spec.network, port.spec.mac))
    if names and port.spec.name is not None:
        keys.append(name_key(Kind.PORT, port.project, port.spec.name))
    return keys


def port_deletion_operations(port: PortRecord) -> list[TxnOperation]:
    """Every delete a port's removal needs: its record, its status and port_claim_keys
    (the janitor's PortDeletion)."""
    keys = [resource_key(Kind.PORT, port.id), status_key(Kind.PORT, port.id)]
    return [Delete(key) for key in [*keys, *port_claim_keys(port)]]


async def port_deletion_guards(store: Store, port: PortRecord) -> Guards:
    """release_port_guards, for callers that await it (the store is not read)."""
    del store
    return release_port_guards(port)


def release_port_guards(port: PortRecord) -> Guards:
    """The Guards that release what `port` holds, for the transaction that deletes it."""
    names = [name_key(Kind.PORT, port.project, port.spec.name)] if port.spec.name else []
    return Guards(released_claims=port_claim_keys(port, names=False), released_names=names)
