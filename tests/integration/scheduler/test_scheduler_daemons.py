"""Two schedulers at once on a real store (SQLite, then etcd): one in this process, one
started as `nubes scheduler` would be. They bind every VM once, never overbook, put what
no host can take in error, bind it when room appears, and clean up after deletions."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from nubes.api.netops import address_claim_key, mac_claim_key, port_deletion_operations
from nubes.config import SchedulerConfig
from nubes.ids import IdKind, new_id
from nubes.model.common import now
from nubes.model.host import HostCapacity, HostRecord
from nubes.model.network import FloatingIpRecord, FloatingIpSpec, PortRecord, PortSpec
from nubes.model.vm import Flavor, VmRecord, VmSpec, VmStatus
from nubes.scheduler.binding import HostAllocations
from nubes.scheduler.daemon import SchedulerDaemon
from nubes.store import Put, Store
from nubes.store.etcd import EtcdStore
from nubes.store.keys import (
    Kind,
    host_alive_key,
    kind_prefix,
    resource_key,
    status_key,
)
from nubes.store.sqlite import SqliteStore
from tests.support.etcd import EtcdServer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
SMALL = Flavor(name="small", vcpus=1, memory_mb=512, disk_gb=1)
HOST_SIZE = HostCapacity(vcpus=4, memory_mb=8192, disk_gb=100)
HOSTS = 8
VMS = 40  # 32 fit on the 8 hosts (no CPU overcommit): 8 wait


@dataclass
class Cluster:
    store: Store
    prefix_env: dict[str, str]


@pytest.fixture(params=["sqlite", "etcd"])
async def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Cluster]:
    environment = {
        "NUBES_CONFIG": str(tmp_path / "nubes.toml"),
        "NUBES_STATE_DIR": str(tmp_path),
        "NUBES_SCHEDULER__CPU_OVERCOMMIT": "1",
        "NUBES_SCHEDULER__RESYNC_INTERVAL": "1",
    }
    (tmp_path / "nubes.toml").write_text("")
    store: Store
    if request.param == "etcd":
        server: EtcdServer = request.getfixturevalue("etcd_server")
        store = await EtcdStore.connect([server.endpoint], timeout=10)
        await store.delete("/nubes/", prefix=True)  # the session's etcd is shared
        environment |= {"NUBES_STORE__ENGINE": "etcd", "NUBES_STORE__ENDPOINTS": server.endpoint}
    else:
        store = await SqliteStore.open(tmp_path / "nubes.db", timeout=10)
        environment |= {"NUBES_STORE__PATH": str(tmp_path / "nubes.db")}
    yield Cluster(store, environment)
    await store.delete("/nubes/", prefix=True)
    await store.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.01)


async def add_host(store: Store, name: str) -> None:
    record = HostRecord(
        name=name,
        capacity=HOST_SIZE,
        accel="tcg",
        agent_version="test",
        boot_id="b",
        started_at=now(),
    )
    await store.txn(
        [],
        [Put(resource_key(Kind.HOST, name), record.to_json()), Put(host_alive_key(name), {})],
    )


async def add_vm(store: Store, ports: list[str] | None = None) -> str:
    vm_id = new_id(IdKind.VM)
    spec = VmSpec(name=vm_id, flavor=SMALL, ports=ports or [])
    record = VmRecord(id=vm_id, spec=spec, created_at=now())
    await store.put(resource_key(Kind.VM, vm_id), record.to_json())
    return vm_id


async def add_port(store: Store, vm_id: str, number: int, *, auto_delete: bool) -> str:
    port_id = new_id(IdKind.PORT)
    spec = PortSpec(
        network="vpc-aaaaaaaaaa",
        subnet="subnet-aaaaaaaaaa",
        mac=f"02:00:00:00:00:{number:02x}",
        fixed_ips=[f"198.18.0.{number}"],
        vm=vm_id,
        auto_delete=auto_delete,
    )
    record = PortRecord(id=port_id, spec=spec, created_at=now())
    claims = [
        address_claim_key(spec.subnet, spec.fixed_ips[0]),
        mac_claim_key(spec.network, spec.mac),
    ]
    await store.txn(
        [],
        [Put(resource_key(Kind.PORT, port_id), record.to_json())]
        + [Put(claim, port_id) for claim in claims],
    )
    return port_id


async def bindings(store: Store) -> dict[str, str | None]:
    found = {}
    for kv in (await store.range(kind_prefix(Kind.VM))).kvs:
        if kv.key.count("/") == 3:
            record = VmRecord.from_json(kv.value)
            found[record.id] = record.spec.host
    return found


async def allocations(store: Store) -> dict[str, HostAllocations]:
    found = {}
    for kv in (await store.range(kind_prefix(Kind.HOST))).kvs:
        if kv.key.endswith("/allocations"):
            found[kv.key.split("/")[3]] = HostAllocations.from_json(kv.value)
    return found


async def check_consistent(store: Store) -> dict[str, str | None]:
    """Every bound VM is on its host's allocations and on no other; no host overbooked."""
    bound = await bindings(store)
    recorded: Counter[str] = Counter()
    for host, held in (await allocations(store)).items():
        assert held.vcpus <= HOST_SIZE.vcpus, f"{host} is overbooked"
        recorded.update(held.vms.keys())
        for vm_id in held.vms:
            assert bound.get(vm_id) == host, f"{vm_id} recorded on {host}"
    assert all(count == 1 for count in recorded.values())
    assert sorted(recorded) == sorted(vm for vm, host in bound.items() if host is not None)
    return bound


async def test_two_schedulers_bind_wait_retry_and_clean_up(cluster: Cluster) -> None:
    store = cluster.store
    for number in range(HOSTS):
        await add_host(store, f"host-{number}")
    other = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import typer; from nubes.cli.node import scheduler; typer.run(scheduler)",
        cwd=REPO,
        env={**os.environ, **cluster.prefix_env},
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert other.stderr is not None
    started = b""
    while b"scheduler: 8 hosts" not in started:  # its first listing is in: it is running
        started = await asyncio.wait_for(other.stderr.readline(), 20)
        assert started, "the scheduler process ended at start"
    stop = asyncio.Event()
    daemon = SchedulerDaemon(
        store,
        SchedulerConfig(cpu_overcommit=1, resync_interval=1),
        port_deletion=port_deletion_operations,  # as `nubes scheduler` does
    )
    ours = asyncio.create_task(daemon.run(stop))
    try:
        await asyncio.wait_for(daemon.ready.wait(), 10)
        # The VM to delete later has a port made for it (with a floating IP) and one kept.
        doomed = new_id(IdKind.VM)
        made = await add_port(store, doomed, 10, auto_delete=True)
        kept = await add_port(store, doomed, 11, auto_delete=False)
        fip_id = new_id(IdKind.FLOATING_IP)
        fip = FloatingIpRecord(
            id=fip_id,
            spec=FloatingIpSpec(
                network="vpc-bbbbbbbbbb", address="198.19.0.5", port=made, fixed_ip="198.18.0.10"
            ),
            created_at=now(),
        )
        await store.put(resource_key(Kind.FLOATING_IP, fip_id), fip.to_json())
        spec = VmSpec(name="doomed", flavor=SMALL, ports=[made, kept])
        record = VmRecord(id=doomed, spec=spec, created_at=now())
        await store.put(resource_key(Kind.VM, doomed), record.to_json())
        await asyncio.sleep(0.2)  # bound first, while every host has room
        vm_ids = [doomed] + [await add_vm(store) for _ in range(VMS - 1)]

        async def settled() -> bool:
            bound = await bindings(store)
            unbound = [vm for vm in vm_ids if bound.get(vm) is None]
            reasons = [await store.get(status_key(Kind.VM, vm)) for vm in unbound]
            return len(unbound) == VMS - HOSTS * HOST_SIZE.vcpus and None not in reasons

        await eventually(settled)
        bound = await check_consistent(store)
        assert bound[doomed] is not None
        waiting = sorted(vm for vm in vm_ids if bound[vm] is None)
        for vm_id in waiting:
            kv = await store.get(status_key(Kind.VM, vm_id))
            assert kv is not None
            status = VmStatus.from_json(kv.value)
            assert status.state == "error"
            assert status.reason == (
                "no host can take this VM (1 vCPUs, 512 MiB, 1 GB): 8 hosts: not enough vCPUs"
            )

        # A new host takes four of the waiting VMs.
        await add_host(store, "host-new")

        async def four_more() -> bool:
            bound = await bindings(store)
            return sum(bound[vm] is not None for vm in waiting) == 4

        await eventually(four_more)
        bound = await check_consistent(store)
        assert Counter(bound[vm] for vm in waiting)["host-new"] == 4

        # Deleting a VM record (as the agent does after teardown) frees its room, deletes
        # the port made for it, unplugs the other and unbinds the floating IP.
        await store.delete(resource_key(Kind.VM, doomed))

        async def cleaned() -> bool:
            kept_kv = await store.get(resource_key(Kind.PORT, kept))
            fip_kv = await store.get(resource_key(Kind.FLOATING_IP, fip_id))
            assert kept_kv is not None
            assert fip_kv is not None
            return (
                await store.get(resource_key(Kind.PORT, made)) is None
                and PortRecord.from_json(kept_kv.value).spec.vm is None
                and FloatingIpRecord.from_json(fip_kv.value).spec.port is None
                and all(doomed not in held.vms for held in (await allocations(store)).values())
            )

        await eventually(cleaned)
        # The port made for it took its address and MAC claims along; the other kept its.
        claims = (await store.range("/nubes/claims/")).kvs
        assert sorted(kv.value for kv in claims) == [kept, kept]

        async def freed_room_taken() -> bool:
            bound = await bindings(store)
            return sum(bound[vm] is not None for vm in waiting) == 5

        await eventually(freed_room_taken)
        await check_consistent(store)
    finally:
        stop.set()
        await asyncio.wait_for(ours, 10)
        if other.returncode is None:
            other.terminate()  # SIGTERM to our own child, by its PID
        try:
            _, errors = await asyncio.wait_for(other.communicate(), 10)
        except TimeoutError:
            other.kill()
            _, errors = await other.communicate()
    assert other.returncode == 0, errors.decode()[-2000:]
    assert b"scheduler: stopped; bound" in errors
    assert daemon.bound > 0
