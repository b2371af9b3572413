"""Routing between the subnets of a VPC, and isolation between VPCs, seen by real VMs:
a VM reaches a VM of another subnet of its VPC; two VPCs with the same CIDR and the same
addresses are two separate worlds (leases, metadata, who answers an address).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.support.network_lab import BOOT_TIMEOUT, NetLab, boot, in_netns, ping

pytestmark = pytest.mark.integration

OPEN: list[dict[str, Any]] = [
    {"direction": "ingress", "protocol": "icmp"},
    {"direction": "ingress", "protocol": "tcp", "port_min": 22, "port_max": 22},
    {"direction": "ingress", "protocol": "tcp", "port_min": 8080, "port_max": 8080},
    # traceroute's UDP probes, so the last hop answers "port unreachable".
    {"direction": "ingress", "protocol": "udp", "port_min": 33434, "port_max": 33534},
    {"direction": "egress"},
]
# Serves "web-<hostname>" on port 8080 (busybox httpd daemonizes).
WEB_SERVER = (
    "#!/bin/sh\nmkdir -p /srv/www\necho web-$(hostname) > /srv/www/index.html\n"
    "httpd -p 8080 -h /srv/www\n"
)
META = "http://169.254.169.254/openstack/latest/meta_data.json"


async def wait_booted(net: NetLab, vm_id: str, address: object) -> None:
    """The guest has its lease, its own metadata and an SSH server."""
    for line in (f"dhcp-bound {address} ", f"metadata-ok {vm_id}", "ssh-ready"):
        await net.lab.wait_serial(vm_id, line, timeout=BOOT_TIMEOUT)


async def test_a_vm_reaches_a_vm_of_another_subnet_of_its_vpc_through_the_gateway(
    net: NetLab,
) -> None:
    await net.keypair()
    vpc = await net.network()
    subnet_a = await net.subnet(vpc, "198.18.30.0/24")
    subnet_b = await net.subnet(vpc, "198.18.31.0/24")
    group = await net.security_group(OPEN)
    port_a = await net.port(subnet_a, security_groups=[group])
    port_b = await net.port(subnet_b, security_groups=[group])
    vm_a = await boot(net, "alpha", [port_a])
    vm_b = await boot(net, "beta", [port_b], user_data=WEB_SERVER)
    ip_a, ip_b = port_a.spec.ipv4[0], port_b.spec.ipv4[0]
    await wait_booted(net, vm_a, ip_a)
    await wait_booted(net, vm_b, ip_b)
    await net.lab.wait_serial(vm_b, "user-data-exit 0", timeout=BOOT_TIMEOUT)

    netns = net.vpc_netns(vpc)
    # From inside alpha (198.18.30.x): ping and HTTP to beta (198.18.31.x), and the
    # path goes through alpha's subnet gateway (first hop of traceroute).
    login = net.ssh(
        netns,
        ip_a,
        f"ping -c 2 -W 2 {ip_b} >/dev/null && echo ping-ok; "
        f"timeout 5 wget -q -O - http://{ip_b}:8080/; "
        f"traceroute -n -q 1 -m 2 -w 2 {ip_b} 2>/dev/null | awk '{{print \"hop\", $1, $2}}'",
    )
    assert login.returncode == 0, login.stderr
    lines = login.stdout.splitlines()
    assert lines[:2] == ["ping-ok", "web-beta"], login.stdout
    assert "hop 1 198.18.30.1" in lines, login.stdout
    assert f"hop 2 {ip_b}" in lines, login.stdout
    # And back: beta reaches alpha.
    back = net.ssh(netns, ip_b, f"ping -c 2 -W 2 {ip_a} >/dev/null && echo ping-ok")
    assert back.stdout.split() == ["ping-ok"], back.stderr


async def test_two_vpcs_with_the_same_cidr_and_addresses_stay_isolated(net: NetLab) -> None:
    await net.keypair()
    vpc_1 = await net.network(name="one")
    vpc_2 = await net.network(name="two")
    subnet_1 = await net.subnet(vpc_1, "198.18.40.0/24")
    subnet_2 = await net.subnet(vpc_2, "198.18.40.0/24")
    group = await net.security_group(OPEN)
    shared, only_in_2 = "198.18.40.10", "198.18.40.20"
    port_1 = await net.port(subnet_1, security_groups=[group], address=shared)
    port_2 = await net.port(subnet_2, security_groups=[group], address=shared)
    port_3 = await net.port(subnet_2, security_groups=[group], address=only_in_2)
    vm_1 = await boot(net, "one-ten", [port_1])
    vm_2 = await boot(net, "two-ten", [port_2])
    vm_3 = await boot(net, "two-twenty", [port_3])
    # Both VMs at .10 got that lease, each from its own VPC's dnsmasq, and each read its
    # own metadata (the serial line names the instance id it was served).
    await wait_booted(net, vm_1, shared)
    await wait_booted(net, vm_2, shared)
    await wait_booted(net, vm_3, only_in_2)
    ns_1, ns_2 = net.vpc_netns(vpc_1), net.vpc_netns(vpc_2)
    assert ns_1 != ns_2
    assert sorted(net.lab.lab_namespaces()) == sorted([ns_1, ns_2])

    # The same address answers as a different machine in each VPC.
    who = "hostname; wget -q -O - " + META
    seen_1 = net.ssh(ns_1, shared, who)
    seen_2 = net.ssh(ns_2, shared, who)
    assert seen_1.returncode == 0, seen_1.stderr
    assert seen_2.returncode == 0, seen_2.stderr
    assert seen_1.stdout.splitlines()[0] == "one-ten"
    assert seen_2.stdout.splitlines()[0] == "two-ten"
    assert f'"{vm_1}"' in seen_1.stdout, seen_1.stdout
    assert vm_2 not in seen_1.stdout, seen_1.stdout
    assert f'"{vm_2}"' in seen_2.stdout, seen_2.stdout
    assert vm_1 not in seen_2.stdout, seen_2.stdout
    # Each namespace resolved .10 to its own VM's MAC.
    for netns, port in ((ns_1, port_1), (ns_2, port_2)):
        neighbour = in_netns(netns, ["ip", "neigh", "show", shared]).stdout
        assert port.spec.mac in neighbour, (netns, neighbour)

    # VPC 2's .20 does not exist in VPC 1: it answers in VPC 2 and nowhere in VPC 1,
    # neither to the namespace nor to the VM at .10 there.
    assert await asyncio.to_thread(ping, ns_2, only_in_2, count=2, wait=2.0)
    assert not await asyncio.to_thread(ping, ns_1, only_in_2, count=2, wait=2.0)
    probe = f"ping -c 2 -W 2 {only_in_2} >/dev/null && echo reached || echo unreachable"
    from_1 = net.ssh(ns_1, shared, probe)
    from_2 = net.ssh(ns_2, shared, probe)
    assert from_1.stdout.split() == ["unreachable"], from_1
    assert from_2.stdout.split() == ["reached"], from_2
