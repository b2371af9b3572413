"""The store side of a VM's move between hosts: its progress record, and the two
transactions that end a move: the switch to the target, or the rollback to the source.

Both are guarded by compare-and-swap on the VM record and carry the request they end, so
a move ends once, whichever agent gets there first.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from nubes.agent.network import names
from nubes.errors import NubesError
from nubes.model.common import now
from nubes.model.migration import MigrationRequest, MigrationState, MigrationStatus
from nubes.model.network import LinkState, PortStatus
from nubes.model.vm import VmRecord
from nubes.scheduler.binding import HostAllocations, allocation_of, read_allocations
from nubes.store.base import Compare, KeyValue, Put, Store, TxnOperation
from nubes.store.keys import (
    Kind,
    host_allocations_key,
    migration_key,
    resource_key,
    status_key,
)

log = logging.getLogger(__name__)

TXN_ATTEMPTS = 20


async def read_progress(store: Store, vm_id: str) -> tuple[KeyValue | None, MigrationStatus | None]:
    kv = await store.get(migration_key(vm_id))
    if kv is None:
        return None, None
    try:
        return kv, MigrationStatus.from_json(kv.value)
    except NubesError:
        return kv, None


async def update_progress(
    store: Store, vm_id: str, counter: int, **changes: Any
) -> MigrationStatus | None:
    """Changes the progress of request `counter` (CAS); None when it is not that request's
    or it has finished."""
    for _ in range(TXN_ATTEMPTS):
        kv, progress = await read_progress(store, vm_id)
        if kv is None or progress is None or progress.counter != counter:
            return None
        if progress.state.finished:
            return None
        updated = progress.model_copy(update={**changes, "updated_at": now()})
        result = await store.txn([Compare.unchanged(kv)], [Put(kv.key, updated.to_json())])
        if result.succeeded:
            return updated
    return None


async def _port_statuses(store: Store, record: VmRecord, host: str) -> list[TxnOperation]:
    """The ports of the VM active on `host`: written with the switch (or the rollback), so
    the overlay's forwarding follows the VM in the same transaction."""
    operations: list[TxnOperation] = []
    for port_id in record.spec.ports:
        if await store.get(resource_key(Kind.PORT, port_id)) is None:
            continue
        status = PortStatus(
            state=LinkState.ACTIVE,
            host=host,
            vm=record.id,
            device=names.tap_name(port_id),
            updated_at=now(),
        )
        operations.append(Put(status_key(Kind.PORT, port_id), status.to_json()))
    return operations


async def switch_host(store: Store, vm_id: str, request: MigrationRequest, **progress: Any) -> bool:
    """Binds the VM to the target, in one transaction with the hosts' allocations, the
    ports' statuses and the progress record; False when the request is no longer there.
    """
    for _ in range(TXN_ATTEMPTS):
        kv = await store.get(resource_key(Kind.VM, vm_id))
        if kv is None:
            return False
        record = VmRecord.from_json(kv.value)
        if record.spec.migration != request or record.deleting:
            return False
        compares = [Compare.unchanged(kv)]
        operations: list[TxnOperation] = []
        for host, keep in ((request.source, False), (request.target, True)):
            allocations_kv = await store.get(host_allocations_key(host))
            allocations = read_allocations(allocations_kv)
            vms = dict(allocations.vms)
            if keep:
                vms[vm_id] = allocation_of(record)
            else:
                vms.pop(vm_id, None)
            key = host_allocations_key(host)
            compares.append(
                Compare.absent(key) if allocations_kv is None else Compare.unchanged(allocations_kv)
            )
            operations.append(Put(key, HostAllocations(vms=vms).to_json()))
        moved = record.model_copy(
            update={
                "spec": record.spec.model_copy(update={"host": request.target, "migration": None})
            }
        )
        operations.append(Put(kv.key, moved.to_json()))
        if request.live:
            operations += await _port_statuses(store, record, request.target)
        progress_kv, current = await read_progress(store, vm_id)
        if current is not None and current.counter == request.counter and progress_kv is not None:
            done = current.model_copy(
                update={**progress, "state": MigrationState.COMPLETED, "updated_at": now()}
            )
            compares.append(Compare.unchanged(progress_kv))
            operations.append(Put(progress_kv.key, done.to_json()))
        if (await store.txn(compares, operations)).succeeded:
            return True
    return False


async def roll_back(store: Store, vm_id: str, request: MigrationRequest, reason: str) -> bool:
    """Clears the request and the target's allocation, the VM staying on the source; False
    when the request is no longer there (switched, or rolled back by the other side)."""
    for _ in range(TXN_ATTEMPTS):
        kv = await store.get(resource_key(Kind.VM, vm_id))
        if kv is None:
            return False
        record = VmRecord.from_json(kv.value)
        if record.spec.migration != request:
            return False
        compares = [Compare.unchanged(kv)]
        kept = record.model_copy(
            update={"spec": record.spec.model_copy(update={"migration": None})}
        )
        operations: list[TxnOperation] = [Put(kv.key, kept.to_json())]
        allocations_kv = await store.get(host_allocations_key(request.target))
        allocations = read_allocations(allocations_kv)
        if allocations_kv is not None and vm_id in allocations.vms:
            vms = {v: a for v, a in allocations.vms.items() if v != vm_id}
            compares.append(Compare.unchanged(allocations_kv))
            operations.append(Put(allocations_kv.key, HostAllocations(vms=vms).to_json()))
        if request.live:
            # The target's network may have claimed the ports meanwhile: they stay here.
            operations += await _port_statuses(store, record, request.source)
        progress_kv, current = await read_progress(store, vm_id)
        if current is not None and current.counter == request.counter and progress_kv is not None:
            failed = current.model_copy(
                update={"state": MigrationState.FAILED, "reason": reason, "updated_at": now()}
            )
            compares.append(Compare.unchanged(progress_kv))
            operations.append(Put(progress_kv.key, failed.to_json()))
        if (await store.txn(compares, operations)).succeeded:
            log.warning("%s: migration to %s rolled back: %s", vm_id, request.target, reason)
            return True
    return False


async def note_resumed(store: Store, vm_id: str, counter: int, resumed_at: datetime) -> None:
    """The target adds when the guest ran again to a completed move's record."""
    for _ in range(TXN_ATTEMPTS):
        kv, progress = await read_progress(store, vm_id)
        if kv is None or progress is None or progress.counter != counter:
            return
        if progress.state is not MigrationState.COMPLETED or progress.resumed_at is not None:
            return
        noted = progress.model_copy(update={"resumed_at": resumed_at})
        if (await store.txn([Compare.unchanged(kv)], [Put(kv.key, noted.to_json())])).succeeded:
            return
