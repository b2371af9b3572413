"""The overlay across hosts: three lab hosts (namespaces with their own underlay address and
agent) on a real etcd cluster, real VMs (tiny image, TCG), VXLANs programmed from the
store as Neutron's l2pop does. Entries are read back from the kernel with netlink.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator

import pytest

from nubes.agent.network import forwarding
from nubes.agent.network.names import bridge_name, vxlan_name
from nubes.agent.network.nsutil import netns_exists
from nubes.agent.network.overlay import ZERO_MAC, OverlayPlan
from nubes.model.common import now
from nubes.model.network import LinkState, PortStatus, SubnetRecord
from nubes.store.keys import Kind, status_key
from tests.support.cluster_lab import ClusterLab, cluster_for_test
from tests.support.network_lab import (
    BOOT_TIMEOUT,
    NETWORK_SETTINGS,
    NetLab,
    SubnetNamespace,
    boot,
    run,
)

pytestmark = pytest.mark.integration

OPEN = [
    {"direction": "ingress", "protocol": "icmp"},
    {"direction": "ingress", "protocol": "tcp", "port_min": 22, "port_max": 22},
    {"direction": "egress"},
]
CIDR = "198.18.30.0/24"  # both VPCs: the same addresses, kept apart by their VNIs


@pytest.fixture
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[ClusterLab]:
    async with cluster_for_test(request, hosts=3, agent_settings=NETWORK_SETTINGS) as lab:
        yield lab


async def overlay(lab: ClusterLab, vpc: str, host: str, subnet: SubnetRecord) -> OverlayPlan:
    return await forwarding.read_overlay(lab.vpc_netns(vpc, host), vxlan_name(subnet.id))


async def wait_overlay(
    lab: ClusterLab,
    vpc: str,
    host: str,
    subnet: SubnetRecord,
    check: object,
    *,
    timeout: float = 10.0,
) -> tuple[OverlayPlan, float]:
    """The entries once `check(plan)` holds, and how long after the call that was."""
    assert callable(check)
    started = time.monotonic()
    while True:
        plan = await overlay(lab, vpc, host, subnet)
        if check(plan):
            return plan, time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{vpc} on {host}: entries never matched; last {plan}")
        await asyncio.sleep(0.002)


async def probe(
    net: NetLab, lab: ClusterLab, subnet: SubnetRecord, host: str, address: str
) -> SubnetNamespace:
    """Another machine on `subnet`'s segment on `host`: a namespace on its bridge with the
    MAC and address of a port whose status says it is active there, as a VM's would."""
    port = await net.port(subnet, address=address)
    status = PortStatus(state=LinkState.ACTIVE, host=host, updated_at=now())
    await lab.db.put(status_key(Kind.PORT, port.id), status.to_json())
    machine = SubnetNamespace(lab.vpc_netns(subnet.spec.network, host), bridge_name(subnet.id))
    try:
        for argv in (
            ["ip", "-n", machine.netns, "link", "set", machine.link, "address", port.spec.mac],
            ["ip", "-n", machine.netns, "addr", "add", f"{address}/24", "dev", machine.link],
        ):
            completed = run(argv)
            assert completed.returncode == 0, completed.stderr
        others = [h for h in lab.hosts if h.name != host]
        for other in others:  # the other hosts' VXLANs learn of it from the store
            netns = lab.vpc_netns(subnet.spec.network, other)
            if netns_exists(netns):
                await wait_overlay(
                    lab, subnet.spec.network, other.name, subnet, lambda p: port.spec.mac in p.fdb
                )
    except BaseException:
        machine.close()
        raise
    return machine


async def test_vms_of_a_subnet_on_three_hosts_reach_each_other_apart_from_a_twin_vpc(
    cluster: ClusterLab,
) -> None:
    net = NetLab(cluster)  # type: ignore[arg-type]
    await net.keypair()
    group = await net.security_group(OPEN)
    red = await net.network(name="red")
    red_subnet = await net.subnet(red, CIDR)
    blue = await net.network(name="blue")
    blue_subnet = await net.subnet(blue, CIDR)
    red_ports = [
        await net.port(red_subnet, security_groups=[group], address=f"198.18.30.{11 + i}")
        for i in range(3)
    ]
    # Blue's only VM has the address of red's VM on h2, and lives on h3 next to red's third.
    blue_port = await net.port(blue_subnet, security_groups=[group], address="198.18.30.12")
    hosts = ["h1", "h2", "h3"]
    red_vms = [
        await boot(net, f"red-{i + 1}", [port], host=hosts[i]) for i, port in enumerate(red_ports)
    ]
    blue_vm = await boot(net, "blue-3", [blue_port], host="h3")
    for vm_id, host in [*zip(red_vms, hosts, strict=True), (blue_vm, "h3")]:
        await cluster.wait_vm(vm_id, "running", host=host, timeout=BOOT_TIMEOUT)
    for vm_id, host in [*zip(red_vms, hosts, strict=True), (blue_vm, "h3")]:
        await cluster.wait_serial(host, vm_id, "ssh-ready", timeout=BOOT_TIMEOUT)

    # l2pop: each host floods to the other two, and knows each remote port's MAC and address.
    underlay = {host.name: host.underlay for host in cluster.hosts}
    for index, host in enumerate(hosts):
        others = [i for i in range(3) if i != index]
        plan = await overlay(cluster, red, host, red_subnet)
        assert plan.flood == {underlay[hosts[i]] for i in others}
        assert plan.fdb == {red_ports[i].spec.mac: underlay[hosts[i]] for i in others}
        for i in others:
            assert plan.neighbours[red_ports[i].spec.ipv4[0]] == red_ports[i].spec.mac
        gateway = red_subnet.spec.gateway_v4
        assert gateway in plan.neighbours  # answered on this host, never across
    # Blue is on h3 only: its VXLAN floods nowhere.
    blue_plan = await overlay(cluster, blue, "h3", blue_subnet)
    assert (blue_plan.flood, blue_plan.fdb) == (frozenset(), {})

    # SSH across hosts, from a machine on red's segment on h1 to red-2 on h2 (the
    # namespace itself cannot be the client: its gateway address is on every host); and
    # from inside red-1, a ping to red-2 and red-3.
    ip = [port.spec.ipv4[0] for port in red_ports]
    with await probe(net, cluster, red_subnet, "h1", "198.18.30.21") as red_on_h1:
        login = net.ssh(red_on_h1.netns, ip[1], "hostname")
        assert (login.returncode, login.stdout.strip()) == (0, "red-2"), login.stderr
        inside = net.ssh(
            red_on_h1.netns,
            ip[0],
            f"ping -c 2 -W 2 {ip[1]} >/dev/null && ping -c 2 -W 2 {ip[2]} >/dev/null && echo ok",
        )
        assert inside.stdout.split() == ["ok"], inside.stderr

    # The twin VPC: on h3, where blue-3 has .12 in blue, red's .12 is red-2 on h2.
    with (
        await probe(net, cluster, red_subnet, "h3", "198.18.30.23") as red_on_h3,
        await probe(net, cluster, blue_subnet, "h3", "198.18.30.23") as blue_on_h3,
    ):
        assert net.ssh(red_on_h3.netns, ip[1], "hostname").stdout.strip() == "red-2"
        assert net.ssh(blue_on_h3.netns, ip[1], "hostname").stdout.strip() == "blue-3"
        from_blue = net.ssh(
            blue_on_h3.netns,
            ip[1],
            f"ping -c 1 -W 1 {ip[0]} >/dev/null && echo leaked || echo isolated",
        )
        assert from_blue.stdout.split() == ["isolated"], from_blue.stderr

    # Deleting red's last port on h2 takes h2 out of every other host's entries.
    await cluster.delete(Kind.VM, red_vms[1])
    await cluster.wait_for(red_ports[1].id, lambda v: _not_active_on(v, "h2"), timeout=60)
    for host in ("h1", "h3"):
        plan, _ = await wait_overlay(
            cluster,
            red,
            host,
            red_subnet,
            lambda p: (
                underlay["h2"] not in p.flood
                and red_ports[1].spec.mac not in p.fdb
                and ip[1] not in p.neighbours
            ),
        )
        assert underlay["h2"] not in plan.flood
        assert underlay["h2"] not in set(plan.fdb.values())
        assert ip[1] not in plan.neighbours
    # ... and red-1 and red-3 still reach each other.
    with await probe(net, cluster, red_subnet, "h1", "198.18.30.22") as red_on_h1:
        still = net.ssh(red_on_h1.netns, ip[0], f"ping -c 2 -W 2 {ip[2]} >/dev/null && echo ok")
        assert still.stdout.split() == ["ok"], still.stderr


def _not_active_on(status: object, host: str) -> bool:
    if not isinstance(status, dict):
        return True
    return not (status.get("state") == "active" and status.get("host") == host)


async def test_a_port_status_moving_between_hosts_moves_its_forwarding_entries_fast(
    cluster: ClusterLab,
) -> None:
    """What live migration needs: the entries follow a port's status within 100 ms."""
    net = NetLab(cluster)  # type: ignore[arg-type]
    await net.keypair()
    vpc = await net.network()
    subnet = await net.subnet(vpc, CIDR)
    local = await net.port(subnet)
    vm = await boot(net, "anchor", [local], host="h1")
    await cluster.wait_vm(vm, "running", host="h1", timeout=BOOT_TIMEOUT)
    # A port no agent owns, whose status the test writes as a migrating port's would be.
    moving = await net.port(subnet)
    mac = moving.spec.mac
    underlay = {host.name: host.underlay for host in cluster.hosts}
    key = status_key(Kind.PORT, moving.id)
    delays: list[float] = []
    for host in ("h2", "h3", "h2", "h3", "h2"):
        status = PortStatus(state=LinkState.ACTIVE, host=host, updated_at=now())
        await cluster.db.put(key, status.to_json())
        plan, delay = await wait_overlay(
            cluster,
            vpc,
            "h1",
            subnet,
            lambda p, h=host: (
                p.fdb.get(mac) == underlay[h]
                and p.flood == {underlay[h]}
                and p.neighbours.get(moving.spec.ipv4[0]) == mac
            ),
        )
        delays.append(delay)
    print(f"\nstatus write -> FDB entry on h1: {[round(d * 1000, 1) for d in delays]} ms")
    # Pushed by the watch, not found by the resync (every 2 s here): how fast is for
    # the benchmarks; a missing push shows as a median near the resync interval.
    assert sorted(delays)[len(delays) // 2] < 1.0
    # Active here: the port is local (its tap would have it), nothing is programmed for it.
    await cluster.db.put(
        key, PortStatus(state=LinkState.ACTIVE, host="h1", updated_at=now()).to_json()
    )
    address = ipaddress.IPv4Address(str(moving.spec.ipv4[0]))
    plan, _ = await wait_overlay(
        cluster, vpc, "h1", subnet, lambda p: mac not in p.fdb and address not in p.neighbours
    )
    assert plan.flood == frozenset()
    assert ZERO_MAC not in plan.fdb
    assert address not in plan.neighbours


async def test_a_vm_reaches_a_vm_of_another_subnet_on_another_host(cluster: ClusterLab) -> None:
    """The distributed gateway routes on the sender's host; the packet crosses on the
    destination subnet's VXLAN, and the answer comes back the same way on its own."""
    net = NetLab(cluster)  # type: ignore[arg-type]
    await net.keypair()
    group = await net.security_group(OPEN)
    vpc = await net.network()
    left = await net.subnet(vpc, "198.18.31.0/24")
    right = await net.subnet(vpc, "198.18.32.0/24")
    left_port = await net.port(left, security_groups=[group], address="198.18.31.11")
    right_port = await net.port(right, security_groups=[group], address="198.18.32.12")
    left_vm = await boot(net, "left", [left_port], host="h1")
    right_vm = await boot(net, "right", [right_port], host="h2")
    for vm_id, host in ((left_vm, "h1"), (right_vm, "h2")):
        await cluster.wait_vm(vm_id, "running", host=host, timeout=BOOT_TIMEOUT)
        await cluster.wait_serial(host, vm_id, "ssh-ready", timeout=BOOT_TIMEOUT)
    # h1 has no port of the right subnet, yet routes to it: its VXLAN knows the remote port.
    plan, _ = await wait_overlay(cluster, vpc, "h1", right, lambda p: right_port.spec.mac in p.fdb)
    assert plan.fdb[right_port.spec.mac] == cluster.host("h2").underlay
    with await probe(net, cluster, left, "h1", "198.18.31.21") as on_h1:
        routed = net.ssh(
            on_h1.netns,
            "198.18.31.11",
            "ping -c 3 -W 2 198.18.32.12 >/dev/null && echo ok",
        )
        assert routed.stdout.split() == ["ok"], (routed.stdout, routed.stderr)
