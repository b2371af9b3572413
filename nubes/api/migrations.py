"""Asking for a VM's move to another host: the checks, the choice of the target (the
scheduler's filters and weighers), and the writes that start it in one transaction.

The target's allocations take the VM at once (it is booked on both hosts while it
moves, as Nova does); the switch or the rollback takes it off one of them.
"""

from __future__ import annotations

from pydantic import Field

from nubes.api.records import Guards
from nubes.api.vmops import VmStateConflict, effective_state
from nubes.config import SchedulerConfig
from nubes.errors import Conflict, InvalidInput, NotFound
from nubes.model.common import Model, now
from nubes.model.host import HostRecord
from nubes.model.migration import (
    HOST_NAME_PATTERN,
    MigrationRequest,
    MigrationState,
    MigrationStatus,
)
from nubes.model.vm import PowerState, VmRecord, VmState, VmStatus
from nubes.scheduler.binding import HostAllocations, allocation_of, read_allocations
from nubes.scheduler.filters import (
    HostState,
    Overcommit,
    PlacementRequest,
    explain,
    passing_hosts,
)
from nubes.scheduler.weighers import Strategy, best_host
from nubes.store.base import Compare, KeyValue, Put, Store
from nubes.store.keys import (
    Kind,
    host_allocations_key,
    kind_prefix,
    migration_key,
)


class VmMigrate(Model):
    host: str | None = Field(
        default=None,
        pattern=HOST_NAME_PATTERN,
        description="the target host; when absent the scheduler's filters and weighers choose",
    )
    live: bool = Field(default=True, description="move it running (false: a stopped VM)")


class MigrationUnderWay(Conflict):
    code = "migration_in_progress"


class NoTargetHost(Conflict):
    code = "no_target_host"


def check_movable(record: VmRecord, status: VmStatus | None, live: bool) -> str:
    """The VM's current host, when it may move now.

    Raises:
        VmStateConflict: it is deleting, not placed, or not running (live) / not stopped.
        MigrationUnderWay: a move is already under way.
    """
    state = effective_state(record, status)
    if record.deleting:
        raise VmStateConflict(f"VM {record.id} is being deleted", hint="make a new one")
    if record.spec.migration is not None:
        raise MigrationUnderWay(
            f"VM {record.id} is already moving to host {record.spec.migration.target}",
            hint="wait for that move to end (`nubes vm show` shows its progress)",
        )
    if record.spec.host is None:
        raise VmStateConflict(
            f"VM {record.id} is not on a host yet", hint="wait until it is scheduled"
        )
    if live and (state is not VmState.RUNNING or record.spec.power_state is not PowerState.RUNNING):
        raise VmStateConflict(
            f"VM {record.id} is {state}: only a running VM moves live",
            hint="start it first, or move it stopped with live=false",
        )
    if not live and (state is not VmState.STOPPED or record.spec.power_state is PowerState.RUNNING):
        raise VmStateConflict(
            f"VM {record.id} is {state}: a cold move takes a stopped VM",
            hint="stop it first, or move it running with live=true",
        )
    return record.spec.host


def check_volumes(record: VmRecord) -> None:
    """A VM moves without volumes for now: a volume is bound to a host (`spec.host`), and
    the target's agent takes only volumes bound to it, which a move would have to rebind
    before its switch.

    Raises:
        InvalidInput: a volume is attached.
    """
    if record.spec.volumes:
        listed = ", ".join(record.spec.volumes)
        raise InvalidInput(
            f"VM {record.id} has volumes attached ({listed}); a move takes the VM without them",
            hint="detach the volumes, move the VM, and attach them again on a shared pool",
        )


async def host_states(store: Store) -> tuple[dict[str, HostState], dict[str, HostRecord]]:
    """Every registered host as the scheduler's filters see it."""
    listed = await store.range(kind_prefix(Kind.HOST))
    records: dict[str, HostRecord] = {}
    alive: set[str] = set()
    allocations: dict[str, KeyValue] = {}
    for kv in listed.kvs:
        parts = kv.key[len(kind_prefix(Kind.HOST)) :].split("/")
        if len(parts) == 1:
            try:
                records[parts[0]] = HostRecord.from_json(kv.value)
            except InvalidInput:
                continue
        elif parts[1:] == ["alive"]:
            alive.add(parts[0])
        elif parts[1:] == ["allocations"]:
            allocations[parts[0]] = kv
    states: dict[str, HostState] = {}
    for name, host in records.items():
        booked = read_allocations(allocations.get(name))
        states[name] = HostState(
            name=name,
            alive=name in alive,
            capacity=host.capacity,
            labels=host.labels,
            used_vcpus=booked.vcpus,
            used_memory_mb=booked.memory_mb,
            used_disk_gb=booked.disk_gb,
            anti_affinity_groups=booked.groups,
        )
    return states, records


def choose_target(
    record: VmRecord,
    source: str,
    wanted: str | None,
    states: dict[str, HostState],
    records: dict[str, HostRecord],
    config: SchedulerConfig,
) -> str:
    """The host the VM moves to: `wanted` if it can take it, else the best that can.

    Raises:
        InvalidInput: `wanted` is the VM's own host.
        NotFound: `wanted` is not a registered host.
        NoTargetHost: no host (or not `wanted`) can take the VM; the message says why.
    """
    spec = record.spec
    request = PlacementRequest.of(spec)
    overcommit = Overcommit.of(config)
    if wanted == source:
        raise InvalidInput(
            f"VM {record.id} is already on host {source}", hint="name another host, or none"
        )
    if wanted is not None and wanted not in states:
        raise NotFound(
            f"no host {wanted!r} is registered", hint="list hosts with `nubes host list`"
        )
    pool = spec.storage_pool
    candidates = [
        state
        for name, state in sorted(states.items())
        if name != source and (wanted is None or name == wanted)
    ]
    missing: list[str] = []
    if pool != "local":
        missing = [s.name for s in candidates if pool not in records[s.name].storage_pools]
        if wanted is not None and missing:
            raise NoTargetHost(
                f"host {wanted} does not mount storage pool {pool} of VM {record.id}",
                hint="choose a host that mounts the pool",
            )
        candidates = [s for s in candidates if s.name not in missing]
    passing, refused = passing_hosts(candidates, request, overcommit)
    if missing:
        refused[f"does not mount storage pool {pool}"] += len(missing)
    best = best_host(passing, request, overcommit, Strategy(config.strategy))
    if best is None:
        why = explain(refused, request) if refused else "no other host is registered"
        if wanted is not None:
            why = f"host {wanted} cannot take VM {record.id}: " + ", ".join(sorted(refused))
        raise NoTargetHost(why, hint="free room on a host, or add one")
    return best.name


async def start_migration(
    store: Store,
    record: VmRecord,
    status: VmStatus | None,
    body: VmMigrate,
    config: SchedulerConfig,
) -> tuple[VmRecord, Guards]:
    """The VM with `spec.migration` set, and the writes that go with it: the VM booked on
    the target, and a fresh progress record.

    Raises:
        NubesError: as `check_movable`, `check_volumes` and `choose_target`.
    """
    source = check_movable(record, status, body.live)
    if body.live and record.spec.storage_pool == "local":
        raise InvalidInput(
            f"VM {record.id} has its root disk on its host's local disk: a live move needs "
            "it on a storage pool both hosts share",
            hint="stop it and move it cold (live=false), or create it on a shared pool",
        )
    check_volumes(record)
    states, records = await host_states(store)
    target = choose_target(record, source, body.host, states, records, config)
    allocations_kv = await store.get(host_allocations_key(target))
    allocations = read_allocations(allocations_kv)
    booked = HostAllocations(vms={**allocations.vms, record.id: allocation_of(record)})
    progress_kv = await store.get(migration_key(record.id))
    counter = 1
    if progress_kv is not None:
        try:
            counter = MigrationStatus.from_json(progress_kv.value).counter + 1
        except InvalidInput:
            counter = progress_kv.version + 1
    request = MigrationRequest(target=target, source=source, live=body.live, counter=counter)
    moment = now()
    progress = MigrationStatus(
        counter=counter,
        state=MigrationState.PREPARING,
        live=body.live,
        source=source,
        target=target,
        started_at=moment,
        updated_at=moment,
    )
    allocations_key = host_allocations_key(target)
    guards = Guards(
        compares=[
            Compare.absent(allocations_key)
            if allocations_kv is None
            else Compare.unchanged(allocations_kv),
            Compare.absent(migration_key(record.id))
            if progress_kv is None
            else Compare.unchanged(progress_kv),
        ],
        operations=[
            Put(allocations_key, booked.to_json()),
            Put(migration_key(record.id), progress.to_json()),
        ],
    )
    moving = record.model_copy(
        update={"spec": record.spec.model_copy(update={"migration": request})}
    )
    return moving, guards


async def read_migration(store: Store, vm_id: str) -> MigrationStatus | None:
    """The progress of the VM's last move, if it ever moved."""
    kv = await store.get(migration_key(vm_id))
    if kv is None:
        return None
    try:
        return MigrationStatus.from_json(kv.value)
    except InvalidInput:
        return None
