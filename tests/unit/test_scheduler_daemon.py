"""The scheduler daemon and its janitor against a real SQLite store: watch-driven
binding, waiting VMs, cleanup after deletions, and recovery from a compacted watch."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from nubes.config import SchedulerConfig
from nubes.errors import CompactedError
from nubes.ids import IdKind, new_id
from nubes.model.common import now
from nubes.model.host import HostCapacity, HostRecord
from nubes.model.network import FloatingIpRecord, FloatingIpSpec, PortRecord, PortSpec
from nubes.model.vm import Flavor, VmRecord, VmSpec, VmStatus
from nubes.scheduler.binding import HostAllocations
from nubes.scheduler.daemon import SchedulerDaemon
from nubes.store.base import Put, Watch
from nubes.store.keys import (
    Kind,
    host_alive_key,
    host_allocations_key,
    resource_key,
    status_key,
)
from nubes.store.sqlite import SqliteStore

SMALL = Flavor(name="small", vcpus=1, memory_mb=1024, disk_gb=1)
BIG = Flavor(name="big", vcpus=8, memory_mb=8192, disk_gb=1)
HOST_SIZE = HostCapacity(vcpus=4, memory_mb=4096, disk_gb=100)
ONE_TO_ONE = SchedulerConfig(cpu_overcommit=1.0, resync_interval=0.3)
# The watches alone, no resync: what a test checks happens at once, not at the next pass.
WATCH_ONLY = SchedulerConfig(cpu_overcommit=1.0, resync_interval=3600)


async def add_host(store: SqliteStore, name: str, size: HostCapacity = HOST_SIZE) -> None:
    record = HostRecord(
        name=name,
        capacity=size,
        accel="tcg",
        agent_version="test",
        boot_id="b",
        started_at=now(),
    )
    await store.txn(
        [],
        [Put(resource_key(Kind.HOST, name), record.to_json()), Put(host_alive_key(name), {})],
    )


async def add_vm(store: SqliteStore, flavor: Flavor = SMALL, **spec: object) -> str:
    vm_id = new_id(IdKind.VM)
    fields: dict[str, object] = {"name": vm_id, "flavor": flavor, **spec}
    record = VmRecord(id=vm_id, spec=VmSpec.model_validate(fields), created_at=now())
    await store.put(resource_key(Kind.VM, vm_id), record.to_json())
    return vm_id


async def host_of(store: SqliteStore, vm_id: str) -> str | None:
    kv = await store.get(resource_key(Kind.VM, vm_id))
    assert kv is not None
    return VmRecord.from_json(kv.value).spec.host


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.005)


async def allocated(store: SqliteStore, host: str) -> set[str]:
    kv = await store.get(host_allocations_key(host))
    return set() if kv is None else set(HostAllocations.from_json(kv.value).vms)


@contextlib.asynccontextmanager
async def running(daemon: SchedulerDaemon) -> AsyncIterator[SchedulerDaemon]:
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await asyncio.wait_for(daemon.ready.wait(), 5)
        yield daemon
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "nubes.db")
    yield opened
    await opened.close()


async def test_a_new_vm_is_bound_within_milliseconds_of_its_record(store: SqliteStore) -> None:
    await add_host(store, "h1")
    async with running(SchedulerDaemon(store, ONE_TO_ONE)):
        started = time.monotonic()
        vm_id = await add_vm(store)

        async def bound() -> bool:
            return await host_of(store, vm_id) == "h1"

        await eventually(bound)
        assert time.monotonic() - started < 0.1
    assert await allocated(store, "h1") == {vm_id}


async def test_a_vm_no_host_can_take_waits_in_error_and_is_bound_when_a_host_appears(
    store: SqliteStore,
) -> None:
    await add_host(store, "small-host")
    async with running(SchedulerDaemon(store, WATCH_ONLY)):
        vm_id = await add_vm(store, BIG)

        async def in_error() -> bool:
            kv = await store.get(status_key(Kind.VM, vm_id))
            return kv is not None and VmStatus.from_json(kv.value).state == "error"

        await eventually(in_error)
        kv = await store.get(status_key(Kind.VM, vm_id))
        assert kv is not None
        assert VmStatus.from_json(kv.value).reason == (
            "no host can take this VM (8 vCPUs, 8192 MiB, 1 GB): 1 host: not enough vCPUs"
        )
        await add_host(store, "big-host", HostCapacity(vcpus=8, memory_mb=16384, disk_gb=10))

        async def bound() -> bool:
            return await host_of(store, vm_id) == "big-host"

        await eventually(bound)


async def test_a_freed_host_takes_a_waiting_vm(store: SqliteStore) -> None:
    await add_host(store, "h1")
    async with running(SchedulerDaemon(store, WATCH_ONLY)):
        first = [await add_vm(store) for _ in range(4)]
        waiting = await add_vm(store)

        async def reported() -> bool:
            return await store.get(status_key(Kind.VM, waiting)) is not None

        await eventually(reported)
        assert await host_of(store, waiting) is None
        await store.delete(resource_key(Kind.VM, first[0]))  # as the agent does

        async def bound() -> bool:
            return await host_of(store, waiting) == "h1"

        await eventually(bound)
        assert await allocated(store, "h1") == {*first[1:], waiting}


async def test_deleting_a_vm_releases_it_deletes_its_own_ports_and_unbinds_floating_ips(
    store: SqliteStore,
) -> None:
    await add_host(store, "h1")
    async with running(SchedulerDaemon(store, WATCH_ONLY)):
        vm_id = new_id(IdKind.VM)
        made, kept = new_id(IdKind.PORT), new_id(IdKind.PORT)
        for port_id, auto_delete in ((made, True), (kept, False)):
            spec = PortSpec(
                network="vpc-aaaaaaaaaa",
                subnet="subnet-aaaaaaaaaa",
                mac="02:00:00:00:00:0" + ("1" if auto_delete else "2"),
                fixed_ips=["198.18.0.10" if auto_delete else "198.18.0.11"],
                vm=vm_id,
                auto_delete=auto_delete,
            )
            port = PortRecord(id=port_id, spec=spec, created_at=now())
            await store.put(resource_key(Kind.PORT, port_id), port.to_json())
        fip_id = new_id(IdKind.FLOATING_IP)
        fip = FloatingIpRecord(
            id=fip_id,
            spec=FloatingIpSpec(
                network="vpc-bbbbbbbbbb", address="198.19.0.5", port=made, fixed_ip="198.18.0.10"
            ),
            created_at=now(),
        )
        await store.put(resource_key(Kind.FLOATING_IP, fip_id), fip.to_json())
        vm_spec = VmSpec(name="web", flavor=SMALL, ports=[made, kept])
        record = VmRecord(id=vm_id, spec=vm_spec, created_at=now())
        await store.put(resource_key(Kind.VM, vm_id), record.to_json())

        async def bound() -> bool:
            return await host_of(store, vm_id) == "h1"

        await eventually(bound)
        await store.delete(resource_key(Kind.VM, vm_id))

        async def cleaned() -> bool:
            fip_kv = await store.get(resource_key(Kind.FLOATING_IP, fip_id))
            kept_kv = await store.get(resource_key(Kind.PORT, kept))
            assert fip_kv is not None
            assert kept_kv is not None
            return (
                await allocated(store, "h1") == set()
                and await store.get(resource_key(Kind.PORT, made)) is None
                and PortRecord.from_json(kept_kv.value).spec.vm is None
                and FloatingIpRecord.from_json(fip_kv.value).spec.port is None
            )

        await eventually(cleaned)
        fip_kv = await store.get(resource_key(Kind.FLOATING_IP, fip_id))
        assert fip_kv is not None
        assert FloatingIpRecord.from_json(fip_kv.value).spec.fixed_ip is None


async def test_a_resync_releases_allocations_of_vms_that_no_longer_exist(
    store: SqliteStore,
) -> None:
    await add_host(store, "h1")
    ghost = {"vcpus": 4, "memory_mb": 4096, "disk_gb": 1, "anti_affinity_group": None}
    await store.put(host_allocations_key("h1"), {"vms": {"i-ghost00000": ghost}})
    async with running(SchedulerDaemon(store, ONE_TO_ONE)):

        async def released() -> bool:
            return await allocated(store, "h1") == set()

        await eventually(released)
        vm_id = await add_vm(store)  # the room is usable again

        async def bound() -> bool:
            return await host_of(store, vm_id) == "h1"

        await eventually(bound)


async def test_bad_records_are_skipped_and_a_vm_deleted_before_placement_goes(
    store: SqliteStore,
) -> None:
    await add_host(store, "h1")
    await store.put(resource_key(Kind.HOST, "broken"), {"name": 3})
    async with running(SchedulerDaemon(store, ONE_TO_ONE)):
        await store.put(resource_key(Kind.VM, "i-broken0000"), {"spec": "nonsense"})
        await store.put(resource_key(Kind.VM, "i-broken0001"), [1, 2])
        vm_id = await add_vm(store)

        async def bound() -> bool:
            return await host_of(store, vm_id) == "h1"

        await eventually(bound)
        doomed = await add_vm(store, BIG)  # no host can take it: it stays unbound
        kv = await store.get(resource_key(Kind.VM, doomed))
        assert kv is not None
        await store.put(kv.key, {**kv.value, "deleting": True})

        async def gone() -> bool:
            return await store.get(kv.key) is None

        await eventually(gone)


class CompactingOnce(SqliteStore):
    """A real store whose first VM watch reports compaction, as after a long outage."""

    compacted = False

    def watch(self, prefix: str, from_revision: int | None = None) -> Watch:
        if prefix == "/nubes/vms/" and not self.compacted:
            self.compacted = True
            raise CompactedError(from_revision or 0, from_revision or 0)
        return super().watch(prefix, from_revision)


async def test_a_compacted_watch_is_survived_by_listing_again(tmp_path: Path) -> None:
    store = await CompactingOnce.open(tmp_path / "nubes.db")
    try:
        await add_host(store, "h1")
        async with running(SchedulerDaemon(store, ONE_TO_ONE)):
            vm_id = await add_vm(store)

            async def bound() -> bool:
                return await host_of(store, vm_id) == "h1"

            await eventually(bound)
        assert isinstance(store, CompactingOnce)
        assert store.compacted
    finally:
        await store.close()


async def test_two_daemons_fill_hosts_exactly_and_bind_each_vm_once(tmp_path: Path) -> None:
    stores = [await SqliteStore.open(tmp_path / "nubes.db") for _ in range(2)]
    try:
        for index in range(10):
            await add_host(stores[0], f"h{index}")
        daemons = [SchedulerDaemon(s, ONE_TO_ONE, batch_size=8) for s in stores]
        async with running(daemons[0]), running(daemons[1]):
            vm_ids = [await add_vm(stores[index % 2]) for index in range(60)]

            async def settled() -> bool:
                hosts = [await host_of(stores[0], vm) for vm in vm_ids]
                unbound = [vm for vm, h in zip(vm_ids, hosts, strict=True) if h is None]
                statuses = [await stores[0].get(status_key(Kind.VM, vm)) for vm in unbound]
                return len(unbound) == 20 and None not in statuses

            await eventually(settled)
        hosts = {vm: await host_of(stores[0], vm) for vm in vm_ids}
        recorded = [vm for index in range(10) for vm in await allocated(stores[0], f"h{index}")]
        assert sorted(recorded) == sorted(vm for vm, host in hosts.items() if host)
        for index in range(10):
            assert len(await allocated(stores[0], f"h{index}")) == 4
        assert sum(d.bound for d in daemons) == 40
    finally:
        for opened in stores:
            await opened.close()
