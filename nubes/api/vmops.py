"""What the VM routes do beyond one record: make a VM with its ports in one transaction,
delete it (at once when no host holds it), and show it with its state and addresses.

A create writes the VM, the ports made for it, the existing ports it takes, its name and
the project's usage together, or nothing; a lost race for an automatic address prepares
the ports again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import Field, StringConstraints

from nubes.api.context import Caller
from nubes.api.imageops import find_image
from nubes.api.netops import (
    RACE_ATTEMPTS,
    association_claim_key,
    merge_guards,
    port_write_guards,
    prepare_port,
    raced,
    release_port_guards,
    takes_reference,
)
from nubes.api.records import CAS_ATTEMPTS, Guards, Records, name_guard

# The claim giving a volume to one VM at a time; the volume routes refuse deletes under it.
from nubes.errors import Conflict, InvalidInput, NotFound, QuotaExceeded
from nubes.ids import IdKind, new_id
from nubes.model.common import NAME_PATTERN, Model, now
from nubes.model.network import FloatingIpRecord, NetworkRecord, PortRecord, keypair_key_name
from nubes.model.project import FlavorRecord, ProjectRecord, Usage
from nubes.model.vm import (
    Flavor,
    PowerState,
    RestartPolicy,
    VmRecord,
    VmSpec,
    VmState,
    VmStatus,
)
from nubes.scheduler.binding import HostAllocations, allocation_of, read_allocations
from nubes.store.base import Compare, Delete, KeyValue, Put, Store, TxnOperation
from nubes.store.keys import (
    Kind,
    attachment_claim,
    host_allocations_key,
    name_key,
    resource_key,
    status_key,
    usage_key,
)

MAX_USER_DATA_BYTES = 64 * 1024
MAX_NICS = 8

KeyName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
LabelKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")]
LabelValue = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{0,63}$")]
# additionalProperties: the schema then says that keys outside the pattern are refused.
Labels = Annotated[
    dict[LabelKey, LabelValue],
    Field(max_length=32, json_schema_extra={"additionalProperties": False}),
]


class VmStateConflict(Conflict):
    """The VM's state does not allow this action now."""

    code = "vm_state"


class VolumeUnavailable(Conflict):
    """The volume cannot be attached: in use, elsewhere, or not ready."""

    code = "volume_unavailable"


# -- requests ---------------------------------------------------------------------------


class NicRequest(Model):
    """A new port on a network for the VM (made with it, deleted with it)."""

    network: str = Field(min_length=1, max_length=128, description="network id or name")
    subnet: str | None = Field(
        default=None, min_length=1, max_length=128, description="subnet id or name"
    )
    fixed_ip: str | None = Field(default=None, max_length=64, description="else a free one")


class VmCreate(Model):
    name: str = Field(pattern=NAME_PATTERN)
    flavor: str = Field(min_length=1, max_length=128, description="flavor name")
    image: str = Field(min_length=1, max_length=128, description="image id or name")
    networks: list[NicRequest] = Field(default_factory=list, max_length=MAX_NICS)
    ports: list[str] = Field(
        default_factory=list, max_length=MAX_NICS, description="existing free ports (id or name)"
    )
    security_groups: list[str] | None = Field(
        default=None,
        max_length=16,
        description="ids or names, for the ports made for `networks`; default: the project's",
    )
    key_name: str | None = Field(default=None, pattern=NAME_PATTERN)
    key_names: list[KeyName] = Field(default_factory=list, max_length=16)
    user_data: str | None = Field(default=None, max_length=MAX_USER_DATA_BYTES)
    host_labels: Labels = Field(default_factory=dict)
    anti_affinity_group: str | None = Field(default=None, pattern=NAME_PATTERN)
    power_state: PowerState = PowerState.RUNNING
    restart_policy: RestartPolicy = RestartPolicy.ON_FAILURE
    autostart: bool = True
    cpu_weight: int = Field(default=100, ge=1, le=10_000)
    vnc: bool = False
    storage_pool: str = Field(
        default="local", pattern=NAME_PATTERN, description="pool of the root disk (agent config)"
    )
    ha: bool = Field(
        default=False,
        description="restart on another host when its host dies; takes effect only when "
        "the root disk and every volume are on shared pools (the host monitor checks)",
    )


# -- views ------------------------------------------------------------------------------


class VmAddress(Model):
    port: str
    network: str
    subnet: str
    ip: str


class VmView(VmRecord):
    state: VmState = Field(description="deleting, else the status's state, else pending")
    status: VmStatus | None = None
    addresses: list[VmAddress] = Field(default_factory=list)
    notes: list[str] = Field(
        default_factory=list, description="spec changes that wait for something"
    )


class VmPage(Model):
    items: list[VmView]
    next: str | None = None


def effective_state(record: VmRecord, status: VmStatus | None) -> VmState:
    if record.deleting:
        return VmState.DELETING
    if status is None:
        return VmState.SCHEDULED if record.spec.host else VmState.PENDING
    return status.state


async def view_of(store: Store, record: VmRecord, status: VmStatus | None) -> VmView:
    """The VM as clients see it: record, status, state, and its ports' addresses."""
    addresses: list[VmAddress] = []
    for port_id in record.spec.ports:
        kv = await store.get(resource_key(Kind.PORT, port_id))
        if kv is None:
            continue
        port = PortRecord.from_json(kv.value)
        addresses.extend(
            VmAddress(port=port.id, network=port.spec.network, subnet=port.spec.subnet, ip=ip)
            for ip in port.spec.fixed_ips
        )
    notes: list[str] = []
    spec = record.spec
    if status is not None and status.flavor is not None and status.flavor != spec.flavor:
        notes.append(
            f"flavor {spec.flavor.name} applies at the next start "
            f"(it runs as {status.flavor.name}): stop and start it"
        )
    return VmView(
        **record.model_dump(),
        state=effective_state(record, status),
        status=status,
        addresses=addresses,
        notes=notes,
    )


async def read_vm(store: Store, caller: Caller, ref: str) -> tuple[KeyValue, VmRecord]:
    """The caller's VM `ref` names (id or name).

    Raises:
        NotFound: no such VM in the caller's project.
    """
    return await Records(store).find(Kind.VM, VmRecord, caller, ref)


async def read_status(store: Store, vm_id: str) -> VmStatus | None:
    kv = await store.get(status_key(Kind.VM, vm_id))
    return None if kv is None else VmStatus.from_json(kv.value)


# -- creating ---------------------------------------------------------------------------


@dataclass
class _Plan:
    """What a create writes besides the VM record."""

    port_ids: list[str] = field(default_factory=list)
    parts: list[Guards] = field(default_factory=list)
    claimed: dict[str, str] = field(default_factory=dict)


async def check_room(store: Store, project: str, usage: Usage) -> None:
    """Refuses early, before ports are prepared, what the commit would refuse anyway (the
    commit checks again: this is only the common case made cheap and side-effect free).

    Raises:
        QuotaExceeded: `usage` more would put the project over its quota.
    """
    project_kv = await store.get(resource_key(Kind.PROJECT, project))
    if project_kv is None:
        return
    quota = ProjectRecord.from_json(project_kv.value).quota
    usage_kv = await store.get(usage_key(project))
    current = Usage() if usage_kv is None else Usage.from_json(usage_kv.value)
    already = current.over(quota)  # what an admin's lower quota left over is not ours
    over = [item for item in current.plus(usage).over(quota) if item not in already]
    if over:
        raise QuotaExceeded(
            f"project {project} would go over its quota: {', '.join(over)}",
            hint="delete something first, or ask an admin to raise the quota",
        )


async def check_keys(store: Store, project: str, names: Sequence[str]) -> None:
    """Raises NotFound for the first key pair name the project does not have."""
    for name in names:
        if await store.get(resource_key(Kind.KEYPAIR, keypair_key_name(project, name))) is None:
            raise NotFound(
                f"no key pair {name!r} in this project",
                hint="list them with `nubes keypair list`, or add one with `nubes keypair create`",
            )


async def _take_ports(
    store: Store, caller: Caller, vm_id: str, refs: Sequence[str], plan: _Plan
) -> None:
    records = Records(store)
    for ref in refs:
        kv, port = await records.find(Kind.PORT, PortRecord, caller, ref)
        if port.id in plan.port_ids:
            raise InvalidInput(f"port {port.id} is given twice", hint="give each port once")
        if port.deleting or port.spec.vm is not None:
            raise Conflict(
                f"port {port.id} is "
                + ("being deleted" if port.deleting else f"plugged into VM {port.spec.vm}"),
                hint="give the VM a free port, or a network to make one on",
            )
        network_kv = await store.get(resource_key(Kind.NETWORK, port.spec.network))
        if network_kv is not None:
            network = NetworkRecord.from_json(network_kv.value)
            if network.spec.external is not None:
                raise InvalidInput(
                    f"port {port.id} is on the external network {network.id}",
                    hint="plug VMs into a tenant network and give them a floating IP",
                )
        taken = port.model_copy(update={"spec": port.spec.model_copy(update={"vm": vm_id})})
        plan.port_ids.append(port.id)
        plan.parts.append(
            Guards(compares=[Compare.unchanged(kv)], operations=[Put(kv.key, taken.to_json())])
        )


async def _new_ports(
    store: Store, caller: Caller, vm_id: str, request: VmCreate, plan: _Plan
) -> None:
    for nic in request.networks:
        port_id, port, guards = await prepare_port(
            store,
            caller,
            network=nic.network,
            subnet=nic.subnet,
            fixed_ip=nic.fixed_ip,
            security_groups=request.security_groups,
            vm=vm_id,
            auto_delete=True,
            also_claimed=plan.claimed,
        )
        plan.port_ids.append(port_id)
        plan.claimed.update(guards.claims)
        plan.parts.extend([guards, port_write_guards(port_id, port)])


async def create_vm(store: Store, caller: Caller, request: VmCreate) -> VmRecord:
    """Makes the VM and its ports, all or nothing; the scheduler then binds it to a host.

    Raises:
        NotFound: the flavor, image, a key pair, network, subnet, port or security
            group does not exist (for the caller).
        InvalidInput: the request does not hold together (too many NICs, user data too
            large, a port given twice, an address outside its subnet).
        Conflict: the name is taken, a port is in use, a fixed address is taken
            (AddressInUse), a subnet is full (NoFreeAddress).
        QuotaExceeded: the project has no room for it.
    """
    records = Records(store)
    _, flavor = await records.get(Kind.FLAVOR, FlavorRecord, caller, request.flavor)
    image_kv, image = await find_image(store, caller, request.image)
    asked_keys = [request.key_name] if request.key_name else []
    key_names = list(dict.fromkeys([*asked_keys, *request.key_names]))
    await check_keys(store, caller.project, key_names)
    # Checked after the lookups: a request naming what does not exist is a 404 first.
    nics = len(request.networks) + len(request.ports)
    if nics > MAX_NICS:
        raise InvalidInput(
            f"a VM has at most {MAX_NICS} NICs; this one asks for {nics}",
            hint="give fewer networks or ports",
        )
    user_data_bytes = len(request.user_data.encode()) if request.user_data else 0
    if user_data_bytes > MAX_USER_DATA_BYTES:
        raise InvalidInput(
            f"user_data is {user_data_bytes} bytes; at most {MAX_USER_DATA_BYTES} are allowed",
            hint="shrink it, or fetch the rest from inside the VM",
        )
    usage = Usage(vms=1, vcpus=flavor.vcpus, memory_mb=flavor.memory_mb)
    await check_room(store, caller.project, usage)
    vm_id = new_id(IdKind.VM)
    for _ in range(RACE_ATTEMPTS):
        plan = _Plan()
        await _take_ports(store, caller, vm_id, request.ports, plan)
        await _new_ports(store, caller, vm_id, request, plan)
        spec = VmSpec(
            name=request.name,
            flavor=Flavor(
                name=flavor.name,
                vcpus=flavor.vcpus,
                memory_mb=flavor.memory_mb,
                disk_gb=flavor.disk_gb,
            ),
            image=image.id,
            ports=plan.port_ids,
            key_names=key_names,
            user_data=request.user_data,
            power_state=request.power_state,
            restart_policy=request.restart_policy,
            autostart=request.autostart,
            cpu_weight=request.cpu_weight,
            vnc=request.vnc,
            host_labels=request.host_labels,
            anti_affinity_group=request.anti_affinity_group,
            storage_pool=request.storage_pool,
            ha=request.ha,
        )
        record = VmRecord(id=vm_id, project=caller.project, spec=spec, created_at=now())
        guards = merge_guards(
            *plan.parts,
            # The image must still exist when the VM is written, and a delete of it that
            # looked for its users before this commits fails.
            takes_reference(image_kv, image.id, vm_id),
            Guards(names=name_guard(Kind.VM, caller.project, request.name, vm_id), usage=usage),
        )
        if not await raced(store, guards, records.create(caller, Kind.VM, vm_id, record, guards)):
            return record
    raise Conflict("the VM's ports kept losing their addresses to other requests", hint="try again")


async def host_allocation_update(store: Store, record: VmRecord) -> Guards:
    """Keeps the scheduler's books right after a resize: the VM's entry in its host's
    allocations takes the new size (with compare-and-swap on the allocations record)."""
    host = record.spec.host
    if host is None:
        return Guards()
    kv = await store.get(host_allocations_key(host))
    allocations = read_allocations(kv)
    if kv is None or record.id not in allocations.vms:
        return Guards()
    updated = HostAllocations(vms={**allocations.vms, record.id: allocation_of(record)})
    return Guards(compares=[Compare.unchanged(kv)], operations=[Put(kv.key, updated.to_json())])


# -- deleting ---------------------------------------------------------------------------


async def _held_guard(store: Store, key: str, owner: str) -> Guards:
    """Releases the guard `key` when `owner` holds it (and only then)."""
    kv = await store.get(key)
    if kv is None or kv.value != owner:
        return Guards()
    return Guards(compares=[Compare.unchanged(kv)], operations=[Delete(key)])


async def _ports_release(store: Store, record: VmRecord) -> list[Guards]:
    """Deletes the ports made for the VM (with their claims) and frees the others."""
    parts: list[Guards] = []
    for port_id in record.spec.ports:
        key = resource_key(Kind.PORT, port_id)
        kv = await store.get(key)
        if kv is None:
            continue
        port = PortRecord.from_json(kv.value)
        if port.spec.vm != record.id:
            continue
        if port.spec.auto_delete:
            parts.append(
                Guards(
                    compares=[Compare.unchanged(kv)],
                    operations=[Delete(key), Delete(status_key(Kind.PORT, port_id))],
                )
            )
            parts.append(release_port_guards(port))
            parts.extend(await _floating_ips_unbound(store, port))
        else:
            freed = port.model_copy(update={"spec": port.spec.model_copy(update={"vm": None})})
            parts.append(
                Guards(compares=[Compare.unchanged(kv)], operations=[Put(key, freed.to_json())])
            )
    return parts


async def _floating_ips_unbound(store: Store, port: PortRecord) -> list[Guards]:
    """Floating IPs pointing at `port` (about to be deleted) point nowhere, in the same
    transaction, with their association claims released."""
    parts: list[Guards] = []
    for address in port.spec.ipv4:
        claim = await store.get(association_claim_key(port.id, str(address)))
        if claim is None or not isinstance(claim.value, str):
            continue
        fip_kv = await store.get(resource_key(Kind.FLOATING_IP, claim.value))
        operations: list[TxnOperation] = [Delete(claim.key)]
        compares = [Compare.unchanged(claim)]
        if fip_kv is not None:
            fip = FloatingIpRecord.from_json(fip_kv.value)
            spec = fip.spec.model_copy(update={"port": None, "fixed_ip": None})
            unbound = fip.model_copy(update={"spec": spec})
            operations.append(Put(fip_kv.key, unbound.to_json()))
            compares.append(Compare.unchanged(fip_kv))
        parts.append(Guards(compares=compares, operations=operations))
    return parts


def usage_of(record: VmRecord) -> Usage:
    flavor = record.spec.flavor
    return Usage(vms=1, vcpus=flavor.vcpus, memory_mb=flavor.memory_mb)


async def delete_vm(store: Store, caller: Caller, ref: str) -> VmRecord:
    """Deletes the VM: marked `deleting` for its host's agent to tear down, or, when no
    host holds it, removed now with the ports made for it. Its quota, name and volumes
    are free at once. Returns the record as deleted (`deleting` true).

    Raises:
        NotFound: no such VM. Conflict: it kept changing meanwhile.
    """
    records = Records(store)
    for _ in range(CAS_ATTEMPTS):
        kv, record = await read_vm(store, caller, ref)
        if record.deleting:
            return record
        parts = [
            Guards(freed=usage_of(record)),
            await _held_guard(
                store, name_key(Kind.VM, record.project, record.spec.name), record.id
            ),
            *[
                await _held_guard(store, attachment_claim(volume_id), record.id)
                for volume_id in record.spec.volumes
            ],
        ]
        marked = record.model_copy(update={"deleting": True})
        if record.spec.host is None:
            # No agent will ever look at it: it goes now, with what was made for it.
            parts.extend(await _ports_release(store, record))
            done = await records.remove(caller, kv, merge_guards(*parts))
        else:
            done = await records.replace(caller, kv, marked, merge_guards(*parts))
        if done is not None:
            return marked
    raise Conflict(f"VM {ref} kept changing while it was being deleted", hint="try again")
