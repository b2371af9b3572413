"""Floating IPs and SNAT with real VMs: an outside namespace on the lab's external bridge
reaches a VM by its floating IP (ping, SSH), the VMs reach the outside with their floating
IP or the VPC's gateway address as source, and a floating IP taken away stops working and
leaves no trace in the VPC's firewall.
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from nubes.model.network import PortRecord
from nubes.store.keys import Kind, resource_key
from tests.support.network_lab import (
    BOOT_TIMEOUT,
    OPEN,
    SSH_OPTIONS,
    NetLab,
    Outside,
    SourceListener,
    boot,
    in_netns,
    ping,
    until,
)

pytestmark = pytest.mark.integration

OUTSIDE_ROUTER = "198.19.200.1"
VPC_GATEWAY = "198.19.200.2"
FLOATING = "198.19.200.10"
LISTENER_PORT = 9000


async def wait_booted(net: NetLab, vm_id: str, port: PortRecord) -> None:
    for line in (f"dhcp-bound {port.spec.ipv4[0]} ", f"metadata-ok {vm_id}", "ssh-ready"):
        await net.lab.wait_serial(vm_id, line, timeout=BOOT_TIMEOUT)


def ssh_from_outside(net: NetLab, outside: Outside, address: str, command: str) -> str:
    """`command`'s output in the guest reached at `address` from the outside namespace."""
    completed = in_netns(
        outside.netns,
        ["ssh", *SSH_OPTIONS, "-i", str(net.ssh_key), f"root@{address}", command],
    )
    return completed.stdout if completed.returncode == 0 else f"failed: {completed.stderr}"


def seen_from_outside(net: NetLab, netns: str, address: object) -> str:
    """The source address the outside listener saw for a connection from the guest."""
    login = net.ssh(netns, address, f"timeout 5 nc {OUTSIDE_ROUTER} {LISTENER_PORT} </dev/null")
    return login.stdout.strip()


def mentions(netns: str, address: str) -> bool:
    ruleset = in_netns(netns, ["nft", "list", "ruleset"])
    assert ruleset.returncode == 0, ruleset.stderr
    return address in ruleset.stdout


async def test_a_floating_ip_reaches_its_vm_from_outside_and_snat_names_the_vms(
    net: NetLab,
) -> None:
    with (
        Outside(net.lab.prefix) as outside,
        SourceListener(outside.netns, OUTSIDE_ROUTER, LISTENER_PORT) as listener,
    ):
        await net.keypair()
        external = await net.network(external="198.19.200.0/24", name="ext")
        vpc = await net.network(gateway=(external, VPC_GATEWAY))
        subnet = await net.subnet(vpc, "198.18.70.0/24")
        group = await net.security_group(OPEN)
        port_a = await net.port(subnet, security_groups=[group])
        port_b = await net.port(subnet, security_groups=[group])
        fip = await net.floating_ip(external, FLOATING, port_a.id)
        vm_a = await boot(net, "floater", [port_a])
        vm_b = await boot(net, "hidden", [port_b])
        await wait_booted(net, vm_a, port_a)
        await wait_booted(net, vm_b, port_b)
        netns = net.vpc_netns(vpc)
        a, b = port_a.spec.ipv4[0], port_b.spec.ipv4[0]
        status = await net.lab.wait_state(fip, "active")
        assert status["fixed_ip"] == str(a)
        assert status["host"] == "lab-host"

        # Outside -> VM by its floating IP: ping and SSH with the key.
        assert await asyncio.to_thread(ping, outside.netns, FLOATING, count=2, wait=2.0)
        assert ssh_from_outside(net, outside, FLOATING, "hostname").split() == ["floater"]
        # VM -> outside: the router answers, and a server there sees the floating IP for
        # the VM that has one and the VPC's gateway address for the one that has not.
        reach = net.ssh(netns, a, f"ping -c 2 -W 2 {OUTSIDE_ROUTER} >/dev/null && echo ok")
        assert reach.stdout.split() == ["ok"], reach
        assert seen_from_outside(net, netns, a) == f"seen {FLOATING}"
        assert seen_from_outside(net, netns, b) == f"seen {VPC_GATEWAY}"
        assert listener.sources == [FLOATING, VPC_GATEWAY]
        assert mentions(netns, FLOATING)

        # Taken from its port: unreachable, gone from the firewall, status down, and the
        # VM now goes out as the gateway address.
        # A ping running across the change (one ICMP id, one conntrack entry) stops too.
        pinger = await asyncio.create_subprocess_exec(
            *["ip", "netns", "exec", outside.netns, "ping", "-n", "-D", "-i", "0.2", FLOATING],
            stdout=subprocess.PIPE,
        )
        try:
            await asyncio.sleep(1.0)
            since = net.lab.mark(fip)
            await net.set_floating_ip(fip, external, FLOATING, None)
            await net.lab.wait_state(fip, "down", since=since)
            removed_at = time.time()
            await asyncio.sleep(2.0)
        finally:
            pinger.terminate()
            raw, _ = await asyncio.wait_for(pinger.communicate(), 10)
        output = raw.decode()
        replies = [
            float(line[1:].split("]")[0]) for line in output.splitlines() if "bytes from" in line
        ]
        assert replies, output  # it did flow before
        assert [t for t in replies if t > removed_at + 0.3] == [], output
        assert not mentions(netns, FLOATING)
        assert not await asyncio.to_thread(ping, outside.netns, FLOATING, count=2, wait=1.0)
        assert ssh_from_outside(net, outside, FLOATING, "hostname").startswith("failed")
        assert seen_from_outside(net, netns, a) == f"seen {VPC_GATEWAY}"

        # Given back, it works again; then the record is deleted: unreachable, no status.
        since = net.lab.mark(fip)
        await net.set_floating_ip(fip, external, FLOATING, port_a.id)
        await net.lab.wait_state(fip, "active", since=since)
        assert await until(lambda: ping(outside.netns, FLOATING), timeout=10.0) is not None
        since = net.lab.mark(fip)
        await net.lab.db.delete(resource_key(Kind.FLOATING_IP, fip))
        await net.lab.wait_for(fip, lambda value: value is None, since=since, what="deleted")
        assert await net.lab.current_status(Kind.FLOATING_IP, fip) is None
        assert not mentions(netns, FLOATING)
        assert not await asyncio.to_thread(ping, outside.netns, FLOATING, count=2, wait=1.0)

        for vm in (vm_a, vm_b):
            await net.lab.delete(Kind.VM, vm)
        for vm in (vm_a, vm_b):
            await net.lab.wait_gone(vm)
        await net.lab.wait_state(port_a.id, "down")
        await net.lab.wait_state(port_b.id, "down")
    assert net.lab.leftovers() == []
