"""Binding a VM to a host with compare-and-swap, so that two schedulers never double-book.

A host's allocations record lists the VMs bound to it with their sizes. A binding writes
the VM's `spec.host` and the host's allocations in one transaction guarded by both
records' revisions: of two schedulers placing on one host at once, one wins and the
other sees the host's new usage when it tries again.
"""

from __future__ import annotations

from pydantic import Field

from nubes.model.common import Model
from nubes.model.vm import VmRecord
from nubes.store.base import Compare, KeyValue, Put, Store
from nubes.store.keys import Kind, host_allocations_key, resource_key


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


async def release(store: Store, host: str, vm_ids: set[str]) -> None:
    """Takes VMs that are gone (or moved) off a host's allocations, with CAS retries."""
    key = host_allocations_key(host)
    for _ in range(20):
        kv = await store.get(key)
        allocations = read_allocations(kv)
        if kv is None or not vm_ids & allocations.vms.keys():
            return
        kept = {v: a for v, a in allocations.vms.items() if v not in vm_ids}
        result = await store.txn(
            [Compare.unchanged(kv)], [Put(key, HostAllocations(vms=kept).to_json())]
        )
        if result.succeeded:
            return
