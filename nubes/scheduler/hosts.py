"""The host monitor: a host whose lease-bound heartbeat vanished is `down`; its VMs go to
`error(host-down)`, or, when `ha` with every disk on a shared pool, to another host.

Every write is compare-and-swap and also checks that the host's `alive` key is still
absent, so two schedulers act once between them, a VM is never moved twice, and nothing
moves off a host whose heartbeat came back. Level-triggered: a resync redoes what a
crash or a lost race left undone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from nubes.errors import InvalidInput
from nubes.model.common import now
from nubes.model.host import HostLiveness, HostRecord, HostStatus
from nubes.model.vm import VmRecord, VmState, VmStatus
from nubes.model.volume import VolumeRecord
from nubes.scheduler.binding import HostAllocations, allocation_of, bound_document
from nubes.scheduler.filters import (
    HostState,
    Overcommit,
    PlacementRequest,
    explain,
    passing_hosts,
)
from nubes.scheduler.weighers import Strategy, best_host
from nubes.store.base import Compare, Delete, KeyValue, Put, Store, TxnOperation
from nubes.store.keys import (
    Kind,
    host_alive_key,
    host_allocations_key,
    host_stopped_key,
    kind_prefix,
    migration_key,
    resource_key,
    status_key,
)
from nubes.store.listing import range_all

log = logging.getLogger(__name__)
_RecordT = TypeVar("_RecordT", HostRecord, HostStatus, VmRecord, VmStatus, VolumeRecord)

HOST_DOWN = "host-down"
AGENT_STOPPED = "agent stopped"
LOCAL_POOL = "local"
CAS_ATTEMPTS = 8
_HOSTS = kind_prefix(Kind.HOST)


def host_down_reason(host: str, since: datetime) -> str:
    """The reason a VM of a down host carries (its prefix is what the monitor looks for)."""
    return f"{HOST_DOWN}: host {host} stopped answering at {since.strftime('%Y-%m-%dT%H:%M:%SZ')}"


@dataclass
class HostView:
    """One host as read from the store in one listing."""

    name: str
    record: HostRecord | None = None
    alive: bool = False
    stopped: bool = False  # its agent stopped cleanly; its fencer says the host runs on
    status_kv: KeyValue | None = None
    allocations_kv: KeyValue | None = None
    status: HostStatus | None = field(default=None)


@dataclass
class Evacuation:
    """What one pass over a down host did (for logs and tests)."""

    moved: dict[str, str] = field(default_factory=dict)  # VM id -> new host
    failed: dict[str, str] = field(default_factory=dict)  # VM id -> reason written


class HostMonitor:
    """Marks hosts up and down and deals with the VMs of the down ones."""

    def __init__(
        self,
        store: Store,
        overcommit: Overcommit | None = None,
        strategy: Strategy = Strategy.SPREAD,
    ) -> None:
        self.store = store
        self.overcommit = overcommit or Overcommit()
        self.strategy = strategy

    async def sweep(self) -> dict[str, Evacuation]:
        """Looks at every host: writes its status, and evacuates those that are down.

        Raises:
            StoreError: the store cannot be reached.
        """
        done = {}
        for name, view in (await self._read_hosts()).items():
            evacuation = await self._check(view)
            if evacuation is not None:
                done[name] = evacuation
        return done

    async def check_host(self, name: str) -> Evacuation | None:
        """Looks at one host (its heartbeat changed); the evacuation when it is down.

        Raises:
            StoreError: the store cannot be reached.
        """
        record_kv = await self.store.get(resource_key(Kind.HOST, name))
        if record_kv is None:
            return None
        view = HostView(name, record=_parse(HostRecord, record_kv))
        for kv in (await self.store.range(f"{record_kv.key}/")).kvs:
            _take(view, kv.key.rpartition("/")[2], kv)
        return await self._check(view)

    # -- one host -----------------------------------------------------------------------

    async def _check(self, view: HostView) -> Evacuation | None:
        if view.record is None:
            return None  # a host without a record was never registered or is being removed
        status = view.status
        if view.alive:
            # No status reads as up: only a host that was down is told it is up again.
            if status is not None and status.state is not HostLiveness.UP:
                await self._write_status(view, HostStatus(state=HostLiveness.UP, since=now()))
                log.info("host %s is up", view.name)
            return None
        if view.stopped:
            # A clean agent stop is not a host failure: the VMs run on, the next agent
            # adopts them. Should the host die meanwhile, its fencer stops renewing the
            # `stopped` key and the next pass evacuates.
            if status is None or status.state is not HostLiveness.DOWN or not _stopped(status):
                stopped = HostStatus(state=HostLiveness.DOWN, since=now(), reason=AGENT_STOPPED)
                if await self._write_status(view, stopped):
                    log.info("host %s: its agent stopped; its VMs are left running", view.name)
            return None
        if status is None or status.state is not HostLiveness.DOWN or _stopped(status):
            moment = now()
            down = HostStatus(
                state=HostLiveness.DOWN,
                since=moment,
                reason=f"its heartbeat (lease-bound alive key) expired at {moment.isoformat()}",
            )
            if await self._write_status(view, down, stopped=False):
                log.warning("host %s is down", view.name)
                status = down
            else:
                status = await self._read_status(view.name)  # another scheduler wrote it
                if status is None or status.state is not HostLiveness.DOWN or _stopped(status):
                    return None  # it came back, or its agent stopped cleanly, meanwhile
        return await self.evacuate(view.name, status.since)

    async def _write_status(
        self, view: HostView, status: HostStatus, *, stopped: bool | None = None
    ) -> bool:
        key = status_key(Kind.HOST, view.name)
        guard = Compare.absent(key) if view.status_kv is None else Compare.unchanged(view.status_kv)
        alive = host_alive_key(view.name)
        liveness = (
            Compare.version(alive, ">", 0)
            if status.state is HostLiveness.UP
            else Compare.absent(alive)
        )
        compares = [guard, liveness]
        stopped_key = host_stopped_key(view.name)
        if stopped is None:
            stopped = view.stopped and status.state is HostLiveness.DOWN
        if status.state is HostLiveness.DOWN:
            compares.append(
                Compare.version(stopped_key, ">", 0) if stopped else Compare.absent(stopped_key)
            )
        result = await self.store.txn(compares, [Put(key, status.to_json())])
        return result.succeeded

    async def _read_status(self, name: str) -> HostStatus | None:
        kv = await self.store.get(status_key(Kind.HOST, name))
        return None if kv is None else _parse(HostStatus, kv)

    # -- the VMs of a down host ---------------------------------------------------------

    async def evacuate(self, host: str, since: datetime) -> Evacuation:
        """Deals with every VM bound to the down `host`: moves the `ha` ones whose disks
        are all on shared pools, and puts the others in error(host-down).

        Raises:
            StoreError: the store cannot be reached.
        """
        outcome = Evacuation()
        vm_ids = await self._bound_to(host)
        hosts: dict[str, HostView] | None = None
        for vm_id in vm_ids:
            for _ in range(CAS_ATTEMPTS):
                if hosts is None:
                    hosts = await self._read_hosts()
                done = await self._deal_with(host, since, vm_id, hosts, outcome)
                if done:
                    break
                hosts = None  # lost a race: read again
            else:
                log.warning(
                    "host %s: gave up on %s for now; the next resync tries again", host, vm_id
                )
        return outcome

    async def _bound_to(self, host: str) -> list[str]:
        """The VMs the host's allocations list, and those whose spec names it without an
        allocation (bound by hand): a down host is rare, so every VM is read."""
        found: set[str] = set()
        kv = await self.store.get(host_allocations_key(host))
        if kv is not None:
            try:
                found.update(HostAllocations.from_json(kv.value).vms)
            except InvalidInput as error:
                log.error("host %s: allocations unreadable: %s", host, error)
        prefix = kind_prefix(Kind.VM)
        for vm_kv in (await range_all(self.store, prefix)).kvs:
            vm_id = vm_kv.key[len(prefix) :]
            spec = vm_kv.value.get("spec") if isinstance(vm_kv.value, dict) else None
            if "/" not in vm_id and isinstance(spec, dict) and spec.get("host") == host:
                found.add(vm_id)
        return sorted(found)

    async def _deal_with(
        self,
        host: str,
        since: datetime,
        vm_id: str,
        hosts: dict[str, HostView],
        outcome: Evacuation,
    ) -> bool:
        """One attempt; False when a compare failed (read again and retry)."""
        vm_kv = await self.store.get(resource_key(Kind.VM, vm_id))
        if vm_kv is None:
            return True  # deleted: the janitor releases its allocation
        record = _parse(VmRecord, vm_kv)
        if record is None or record.spec.host != host or record.deleting:
            return True
        status_kv = await self.store.get(status_key(Kind.VM, vm_id))
        status = None if status_kv is None else _parse(VmStatus, status_kv)
        reason = host_down_reason(host, since)
        volumes, local_disk = await self._volumes_of(record)
        if record.spec.ha and local_disk is None:
            needed = {record.spec.storage_pool, *(v[1].spec.pool for v in volumes)}
            target, why_not = self._choose(record, host, needed, hosts)
            if target is not None:
                moved = await self._move(
                    record, vm_kv, status, status_kv, volumes, host, target, reason
                )
                if moved:
                    outcome.moved[vm_id] = target.name
                    log.warning(
                        "%s: host %s is down; restarting it on %s", vm_id, host, target.name
                    )
                return moved
            reason += f"; not restarted elsewhere: {why_not}"
        elif record.spec.ha:
            reason += f"; not restarted elsewhere: {local_disk} is on the host's local pool"
        if status is not None and status.state is VmState.ERROR and status.reason == reason:
            return True
        written = await self._write_error(record, vm_kv, status, status_kv, host, reason)
        if written:
            outcome.failed[vm_id] = reason
        return written

    async def _volumes_of(
        self, record: VmRecord
    ) -> tuple[list[tuple[KeyValue, VolumeRecord]], str | None]:
        """The VM's volumes as read, and the first disk on a local pool (None: all shared)."""
        local = "its root disk" if record.spec.storage_pool == LOCAL_POOL else None
        volumes = []
        for volume_id in record.spec.volumes:
            kv = await self.store.get(resource_key(Kind.VOLUME, volume_id))
            volume = None if kv is None else _parse(VolumeRecord, kv)
            if kv is None or volume is None:
                local = local or f"volume {volume_id} (missing or unreadable)"
                continue
            if volume.spec.pool == LOCAL_POOL:
                local = local or f"volume {volume_id}"
            volumes.append((kv, volume))
        return volumes, local

    def _choose(
        self, record: VmRecord, dead: str, pools: set[str], hosts: dict[str, HostView]
    ) -> tuple[HostView | None, str]:
        """The host the scheduler's filters and weigher pick among those that mount every
        pool the VM needs; else (None, why)."""
        spec = record.spec
        request = PlacementRequest.of(spec)
        shared = pools - {LOCAL_POOL}
        states = []
        lacking = 0
        for view in hosts.values():
            if view.record is None or view.name == dead:
                continue
            if not shared <= set(view.record.storage_pools):
                lacking += view.alive
                continue
            states.append(_state(view))
        passing, refused = passing_hosts(states, request, self.overcommit)
        chosen = best_host(passing, request, self.overcommit, self.strategy)
        if chosen is not None:
            return hosts[chosen.name], ""
        if lacking and not states:
            return None, f"no live host mounts storage pool(s) {', '.join(sorted(shared))}"
        return None, explain(refused, request)

    async def _move(
        self,
        record: VmRecord,
        vm_kv: KeyValue,
        status: VmStatus | None,
        status_kv: KeyValue | None,
        volumes: list[tuple[KeyValue, VolumeRecord]],
        dead: str,
        target: HostView,
        reason: str,
    ) -> bool:
        """Binds the VM (and its volumes) to `target` and moves its allocation, in one
        transaction; the target's agent starts it with the same ports and disks."""
        dead_key, target_key = host_allocations_key(dead), host_allocations_key(target.name)
        dead_kv = await self.store.get(dead_key)
        dead_allocations = (
            HostAllocations() if dead_kv is None else HostAllocations.from_json(dead_kv.value)
        )
        target_allocations = (
            HostAllocations()
            if target.allocations_kv is None
            else HostAllocations.from_json(target.allocations_kv.value)
        )
        kept = {v: a for v, a in dead_allocations.vms.items() if v != record.id}
        added = {**target_allocations.vms, record.id: allocation_of(record)}
        restarted = VmStatus(
            state=VmState.SCHEDULED,
            reason=f"{reason}; restarting on host {target.name}",
            host=target.name,
            flavor=status.flavor if status is not None else None,
            restarts=status.restarts if status is not None else 0,
            updated_at=now(),
        )
        vm_status_key = status_key(Kind.VM, record.id)
        compares = [
            Compare.unchanged(vm_kv),
            Compare.absent(vm_status_key) if status_kv is None else Compare.unchanged(status_kv),
            Compare.absent(dead_key) if dead_kv is None else Compare.unchanged(dead_kv),
            Compare.absent(target_key)
            if target.allocations_kv is None
            else Compare.unchanged(target.allocations_kv),
            Compare.absent(host_alive_key(dead)),
            Compare.absent(host_stopped_key(dead)),
            Compare.version(host_alive_key(target.name), ">", 0),
        ]
        moved_vm = bound_document(vm_kv.value, target.name)
        writes: list[TxnOperation] = [
            Put(vm_kv.key, moved_vm),
            Put(vm_status_key, restarted.to_json()),
            Put(target_key, HostAllocations(vms=added).to_json()),
        ]
        if dead_kv is not None:
            writes.append(Put(dead_key, HostAllocations(vms=kept).to_json()))
        migration = record.spec.migration
        if migration is not None:
            # A move the dead host was making ends with it: no request left to act on, and
            # no booking left on its target (unless that is where the VM goes now).
            writes[0] = Put(
                vm_kv.key, {**moved_vm, "spec": {**moved_vm["spec"], "migration": None}}
            )
            writes.append(Delete(migration_key(record.id)))
            booked = migration.target
            if booked not in (target.name, dead):
                booked_key = host_allocations_key(booked)
                booked_kv = await self.store.get(booked_key)
                if booked_kv is not None:
                    booking = HostAllocations.from_json(booked_kv.value)
                    left = {v: a for v, a in booking.vms.items() if v != record.id}
                    compares.append(Compare.unchanged(booked_kv))
                    writes.append(Put(booked_key, HostAllocations(vms=left).to_json()))
        for volume_kv, volume in volumes:
            compares.append(Compare.unchanged(volume_kv))
            moved = volume.spec.model_copy(update={"host": target.name})
            writes.append(Put(volume_kv.key, volume.model_copy(update={"spec": moved}).to_json()))
        result = await self.store.txn(compares, writes)
        return result.succeeded

    async def _write_error(
        self,
        record: VmRecord,
        vm_kv: KeyValue,
        status: VmStatus | None,
        status_kv: KeyValue | None,
        dead: str,
        reason: str,
    ) -> bool:
        """Puts the VM in error for its down host's agent, which cannot (CAS on the status)."""
        fields: dict[str, object] = status.model_dump() if status is not None else {}
        fields.update(
            state=VmState.ERROR,
            reason=reason,
            host=dead,
            pid=None,
            qemu_status=None,
            updated_at=now(),
        )
        new = VmStatus.model_validate(fields)
        key = status_key(Kind.VM, record.id)
        result = await self.store.txn(
            [
                Compare.unchanged(vm_kv),
                Compare.absent(key) if status_kv is None else Compare.unchanged(status_kv),
                Compare.absent(host_alive_key(dead)),
                Compare.absent(host_stopped_key(dead)),
            ],
            [Put(key, new.to_json())],
        )
        return result.succeeded

    # -- reading ------------------------------------------------------------------------

    async def _read_hosts(self) -> dict[str, HostView]:
        views: dict[str, HostView] = {}
        for kv in (await range_all(self.store, _HOSTS)).kvs:
            name, _, rest = kv.key[len(_HOSTS) :].partition("/")
            _take(views.setdefault(name, HostView(name)), rest, kv)
        return views


def _take(view: HostView, part: str, kv: KeyValue) -> None:
    """Puts one of a host's keys (`part`: "" for its record) into its view."""
    if part == "":
        view.record = _parse(HostRecord, kv)
    elif part == "alive":
        view.alive = True
    elif part == "stopped":
        view.stopped = True
    elif part == "status":
        view.status_kv, view.status = kv, _parse(HostStatus, kv)
    elif part == "allocations":
        view.allocations_kv = kv


def _stopped(status: HostStatus) -> bool:
    return status.state is HostLiveness.DOWN and status.reason == AGENT_STOPPED


def _state(view: HostView) -> HostState:
    assert view.record is not None
    try:
        allocations = (
            HostAllocations()
            if view.allocations_kv is None
            else HostAllocations.from_json(view.allocations_kv.value)
        )
    except InvalidInput:  # unreadable: the daemon does not place there either
        return HostState(name=view.name, alive=False, capacity=view.record.capacity)
    return HostState(
        name=view.name,
        alive=view.alive,
        capacity=view.record.capacity,
        labels=view.record.labels,
        used_vcpus=allocations.vcpus,
        used_memory_mb=allocations.memory_mb,
        used_disk_gb=allocations.disk_gb,
        anti_affinity_groups=allocations.groups,
    )


def _parse(model: type[_RecordT], kv: KeyValue) -> _RecordT | None:
    try:
        return model.from_json(kv.value)
    except InvalidInput:
        log.error("%s is not a valid record; left alone", kv.key)
        return None
