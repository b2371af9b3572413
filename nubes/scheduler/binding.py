"""Binding a VM to a host with compare-and-swap, so that two schedulers never double-book.

A host's allocations record lists the VMs bound to it with their sizes. A binding writes
the VM's `spec.host` and the host's allocations in one transaction guarded by both
records' revisions: of two schedulers placing on one host at once, one wins and the
other sees the host's new usage when it tries again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import Field

from nubes.errors import InvalidInput
from nubes.model.common import Model, now
from nubes.model.vm import VmRecord, VmState, VmStatus
from nubes.store.base import (
    MAX_TXN_OPERATIONS,
    Compare,
    Get,
    JsonValue,
    KeyValue,
    Put,
    Store,
)
from nubes.store.keys import Kind, host_allocations_key, resource_key, status_key


class Allocation(Model):
    vcpus: int
    memory_mb: int
    disk_gb: int
    anti_affinity_group: str | None = None


class HostAllocations(Model):
    vms: dict[str, Allocation] = Field(default_factory=dict)

    @property
    def vcpus(self) -> int:
        return sum(a.vcpus for a in self.vms.values())

    @property
    def memory_mb(self) -> int:
        return sum(a.memory_mb for a in self.vms.values())

    @property
    def disk_gb(self) -> int:
        return sum(a.disk_gb for a in self.vms.values())

    @property
    def groups(self) -> frozenset[str]:
        return frozenset(a.anti_affinity_group for a in self.vms.values() if a.anti_affinity_group)


def allocation_of(record: VmRecord) -> Allocation:
    flavor = record.spec.flavor
    return Allocation(
        vcpus=flavor.vcpus,
        memory_mb=flavor.memory_mb,
        disk_gb=flavor.disk_gb,
        anti_affinity_group=record.spec.anti_affinity_group,
    )


def read_allocations(kv: KeyValue | None) -> HostAllocations:
    return HostAllocations() if kv is None else HostAllocations.from_json(kv.value)


async def bind(
    store: Store,
    vm_kv: KeyValue,
    record: VmRecord,
    host: str,
    allocations_kv: KeyValue | None,
) -> KeyValue | None:
    """Binds `record` (read as `vm_kv`) to `host` (allocations read as `allocations_kv`)
    and returns the host's allocations as now stored; None when either record changed
    since it was read (read them again)."""
    allocations = read_allocations(allocations_kv)
    updated = HostAllocations(vms={**allocations.vms, record.id: allocation_of(record)})
    bound = record.model_copy(update={"spec": record.spec.model_copy(update={"host": host})})
    allocations_key = host_allocations_key(host)
    guard = (
        Compare.absent(allocations_key)
        if allocations_kv is None
        else Compare.unchanged(allocations_kv)
    )
    value = updated.to_json()
    result = await store.txn(
        [Compare.unchanged(vm_kv), guard],
        [Put(resource_key(Kind.VM, record.id), bound.to_json()), Put(allocations_key, value)],
    )
    if not result.succeeded:
        return None
    return KeyValue(
        key=allocations_key,
        value=value,
        create_revision=allocations_kv.create_revision if allocations_kv else result.revision,
        mod_revision=result.revision,
        version=(allocations_kv.version if allocations_kv else 0) + 1,
    )


async def release(store: Store, host: str, vm_ids: set[str]) -> bool:
    """Takes VMs that are gone (or moved) off a host's allocations, with CAS retries;
    False when other writers kept winning (a later resync tries again).

    Raises:
        InvalidInput: the host's allocations record is unreadable (left for a person).
    """
    key = host_allocations_key(host)
    for _ in range(20):
        kv = await store.get(key)
        allocations = read_allocations(kv)
        if kv is None or not vm_ids & allocations.vms.keys():
            return True
        kept = {v: a for v, a in allocations.vms.items() if v not in vm_ids}
        result = await store.txn(
            [Compare.unchanged(kv)], [Put(key, HostAllocations(vms=kept).to_json())]
        )
        if result.succeeded:
            return True
    return False


@dataclass(frozen=True)
class BatchOutcome:
    """What a batch of bindings came to. On failure `current` holds every compared key as
    the store has it now (None: absent), so the caller refreshes without reading again."""

    succeeded: bool
    revision: int
    current: dict[str, KeyValue | None]


def bound_document(vm_value: JsonValue, host: str) -> JsonValue:
    """A VM record's stored document with `spec.host` set: the record is otherwise the
    same, so it is patched as JSON instead of going through the model again."""
    return {**vm_value, "spec": {**vm_value["spec"], "host": host}}


async def bind_batch(
    store: Store,
    placements: Sequence[tuple[KeyValue, str]],
    allocations: Mapping[str, tuple[KeyValue | None, JsonValue]],
) -> BatchOutcome:
    """Binds each VM (read as its KeyValue) to its host and writes each touched host's
    new allocations record, all in one transaction guarded by every record read.

    `allocations` maps each host named in `placements` to (its allocations as read, the
    record to write, which already lists the VMs placed there).

    Raises:
        ValueError: the batch needs more than MAX_TXN_OPERATIONS writes.
    """
    if len(placements) + len(allocations) > MAX_TXN_OPERATIONS:
        raise ValueError(
            f"a batch of {len(placements)} VMs on {len(allocations)} hosts needs more than"
            f" {MAX_TXN_OPERATIONS} writes: bind fewer VMs at once"
        )
    compares: list[Compare] = []
    writes: list[Put] = []
    for vm_kv, host in placements:
        compares.append(Compare.unchanged(vm_kv))
        writes.append(Put(vm_kv.key, bound_document(vm_kv.value, host)))
    for host, (kv, document) in allocations.items():
        key = host_allocations_key(host)
        compares.append(Compare.absent(key) if kv is None else Compare.unchanged(kv))
        writes.append(Put(key, document))
    result = await store.txn(compares, writes, [Get(c.key) for c in compares])
    current: dict[str, KeyValue | None] = {}
    if not result.succeeded:
        for compare, response in zip(compares, result.responses, strict=True):
            found = response if isinstance(response, list) else []
            current[compare.key] = found[0] if found else None
    return BatchOutcome(result.succeeded, result.revision, current)


async def report_unschedulable(store: Store, vm_id: str, reason: str) -> None:
    """No agent owns a VM without a host, so the scheduler says why it has none (once
    per reason; a status an agent wrote, other than pending or error, is left alone)."""
    key = status_key(Kind.VM, vm_id)
    kv = await store.get(key)
    if kv is not None:
        try:
            current: VmStatus | None = VmStatus.from_json(kv.value)
        except InvalidInput:
            current = None
        if current is not None and current.reason == reason:
            return
        if current is not None and current.state not in (VmState.PENDING, VmState.ERROR):
            return
    status = VmStatus(state=VmState.ERROR, reason=reason, updated_at=now())
    guard = Compare.absent(key) if kv is None else Compare.unchanged(kv)
    await store.txn(
        [guard, Compare.version(resource_key(Kind.VM, vm_id), ">", 0)], [Put(key, status.to_json())]
    )
