"""The scheduler against a real SQLite store: two schedulers at once never double-book."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from nubes.ids import IdKind, new_id
from nubes.model.common import now
from nubes.model.host import HostCapacity, HostRecord
from nubes.model.vm import Flavor, VmRecord, VmSpec, VmStatus
from nubes.scheduler.binding import HostAllocations
from nubes.scheduler.filters import Overcommit
from nubes.scheduler.loop import Scheduler
from nubes.store.keys import (
    Kind,
    host_alive_key,
    host_allocations_key,
    kind_prefix,
    resource_key,
    status_key,
)
from nubes.store.sqlite import SqliteStore

SMALL = Flavor(name="small", vcpus=1, memory_mb=1024, disk_gb=1)
HOST_SIZE = HostCapacity(vcpus=4, memory_mb=4096, disk_gb=100)


async def add_host(store: SqliteStore, name: str, *, alive: bool = True, **labels: str) -> None:
    record = HostRecord(
        name=name,
        capacity=HOST_SIZE,
        accel="tcg",
        labels=labels,
        agent_version="test",
        boot_id="b",
        started_at=now(),
    )
    await store.put(resource_key(Kind.HOST, name), record.to_json())
    if alive:
        await store.put(host_alive_key(name), {"since": "now"})


async def add_vm(store: SqliteStore, **spec: object) -> str:
    vm_id = new_id(IdKind.VM)
    fields: dict[str, object] = {"name": vm_id, "flavor": SMALL}
    fields.update(spec)
    record = VmRecord(id=vm_id, spec=VmSpec.model_validate(fields), created_at=now())
    await store.put(resource_key(Kind.VM, vm_id), record.to_json())
    return vm_id


async def bound_hosts(store: SqliteStore) -> dict[str, str | None]:
    found = {}
    for kv in (await store.range(kind_prefix(Kind.VM))).kvs:
        if kv.key.count("/") == 3:
            record = VmRecord.from_json(kv.value)
            found[record.id] = record.spec.host
    return found


async def test_two_schedulers_at_once_fill_hosts_exactly_and_bind_each_vm_once(
    tmp_path: Path,
) -> None:
    store = await SqliteStore.open(tmp_path / "nubes.db")
    try:
        for index in range(10):
            await add_host(store, f"host-{index}")
        vm_ids = [await add_vm(store) for _ in range(60)]
        one_to_one = Overcommit(cpu=1.0)
        first, second = (Scheduler(store, overcommit=one_to_one) for _ in range(2))
        # Each works through all pending VMs, from opposite ends, on its own snapshot:
        # they pick the same emptiest hosts for different VMs at the same moments.
        await first.refresh_hosts()
        await second.refresh_hosts()

        async def work(scheduler: Scheduler, order: list[str]) -> dict[str, str]:
            placed = {}
            for vm_id in order:
                kv = await store.get(resource_key(Kind.VM, vm_id))
                assert kv is not None
                record = VmRecord.from_json(kv.value)
                if record.spec.host is None:
                    host, _ = await scheduler.place(kv, record)
                    if host is not None:
                        placed[vm_id] = host
            return placed

        results = await asyncio.gather(work(first, vm_ids), work(second, vm_ids[::-1]))

        hosts = await bound_hosts(store)
        bound = {vm: host for vm, host in hosts.items() if host is not None}
        assert len(bound) == 40  # 10 hosts x 4 vCPUs, no overcommit
        assert Counter(bound.values()) == Counter({f"host-{i}": 4 for i in range(10)})
        # Each binding is claimed by exactly one scheduler and recorded on exactly one host.
        claimed = [vm for result in results for vm in result]
        assert sorted(claimed) == sorted(bound)
        recorded: list[str] = []
        for index in range(10):
            kv = await store.get(host_allocations_key(f"host-{index}"))
            assert kv is not None
            recorded += HostAllocations.from_json(kv.value).vms
        assert sorted(recorded) == sorted(bound)
        # A pass over what is left puts the other 20 in error, saying why.
        leftover = await first.schedule_pending()
        assert sorted(leftover.unschedulable) == sorted(set(vm_ids) - set(bound))
        for vm_id in set(vm_ids) - set(bound):
            kv = await store.get(status_key(Kind.VM, vm_id))
            assert kv is not None
            status = VmStatus.from_json(kv.value)
            assert status.state == "error"
            assert status.reason == (
                "no host can take this VM (1 vCPUs, 1024 MiB, 1 GB): 10 hosts: not enough vCPUs"
            )
    finally:
        await store.close()


async def test_dead_unlabelled_and_anti_affine_hosts_are_skipped(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "nubes.db")
    try:
        await add_host(store, "dead", alive=False, zone="a")
        await add_host(store, "zone-a", zone="a")
        await add_host(store, "zone-b", zone="b")
        web_1 = await add_vm(store, anti_affinity_group="web", host_labels={"zone": "a"})
        web_2 = await add_vm(store, anti_affinity_group="web", host_labels={"zone": "a"})
        other = await add_vm(store)
        result = await Scheduler(store).schedule_pending()
        assert result.bound[web_1] == "zone-a"
        assert web_2 in result.unschedulable
        assert "anti-affinity group web" in result.unschedulable[web_2]
        assert "down" in result.unschedulable[web_2]
        assert result.bound[other] == "zone-b"  # spread: the emptier host
    finally:
        await store.close()
