"""Tenant networking end to end: a real agent, real VMs (tiny image, TCG), real dnsmasq,
nftables and metadata service. The test writes records into the store, as the API will,
and looks from the guests' side (serial lines, SSH) and from the namespaces.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import signal
from typing import Any

import pytest

from nubes.ipam import slaac_address
from nubes.model.network import PortRecord
from nubes.store.keys import Kind, resource_key
from tests.support.network_lab import BOOT_TIMEOUT, NetLab, ping

pytestmark = pytest.mark.integration

OPEN_ICMP_SSH = [
    {"direction": "ingress", "protocol": "icmp"},
    {"direction": "ingress", "ethertype": "ipv6", "protocol": "icmpv6"},
    {"direction": "ingress", "protocol": "tcp", "port_min": 22, "port_max": 22},
    {"direction": "egress"},
    {"direction": "egress", "ethertype": "ipv6"},
]


async def boot(net: NetLab, name: str, ports: list[PortRecord], **spec: Any) -> str:
    return await net.lab.create_vm(
        name=name, ports=[p.id for p in ports], key_names=["mine"], **spec
    )


async def wait_serial(net: NetLab, vm_id: str, text: str) -> None:
    await net.lab.wait_serial(vm_id, text, timeout=BOOT_TIMEOUT)


async def test_two_vms_in_a_subnet_get_their_leases_metadata_and_reach_each_other(
    net: NetLab,
) -> None:
    await net.keypair()
    vpc = await net.network()
    subnet = await net.subnet(vpc, "198.18.20.0/24", ipv6_cidr="2001:db8:20::/64")
    group = await net.security_group(OPEN_ICMP_SSH)
    port_a = await net.port(subnet, security_groups=[group])
    port_b = await net.port(subnet, security_groups=[group])
    vm_a = await boot(net, "alpha", [port_a], user_data="#!/bin/sh\necho made-by-user-data\n")
    vm_b = await boot(net, "beta", [port_b])
    await net.lab.wait_vm(vm_a, "running")
    port_status = await net.lab.wait_state(port_a.id, "active")
    assert port_status["host"] == "lab-host"

    ip_a, ip_b = port_a.spec.ipv4[0], port_b.spec.ipv4[0]
    await wait_serial(net, vm_a, f"dhcp-bound {ip_a} ")
    await wait_serial(net, vm_b, f"dhcp-bound {ip_b} ")
    await wait_serial(net, vm_a, f"metadata-ok {vm_a}")
    await wait_serial(net, vm_b, f"metadata-ok {vm_b}")
    await wait_serial(net, vm_a, "ssh-ready")
    await wait_serial(net, vm_a, "user-data-exit 0")

    netns = net.vpc_netns(vpc)
    login = net.ssh(netns, ip_a, f"hostname; ping -c 2 -W 2 {ip_b} >/dev/null && echo reached")
    assert login.returncode == 0, login.stderr
    assert login.stdout.split() == ["alpha", "reached"]

    # The guests formed the SLAAC addresses IPAM predicted.
    prefix = ipaddress.IPv6Network("2001:db8:20::/64")
    for port in (port_a, port_b):
        expected = slaac_address(prefix, port.spec.mac)
        assert port.spec.ipv6 == [expected]
        assert await _eventually(lambda a=expected: ping(netns, a, wait=2.0)), expected


async def _eventually(check: Any, timeout: float = 20.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if await asyncio.to_thread(check):
            return True
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.5)


async def test_deleting_everything_leaves_nothing_of_nubes_on_the_host(net: NetLab) -> None:
    await net.keypair()
    vpc = await net.network()
    subnet = await net.subnet(vpc, "198.18.21.0/24")
    port = await net.port(subnet)
    vm = await boot(net, "gamma", [port])
    await net.lab.wait_vm(vm, "running")
    await net.lab.wait_state(port.id, "active")
    assert net.lab.lab_namespaces() == [net.vpc_netns(vpc)]
    assert net.lab.dnsmasq_pids()

    await net.lab.delete(Kind.VM, vm)
    await net.lab.wait_gone(vm)
    await net.lab.wait_state(port.id, "down")
    assert net.lab.leftovers() == []


async def test_host_gc_sweeps_the_namespace_and_dnsmasq_of_a_forgotten_vpc(net: NetLab) -> None:
    vpc = await net.network()
    subnet = await net.subnet(vpc, "198.18.22.0/24")
    port = await net.port(subnet)
    vm = await boot(net, "delta", [port])
    await net.lab.wait_vm(vm, "running")
    await net.lab.wait_state(port.id, "active")
    # The records vanish while the agent is down: its namespace and dnsmasq are orphans.
    net.lab.stop_agent(signal.SIGKILL)
    for kind, name in ((Kind.VM, vm), (Kind.PORT, port.id), (Kind.NETWORK, vpc)):
        await net.lab.db.delete(resource_key(kind, name), prefix=True)

    listed = net.lab.nubes("host", "gc", "--dry-run", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    found = {(o["kind"], o["id"]) for o in json.loads(listed.stdout)["orphans"]}
    assert {("process", vm), ("namespace", vpc)} <= found
    assert net.lab.dnsmasq_pids()

    swept = net.lab.nubes("host", "gc", "-o", "json")
    assert swept.returncode == 0, swept.stderr
    removed = {(o["kind"], o["id"]) for o in json.loads(swept.stdout)["removed"]}
    assert ("namespace", vpc) in removed
    assert net.lab.leftovers() == []
