"""The host monitor against a real SQLite store: a host without a heartbeat is down, its
plain VMs go to error(host-down), its ha VMs on shared pools move once to a live host."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nubes.config import SchedulerConfig
from nubes.ids import IdKind, new_id
from nubes.model.common import now
from nubes.model.host import HostCapacity, HostLiveness, HostRecord, HostStatus
from nubes.model.vm import Flavor, VmRecord, VmSpec, VmState, VmStatus
from nubes.model.volume import VolumeRecord, VolumeSpec
from nubes.scheduler.binding import HostAllocations, allocation_of
from nubes.scheduler.daemon import SchedulerDaemon
from nubes.scheduler.hosts import HostMonitor
from nubes.store.base import Put
from nubes.store.keys import (
    Kind,
    host_alive_key,
    host_allocations_key,
    resource_key,
    status_key,
)
from nubes.store.sqlite import SqliteStore

SMALL = Flavor(name="small", vcpus=1, memory_mb=1024, disk_gb=1)
HOST_SIZE = HostCapacity(vcpus=4, memory_mb=4096, disk_gb=100)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "nubes.db")
    yield opened
    await opened.close()


async def add_host(
    store: SqliteStore, name: str, *, alive: bool = True, pools: tuple[str, ...] = ("shared",)
) -> None:
    record = HostRecord(
        name=name,
        capacity=HOST_SIZE,
        accel="tcg",
        storage_pools=list(pools),
        agent_version="test",
        boot_id="b",
        started_at=now(),
    )
    await store.put(resource_key(Kind.HOST, name), record.to_json())
    if alive:
        await store.put(host_alive_key(name), {"since": "now"})


async def add_volume(store: SqliteStore, host: str, pool: str) -> str:
    volume_id = new_id(IdKind.VOLUME)
    spec = VolumeSpec(name=volume_id, size_gb=1, host=host, pool=pool)
    record = VolumeRecord(id=volume_id, spec=spec, created_at=now())
    await store.put(resource_key(Kind.VOLUME, volume_id), record.to_json())
    return volume_id


async def add_bound_vm(store: SqliteStore, host: str, **spec: object) -> str:
    """A VM bound to `host`, running there, as the scheduler and its agent left it."""
    vm_id = new_id(IdKind.VM)
    fields: dict[str, object] = {"name": vm_id, "flavor": SMALL, "host": host, **spec}
    record = VmRecord(id=vm_id, spec=VmSpec.model_validate(fields), created_at=now())
    key = host_allocations_key(host)
    kv = await store.get(key)
    allocations = HostAllocations() if kv is None else HostAllocations.from_json(kv.value)
    allocations = HostAllocations(vms={**allocations.vms, vm_id: allocation_of(record)})
    status = VmStatus(state=VmState.RUNNING, host=host, pid=42, flavor=SMALL, updated_at=now())
    await store.txn(
        [],
        [
            Put(resource_key(Kind.VM, vm_id), record.to_json()),
            Put(status_key(Kind.VM, vm_id), status.to_json()),
            Put(key, allocations.to_json()),
        ],
    )
    return vm_id


async def vm(store: SqliteStore, vm_id: str) -> tuple[VmRecord, VmStatus]:
    kv = await store.get(resource_key(Kind.VM, vm_id))
    status_kv = await store.get(status_key(Kind.VM, vm_id))
    assert kv is not None
    assert status_kv is not None
    return VmRecord.from_json(kv.value), VmStatus.from_json(status_kv.value)


async def allocated(store: SqliteStore, host: str) -> set[str]:
    kv = await store.get(host_allocations_key(host))
    return set() if kv is None else set(HostAllocations.from_json(kv.value).vms)


async def host_status(store: SqliteStore, host: str) -> HostStatus | None:
    kv = await store.get(status_key(Kind.HOST, host))
    return None if kv is None else HostStatus.from_json(kv.value)


async def test_a_host_without_heartbeat_is_down_and_its_plain_vm_goes_to_error_host_down(
    store: SqliteStore,
) -> None:
    await add_host(store, "h1")
    await add_host(store, "h2")
    vm_id = await add_bound_vm(store, "h1")
    await store.delete(host_alive_key("h1"))

    outcome = await HostMonitor(store).check_host("h1")

    assert outcome is not None
    assert outcome.moved == {}
    status = await host_status(store, "h1")
    assert status is not None
    assert status.state is HostLiveness.DOWN
    record, vm_status = await vm(store, vm_id)
    assert record.spec.host == "h1"  # not ha: it stays, for its agent to find
    assert vm_status.state is VmState.ERROR
    assert vm_status.reason is not None
    assert vm_status.reason.startswith("host-down: host h1 stopped answering at ")


async def test_an_ha_vm_on_shared_disks_moves_with_its_volume_and_allocation(
    store: SqliteStore,
) -> None:
    await add_host(store, "h1")
    await add_host(store, "h2")
    await add_host(store, "h3", pools=())  # does not mount the pool: never chosen
    volume_id = await add_volume(store, "h1", "shared")
    vm_id = await add_bound_vm(
        store, "h1", ha=True, storage_pool="shared", volumes=[volume_id], ports=["port-aaaaaaaaaa"]
    )
    await store.delete(host_alive_key("h1"))

    outcome = await HostMonitor(store).check_host("h1")

    assert outcome is not None
    assert outcome.moved == {vm_id: "h2"}
    record, status = await vm(store, vm_id)
    assert record.spec.host == "h2"
    assert record.spec.ports == ["port-aaaaaaaaaa"]
    assert status.state is VmState.SCHEDULED
    assert status.flavor == SMALL  # it ran before: the new host never makes a fresh disk
    assert await allocated(store, "h1") == set()
    assert await allocated(store, "h2") == {vm_id}
    volume_kv = await store.get(resource_key(Kind.VOLUME, volume_id))
    assert volume_kv is not None
    assert VolumeRecord.from_json(volume_kv.value).spec.host == "h2"


async def test_an_ha_vm_with_a_local_disk_is_not_moved_and_says_why(store: SqliteStore) -> None:
    await add_host(store, "h1")
    await add_host(store, "h2")
    volume_id = await add_volume(store, "h1", "local")
    vm_id = await add_bound_vm(store, "h1", ha=True, storage_pool="shared", volumes=[volume_id])
    await store.delete(host_alive_key("h1"))

    await HostMonitor(store).check_host("h1")

    record, status = await vm(store, vm_id)
    assert record.spec.host == "h1"
    assert status.state is VmState.ERROR
    assert f"volume {volume_id} is on the host's local pool" in (status.reason or "")


async def test_an_ha_vm_no_live_host_can_take_waits_in_error_and_moves_when_one_appears(
    store: SqliteStore,
) -> None:
    await add_host(store, "h1")
    await add_host(store, "h2", pools=())
    vm_id = await add_bound_vm(store, "h1", ha=True, storage_pool="shared")
    await store.delete(host_alive_key("h1"))
    monitor = HostMonitor(store)

    await monitor.check_host("h1")
    _, status = await vm(store, vm_id)
    assert status.state is VmState.ERROR
    assert "no live host mounts storage pool(s) shared" in (status.reason or "")

    await add_host(store, "h3")
    await monitor.sweep()  # the resync: level-triggered
    record, _ = await vm(store, vm_id)
    assert record.spec.host == "h3"


async def test_two_monitors_at_once_move_each_vm_exactly_once(store: SqliteStore) -> None:
    await add_host(store, "h1")
    await add_host(store, "h2")
    await add_host(store, "h3")
    vm_ids = [await add_bound_vm(store, "h1", ha=True, storage_pool="shared") for _ in range(6)]
    plain = await add_bound_vm(store, "h1")
    await store.delete(host_alive_key("h1"))

    first, second = await asyncio.gather(
        HostMonitor(store).check_host("h1"), HostMonitor(store).check_host("h1")
    )

    assert first is not None
    assert second is not None
    assert not set(first.moved) & set(second.moved)
    assert set(first.moved) | set(second.moved) == set(vm_ids)
    on_h2, on_h3 = await allocated(store, "h2"), await allocated(store, "h3")
    assert on_h2 | on_h3 == set(vm_ids)
    assert not on_h2 & on_h3
    assert await allocated(store, "h1") == {plain}
    for vm_id in vm_ids:
        record, _ = await vm(store, vm_id)
        assert record.spec.host in ("h2", "h3")


async def test_nothing_moves_off_a_host_whose_heartbeat_is_back(store: SqliteStore) -> None:
    await add_host(store, "h1")
    await add_host(store, "h2")
    vm_id = await add_bound_vm(store, "h1", ha=True, storage_pool="shared")

    outcome = await HostMonitor(store).evacuate("h1", now())  # raced: h1 is alive

    assert outcome.moved == {}
    assert outcome.failed == {}
    record, status = await vm(store, vm_id)
    assert record.spec.host == "h1"
    assert status.state is VmState.RUNNING


async def test_a_host_that_comes_back_is_up_and_its_vms_are_left_to_its_agent(
    store: SqliteStore,
) -> None:
    await add_host(store, "h1")
    vm_id = await add_bound_vm(store, "h1")
    await store.delete(host_alive_key("h1"))
    monitor = HostMonitor(store)
    await monitor.check_host("h1")

    await store.put(host_alive_key("h1"), {"since": "now"})
    await monitor.check_host("h1")

    status = await host_status(store, "h1")
    assert status is not None
    assert status.state is HostLiveness.UP
    record, vm_status = await vm(store, vm_id)
    assert record.spec.host == "h1"
    assert vm_status.state is VmState.ERROR


async def test_the_daemon_marks_a_host_down_as_soon_as_its_alive_key_goes(
    store: SqliteStore,
) -> None:
    await add_host(store, "h1")
    await add_host(store, "h2")
    vm_id = await add_bound_vm(store, "h1", ha=True, storage_pool="shared")
    daemon = SchedulerDaemon(store, SchedulerConfig(resync_interval=3600))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await asyncio.wait_for(daemon.ready.wait(), 5)
        started = time.monotonic()
        await store.delete(host_alive_key("h1"))
        while (record := (await vm(store, vm_id))[0]).spec.host != "h2":
            assert time.monotonic() - started < 2, "the ha VM was not moved"
            await asyncio.sleep(0.01)
        status = await host_status(store, "h1")
        assert status is not None
        assert status.state is HostLiveness.DOWN
        assert record.spec.host == "h2"
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_a_vm_bound_by_hand_without_an_allocation_is_dealt_with_too(
    store: SqliteStore,
) -> None:
    await add_host(store, "h1")
    await add_host(store, "h2")
    vm_id = new_id(IdKind.VM)
    spec = VmSpec(name="byhand", flavor=SMALL, host="h1", ha=True, storage_pool="shared")
    await store.put(
        resource_key(Kind.VM, vm_id),
        VmRecord(id=vm_id, spec=spec, created_at=now()).to_json(),
    )
    await store.delete(host_alive_key("h1"))

    outcome = await HostMonitor(store).check_host("h1")

    assert outcome is not None
    assert outcome.moved == {vm_id: "h2"}
    assert await allocated(store, "h2") == {vm_id}


async def test_an_ha_vm_moved_off_a_dead_host_mid_migration_leaves_no_request_or_booking(
    store: SqliteStore,
) -> None:
    """h1 died while moving the VM to h3: the VM restarts on h2, and the move is over."""
    from nubes.model.migration import MigrationRequest
    from nubes.store.keys import migration_key

    await add_host(store, "h1")
    await add_host(store, "h2")
    await add_host(store, "h3", pools=())  # cannot take it: no shared pool there
    request = MigrationRequest(target="h3", source="h1")
    vm_id = await add_bound_vm(store, "h1", ha=True, storage_pool="shared", migration=request)
    record, _ = await vm(store, vm_id)
    booking = HostAllocations(vms={vm_id: allocation_of(record)})
    await store.put(host_allocations_key("h3"), booking.to_json())
    await store.put(migration_key(vm_id), {"state": "running"})
    await store.delete(host_alive_key("h1"))

    outcome = await HostMonitor(store).check_host("h1")

    assert outcome is not None
    assert outcome.moved == {vm_id: "h2"}
    moved, _ = await vm(store, vm_id)
    assert (moved.spec.host, moved.spec.migration) == ("h2", None)
    assert await allocated(store, "h2") == {vm_id}
    assert await allocated(store, "h3") == set()
    assert await allocated(store, "h1") == set()
    assert await store.get(migration_key(vm_id)) is None
