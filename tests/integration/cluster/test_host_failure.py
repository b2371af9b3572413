"""Host failure on three lab hosts with a shared storage pool and the scheduler: a killed
host is down within 10 s, its plain VM goes to error(host-down), its ha VM is bound to
another host, and h1's fencer (which outlives its agent) kills the old QEMU while h1 is
still cut off, so the new host starts it at the same address; h1 comes back and adopts
the VM it kept.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import pytest

from nubes.model.host import HostLiveness, HostStatus
from nubes.store.keys import Kind, status_key
from tests.support.cluster_lab import ClusterLab, cluster_for_test
from tests.support.network_lab import BOOT_TIMEOUT, NETWORK_SETTINGS, NetLab, boot

pytestmark = pytest.mark.integration

OPEN = [
    {"direction": "ingress", "protocol": "icmp"},
    {"direction": "ingress", "protocol": "tcp", "port_min": 22, "port_max": 22},
    {"direction": "egress"},
]
CIDR = "198.18.40.0/24"


@pytest.fixture
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[ClusterLab]:
    async with cluster_for_test(
        request, hosts=3, shared_pool=True, scheduler=True, agent_settings=NETWORK_SETTINGS
    ) as lab:
        yield lab


async def host_status(lab: ClusterLab, host: str) -> HostStatus | None:
    kv = await lab.db.get(status_key(Kind.HOST, host))
    return None if kv is None else HostStatus.from_json(kv.value)


async def eventually(check: object, *, timeout: float, what: str) -> float:
    """Seconds until the async `check()` held."""
    assert callable(check)
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout, f"{what} did not happen in {timeout} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_a_killed_host_is_down_and_its_ha_vm_comes_back_elsewhere_at_the_same_address(
    cluster: ClusterLab,
) -> None:
    lab = cluster
    net = NetLab(lab)  # type: ignore[arg-type]
    await net.keypair()
    group = await net.security_group(OPEN)
    vpc = await net.network()
    subnet = await net.subnet(vpc, CIDR)
    ha_port, plain_port, pinger_port = [
        await net.port(subnet, security_groups=[group], address=f"198.18.40.{10 + i}")
        for i in range(3)
    ]
    ha = await boot(net, "ha", [ha_port], host="h1", ha=True, storage_pool="shared")
    plain = await boot(net, "plain", [plain_port], host="h1")
    pinger = await boot(net, "pinger", [pinger_port], host="h3")
    for vm_id, host in ((ha, "h1"), (plain, "h1"), (pinger, "h3")):
        await lab.wait_vm(vm_id, "running", host=host, timeout=BOOT_TIMEOUT)
    await lab.wait_serial("h3", pinger, "ssh-ready", timeout=BOOT_TIMEOUT)
    shared_root = lab.shared_pool / "vms" / ha / "root.qcow2"  # type: ignore[operator]
    assert shared_root.exists()
    old_qemu = lab.qemu_pids("h1")[ha]

    # h1 dies: its agent is killed and its underlay goes down (its QEMUs stay, cut off).
    plain_mark = lab.mark(plain)
    h1 = lab.host("h1")
    lab.stop_agent(h1, signal.SIGKILL)
    lab.cut(h1)

    async def h1_down() -> bool:
        status = await host_status(lab, "h1")
        return status is not None and status.state is HostLiveness.DOWN

    took = await eventually(h1_down, timeout=10, what="h1 marked down")
    print(f"h1 down {took:.2f} s after the kill (heartbeat TTL 4 s)")
    await lab.wait_for(
        plain,
        lambda v: (
            isinstance(v, dict)
            and v.get("state") == "error"
            and str(v.get("reason")).startswith("host-down: host h1 stopped answering at ")
        ),
        since=plain_mark,
        timeout=10,
        what="error(host-down)",
    )

    async def ha_moved() -> bool:
        return (await lab.vm_record(ha)).spec.host not in (None, "h1")

    await eventually(ha_moved, timeout=10, what="the ha VM bound elsewhere")
    new_host = (await lab.vm_record(ha)).spec.host
    assert new_host is not None

    # h1 is still cut off and has no agent: its fencer (a process of its own) sees the VM
    # bound elsewhere and kills the old QEMU, which lets go of the shared disk, so the new
    # host starts the VM while h1 is still away.
    async def old_qemu_fenced() -> bool:
        return ha not in lab.qemu_pids("h1")

    took = await eventually(old_qemu_fenced, timeout=10, what="h1's fencer ending the old QEMU")
    print(f"old QEMU {old_qemu} fenced {took:.2f} s after the move")
    assert "fenced " + ha in (h1.state_dir / "fence.log").read_text()
    assert shared_root.exists()
    await lab.wait_vm(ha, "running", host=new_host, timeout=BOOT_TIMEOUT)
    await lab.wait_serial(new_host, ha, "ssh-ready", timeout=BOOT_TIMEOUT)
    assert plain in lab.qemu_pids("h1")  # bound to h1 still: the fencer leaves it be
    ha_ip = ha_port.spec.ipv4[0]
    answered = net.ssh(
        lab.vpc_netns(vpc, "h3"),
        pinger_port.spec.ipv4[0],
        f"ping -c 3 -W 2 {ha_ip} >/dev/null && echo reached",
    )
    assert answered.stdout.split() == ["reached"], answered.stderr

    # h1 comes back: the store decides, h1 obeys. The moved VM stays where it runs and its
    # shared disk stays; h1 adopts the VM it kept.
    lab.mend(h1)
    lab.start_agent(h1)
    await lab.wait_host_alive(h1)
    await lab.wait_vm(plain, "running", host="h1", since=plain_mark, timeout=30)

    async def h1_up() -> bool:
        status = await host_status(lab, "h1")
        return status is not None and status.state is HostLiveness.UP

    await eventually(h1_up, timeout=10, what="h1 marked up again")
    assert (await lab.vm_record(ha)).spec.host == new_host

    # Same address, same identity (metadata gave it its hostname), on its new host: from
    # inside the pinger VM on h3, and over SSH on the new host.
    answered = net.ssh(
        lab.vpc_netns(vpc, "h3"),
        pinger_port.spec.ipv4[0],
        f"ping -c 3 -W 2 {ha_ip} >/dev/null && echo reached",
    )
    assert answered.stdout.split() == ["reached"], answered.stderr
    login = net.ssh(lab.vpc_netns(vpc, new_host), ha_ip, "hostname")
    assert (login.returncode, login.stdout.strip()) == (0, "ha"), login.stderr
    assert ha not in lab.qemu_pids("h1")
