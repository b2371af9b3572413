"""Live migration between lab hosts: a running tiny VM moves while it is pinged every
100 ms; and a move whose target fails rolls back with the VM still running at home.

The move is asked for as the API asks for it (`nubes.api.migrations.start_migration`,
its writes applied in one transaction), on a real etcd cluster with real agents.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest

import nubes.api.routes  # noqa: F401 - loads the API modules in their order (vmops <-> routes)
from nubes.api.migrations import VmMigrate, start_migration
from nubes.config import SchedulerConfig
from nubes.model.common import now
from nubes.model.migration import MigrationRequest, MigrationState, MigrationStatus
from nubes.model.network import PortRecord
from nubes.model.vm import VmStatus
from nubes.scheduler.binding import read_allocations
from nubes.store.base import Compare, Put
from nubes.store.keys import Kind, host_allocations_key, migration_key, status_key
from tests.support.cluster_lab import ClusterLab, cluster_for_test
from tests.support.network_lab import BOOT_TIMEOUT, NETWORK_SETTINGS, NetLab, boot

pytestmark = pytest.mark.integration

OPEN: list[dict[str, Any]] = [
    {"direction": "ingress", "protocol": "icmp"},
    {"direction": "ingress", "protocol": "tcp", "port_min": 22, "port_max": 22},
    {"direction": "egress"},
]
CIDR = "198.18.40.0/24"
MAX_LOST_PINGS = 3
PING_SECONDS = 15


@pytest.fixture
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[ClusterLab]:
    async with cluster_for_test(
        request, hosts=3, shared_pool=True, agent_settings=NETWORK_SETTINGS
    ) as lab:
        yield lab


async def ask_migration(
    lab: ClusterLab, vm_id: str, host: str | None, *, live: bool = True
) -> MigrationStatus:
    """What `POST /v1/vms/{vm}/migrate` does, on the lab's store."""
    kv = await lab.db.get(f"/nubes/vms/{vm_id}")
    assert kv is not None
    record = (await lab.vm_record(vm_id)).model_copy()
    status_kv = await lab.db.get(status_key(Kind.VM, vm_id))
    status = None if status_kv is None else VmStatus.from_json(status_kv.value)
    moving, guards = await start_migration(
        lab.db, record, status, VmMigrate(host=host, live=live), SchedulerConfig()
    )
    result = await lab.db.txn(
        [Compare.unchanged(kv), *guards.compares],
        [Put(kv.key, moving.to_json()), *guards.operations],
    )
    assert result.succeeded
    progress = await lab.db.get(migration_key(vm_id))
    assert progress is not None
    return MigrationStatus.from_json(progress.value)


async def two_vms(
    lab: ClusterLab, pool: str = "shared"
) -> tuple[NetLab, PortRecord, str, PortRecord, str]:
    """A VM on h1 (its disk on the shared pool) and a neighbour on h3, both booted; and
    the VPC's id."""
    net = NetLab(lab)  # type: ignore[arg-type]
    await net.keypair()
    group = await net.security_group(OPEN)
    vpc = await net.network()
    subnet = await net.subnet(vpc, CIDR)
    port = await net.port(subnet, security_groups=[group])
    neighbour_port = await net.port(subnet, security_groups=[group])
    vm = await boot(net, "mover", [port], host="h1", storage_pool=pool, soft_stop_timeout=0)
    neighbour = await boot(net, "neighbour", [neighbour_port], host="h3")
    for vm_id, host in ((vm, "h1"), (neighbour, "h3")):
        await lab.wait_vm(vm_id, "running", host=host, timeout=BOOT_TIMEOUT)
        await lab.wait_serial(host, vm_id, "ssh-ready", timeout=BOOT_TIMEOUT)
    return net, port, vm, neighbour_port, vpc


async def uptime(net: NetLab, netns: str, address: object) -> float:
    """The guest's uptime over SSH (tried for a while: the forwarding across hosts of a
    just-booted VM may still be on its way)."""
    for _ in range(10):
        answer = await asyncio.to_thread(net.ssh, netns, address, "cat /proc/uptime", timeout=10)
        if answer.returncode == 0:
            return float(answer.stdout.split()[0])
        await asyncio.sleep(1.0)
    raise AssertionError(f"no SSH to {address} from {netns}: {answer.stderr}")


async def test_a_running_vm_moves_live_while_pinged_and_keeps_its_uptime(
    cluster: ClusterLab,
) -> None:
    net, port, vm, neighbour_port, vpc = await two_vms(cluster)
    address = port.spec.ipv4[0]
    # SSH goes from the VPC's namespace on the VM's own host: a namespace answers for the
    # subnet's gateway address on every host, so a reply would not find its way back to
    # a namespace on another host. The pings go from VM to VM, across hosts.
    before = await uptime(net, cluster.vpc_netns(vpc, "h1"), address)
    old_pid = cluster.qemu_pids("h1")[vm]

    pinger = neighbour_port.spec.ipv4[0]
    command = f"ping -q -i 0.1 -w {PING_SECONDS} {address}"
    pinging = asyncio.create_task(
        asyncio.to_thread(
            net.ssh, cluster.vpc_netns(vpc, "h3"), pinger, command, timeout=PING_SECONDS + 20
        )
    )
    try:
        await asyncio.sleep(3.0)
        since = cluster.mark(f"{vm}/migration")
        asked = await ask_migration(cluster, vm, "h2")
        assert (asked.source, asked.target, asked.state) == ("h1", "h2", "preparing")
        done = await cluster.wait_for(
            f"{vm}/migration",
            lambda v: isinstance(v, dict) and v.get("state") in ("completed", "failed"),
            since=since,
            timeout=120,
        )
        assert done["state"] == "completed", done
        await cluster.wait_vm(vm, "running", host="h2", timeout=30)
    finally:
        answer = await pinging
    output = answer.stdout + answer.stderr
    sent, received = _ping_counts(output)
    print(f"\npings: {sent} sent, {received} answered; QEMU downtime {done['downtime_ms']} ms")
    assert sent >= 20
    assert sent - received <= MAX_LOST_PINGS, output[-2000:]

    # The same guest, still counting: not rebooted, now answering from h2.
    after = await uptime(net, cluster.vpc_netns(vpc, "h2"), address)
    assert after > before
    record = await cluster.vm_record(vm)
    assert (record.spec.host, record.spec.migration) == ("h2", None)
    assert vm in cluster.qemu_pids("h2")
    for _ in range(100):
        if vm not in cluster.qemu_pids("h1"):
            break
        await asyncio.sleep(0.1)
    assert vm not in cluster.qemu_pids("h1"), f"old QEMU {old_pid} still runs on h1"
    port_status = await cluster.current_status(Kind.PORT, port.id)
    assert (port_status["state"], port_status["host"]) == ("active", "h2")
    h1 = read_allocations(await cluster.db.get(host_allocations_key("h1")))
    h2 = read_allocations(await cluster.db.get(host_allocations_key("h2")))
    assert vm not in h1.vms
    assert vm in h2.vms


async def test_a_move_whose_target_fails_rolls_back_with_the_vm_running_at_home(
    cluster: ClusterLab,
) -> None:
    net, port, vm, _, vpc = await two_vms(cluster)
    address = port.spec.ipv4[0]
    old_pid = cluster.qemu_pids("h1")[vm]
    since = cluster.mark(f"{vm}/migration")
    await ask_migration(cluster, vm, "h2")
    # The target's incoming QEMU dies as soon as it is ready (a crash of the target).
    await cluster.wait_for(
        f"{vm}/migration",
        lambda v: isinstance(v, dict) and v.get("state") in ("ready", "failed"),
        since=since,
        timeout=60,
    )
    pids = cluster.qemu_pids("h2")
    if vm in pids:
        os.kill(pids[vm], signal.SIGKILL)  # a QEMU this test's lab started
    failed = await cluster.wait_for(
        f"{vm}/migration",
        lambda v: isinstance(v, dict) and v.get("state") in ("completed", "failed"),
        since=since,
        timeout=60,
    )
    assert failed["state"] == "failed", failed
    print(f"\nrolled back: {failed['reason']}")
    assert failed["reason"]
    await cluster.wait_vm(vm, "running", host="h1", timeout=30)
    record = await cluster.vm_record(vm)
    assert (record.spec.host, record.spec.migration) == ("h1", None)
    assert cluster.qemu_pids("h1").get(vm) == old_pid
    for _ in range(100):
        if vm not in cluster.qemu_pids("h2"):
            break
        await asyncio.sleep(0.1)
    assert vm not in cluster.qemu_pids("h2")
    assert vm not in read_allocations(await cluster.db.get(host_allocations_key("h2"))).vms
    port_status = await cluster.current_status(Kind.PORT, port.id)
    assert (port_status["state"], port_status["host"]) == ("active", "h1")
    answer = net.ssh(cluster.vpc_netns(vpc, "h1"), address, "hostname")
    assert (answer.returncode, answer.stdout.strip()) == (0, "mover"), answer.stderr


async def test_a_stopped_vm_moves_with_its_local_disk_and_boots_with_its_data(
    cluster: ClusterLab,
) -> None:
    net, port, vm, _, vpc = await two_vms(cluster, pool="local")
    address = port.spec.ipv4[0]
    written = net.ssh(
        cluster.vpc_netns(vpc, "h1"), address, "echo kept-$$ > /root/marker; sync; cat /root/marker"
    )
    assert written.returncode == 0, written.stderr
    marker = written.stdout.strip()
    status_since = cluster.mark(vm)
    await cluster.update_vm(vm, power_state="stopped")
    await cluster.wait_vm(vm, "stopped", host="h1", since=status_since, timeout=60)
    source_files = cluster.host("h1").state_dir / "vms" / vm

    since = cluster.mark(f"{vm}/migration")
    await ask_migration(cluster, vm, "h2", live=False)
    done = await cluster.wait_for(
        f"{vm}/migration",
        lambda v: isinstance(v, dict) and v.get("state") in ("completed", "failed"),
        since=since,
        timeout=120,
    )
    assert done["state"] == "completed", done
    assert done["transferred_bytes"] == done["total_bytes"] > 0
    record = await cluster.vm_record(vm)
    assert (record.spec.host, record.spec.migration) == ("h2", None)
    for _ in range(100):
        if not source_files.exists():
            break
        await asyncio.sleep(0.1)
    assert not source_files.exists(), "the source kept its copy"

    status_since = cluster.mark(vm)
    await cluster.update_vm(vm, power_state="running", start_counter=record.spec.start_counter + 1)
    await cluster.wait_vm(vm, "running", host="h2", since=status_since, timeout=BOOT_TIMEOUT)
    await cluster.wait_serial("h2", vm, "ssh-ready", timeout=BOOT_TIMEOUT)
    read = net.ssh(cluster.vpc_netns(vpc, "h2"), address, "cat /root/marker")
    assert (read.returncode, read.stdout.strip()) == (0, marker), read.stderr


async def test_agents_refuse_a_live_move_of_disks_the_hosts_do_not_share(
    cluster: ClusterLab,
) -> None:
    """Asked behind the API's back: the target's disk paths differ, the source refuses."""
    vm = await cluster.create_vm(host="h1")  # root disk on h1's local disk
    await cluster.wait_vm(vm, "running", host="h1", timeout=BOOT_TIMEOUT)
    pid = cluster.qemu_pids("h1")[vm]
    moment = now()
    request = MigrationRequest(target="h2", source="h1", live=True, counter=1)
    progress = MigrationStatus(
        counter=1,
        state=MigrationState.PREPARING,
        source="h1",
        target="h2",
        started_at=moment,
        updated_at=moment,
    )
    since = cluster.mark(f"{vm}/migration")
    await cluster.db.put(migration_key(vm), progress.to_json())
    await cluster.update_vm(vm, migration=request.to_json())
    failed = await cluster.wait_for(
        f"{vm}/migration",
        lambda v: isinstance(v, dict) and v.get("state") in ("completed", "failed"),
        since=since,
        timeout=60,
    )
    assert failed["state"] == "failed"
    assert "not on storage both hosts share" in failed["reason"]
    assert (await cluster.vm_record(vm)).spec.migration is None
    assert cluster.qemu_pids("h1").get(vm) == pid
    for _ in range(100):
        if vm not in cluster.qemu_pids("h2"):
            break
        await asyncio.sleep(0.1)
    assert vm not in cluster.qemu_pids("h2")


async def test_a_source_agent_killed_after_the_request_finishes_the_move_when_back(
    cluster: ClusterLab,
) -> None:
    """The request is in the store: the agent that comes back adopts its QEMU and goes on."""
    vm = await cluster.create_vm(host="h1", storage_pool="shared")
    await cluster.wait_vm(vm, "running", host="h1", timeout=BOOT_TIMEOUT)
    pid = cluster.qemu_pids("h1")[vm]
    source = cluster.host("h1")
    cluster.stop_agent(source, signal.SIGKILL)
    since = cluster.mark(f"{vm}/migration")
    await ask_migration(cluster, vm, "h2")
    await cluster.wait_for(
        f"{vm}/migration", lambda v: isinstance(v, dict) and v.get("state") == "ready", since=since
    )
    assert cluster.qemu_pids("h1").get(vm) == pid  # QEMU outlives its agent
    cluster.start_agent(source)
    done = await cluster.wait_for(
        f"{vm}/migration",
        lambda v: isinstance(v, dict) and v.get("state") in ("completed", "failed"),
        since=since,
        timeout=60,
    )
    assert done["state"] == "completed", done
    await cluster.wait_vm(vm, "running", host="h2", timeout=30)
    record = await cluster.vm_record(vm)
    assert (record.spec.host, record.spec.migration) == ("h2", None)


def _ping_counts(output: str) -> tuple[int, int]:
    found = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", output)
    assert found, output[-2000:]
    return int(found.group(1)), int(found.group(2))
