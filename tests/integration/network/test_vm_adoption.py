"""An agent killed and started again adopts the tenant network of its running VMs: the
same dnsmasq, QEMUs, namespaces and taps, SSH and metadata still answer, and a VM
created afterwards gets its lease from the adopted dnsmasq.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from nubes.agent.network.names import tap_name
from nubes.model.network import PortRecord
from nubes.store.keys import Kind
from tests.support.network_lab import BOOT_TIMEOUT, OPEN, NetLab, boot, in_netns, until

pytestmark = pytest.mark.integration

META = "http://169.254.169.254/openstack/latest/meta_data.json"


async def wait_booted(net: NetLab, vm_id: str, port: PortRecord) -> None:
    for line in (f"dhcp-bound {port.spec.ipv4[0]} ", f"metadata-ok {vm_id}", "ssh-ready"):
        await net.lab.wait_serial(vm_id, line, timeout=BOOT_TIMEOUT)


def serves_metadata(net: NetLab, netns: str, address: object, vm_id: str) -> bool:
    """Whether the guest at `address` reads its own metadata (over SSH, from inside)."""
    login = net.ssh(netns, address, f"timeout 5 wget -q -O - {META}", timeout=20)
    return f'"{vm_id}"' in login.stdout


def taps(netns: str) -> dict[str, tuple[int, bool]]:
    """Tap name -> (ifindex, has carrier) in `netns`: a tap made again gets a new index,
    and a tap no QEMU holds open has no carrier."""
    shown = in_netns(netns, ["ip", "-j", "link", "show"])
    assert shown.returncode == 0, shown.stderr
    return {
        link["ifname"]: (link["ifindex"], "NO-CARRIER" not in link["flags"])
        for link in json.loads(shown.stdout)
        if link["ifname"].startswith("tp-")
    }


async def test_a_restarted_agent_adopts_dnsmasq_vms_and_metadata_and_serves_new_vms(
    net: NetLab,
) -> None:
    # Two VPCs of one VM each. With two VMs on one subnet, the restart cuts one of them
    # off most of the time (the bug pinned by the next test).
    await net.keypair()
    group = await net.security_group(OPEN)
    vpcs = [await net.network(name="one"), await net.network(name="two")]
    subnets = [await net.subnet(vpc, f"198.18.8{i}.0/24") for i, vpc in enumerate(vpcs)]
    ports = [await net.port(subnet, security_groups=[group]) for subnet in subnets]
    vms = [
        await boot(net, name, [port]) for name, port in zip(("alpha", "beta"), ports, strict=True)
    ]
    for vm, port in zip(vms, ports, strict=True):
        await wait_booted(net, vm, port)
    namespaces = [net.vpc_netns(vpc) for vpc in vpcs]
    addresses = [port.spec.ipv4[0] for port in ports]
    dnsmasq = sorted(net.lab.dnsmasq_pids())
    qemus = net.lab.qemu_pids()
    links = [taps(netns) for netns in namespaces]
    assert len(dnsmasq) == 2
    assert set(qemus) == set(vms)

    net.lab.stop_agent(signal.SIGKILL)
    # With no agent the datapath is the kernel's: the VM still reaches its gateway.
    alone = net.ssh(namespaces[0], addresses[0], "ping -c 2 -W 2 198.18.80.1 >/dev/null && echo ok")
    assert alone.stdout.split() == ["ok"], alone

    started = time.monotonic()
    net.lab.start_agent()
    await net.lab.wait_host_alive()
    # The metadata listeners lived in the killed agent: the new one reopens them.
    for netns, address, vm in zip(namespaces, addresses, vms, strict=True):

        def answers(netns: str = netns, address: object = address, vm: str = vm) -> bool:
            return serves_metadata(net, netns, address, vm)

        assert await until(answers, timeout=20.0) is not None, f"{vm}: no metadata"
    print(f"\nmetadata answered again {time.monotonic() - started:.1f} s after the restart")
    assert sorted(net.lab.dnsmasq_pids()) == dnsmasq
    assert net.lab.qemu_pids() == qemus
    assert sorted(net.lab.lab_namespaces()) == sorted(namespaces)
    assert [taps(netns) for netns in namespaces] == links
    for vm in vms:
        assert net.lab.serial_log(vm).count("nubes-guest: booted") == 1, "the guest rebooted"

    # A new VM in VPC one: its lease comes from the adopted dnsmasq (reloaded, not
    # restarted), and it reaches the adopted VM.
    port_c = await net.port(subnets[0], security_groups=[group])
    vm_c = await boot(net, "gamma", [port_c])
    await wait_booted(net, vm_c, port_c)
    reach = f"ping -c 2 -W 2 {addresses[0]} >/dev/null && echo ok"
    reached = net.ssh(namespaces[0], port_c.spec.ipv4[0], reach)
    assert reached.stdout.split() == ["ok"], reached
    assert sorted(net.lab.dnsmasq_pids()) == dnsmasq

    for vm in [*vms, vm_c]:
        await net.lab.delete(Kind.VM, vm)
    for vm in [*vms, vm_c]:
        await net.lab.wait_gone(vm)
    for port in [*ports, port_c]:
        await net.lab.wait_state(port.id, "down")
    assert net.lab.leftovers() == []


async def test_a_vm_adopted_after_its_neighbour_keeps_its_tap_and_network(net: NetLab) -> None:
    await net.keypair()
    vpc = await net.network()
    subnet = await net.subnet(vpc, "198.18.82.0/24")
    group = await net.security_group(OPEN)
    port_a = await net.port(subnet, security_groups=[group])
    port_b = await net.port(subnet, security_groups=[group])
    vm_a = await boot(net, "alpha", [port_a])
    vm_b = await boot(net, "beta", [port_b])
    await wait_booted(net, vm_a, port_a)
    await wait_booted(net, vm_b, port_b)
    netns = net.vpc_netns(vpc)
    before = taps(netns)
    assert before[tap_name(port_b.id)][1]

    net.lab.stop_agent(signal.SIGKILL)
    # beta's QEMU answers QMP two seconds late (well within the agent's 5 s), so alpha is
    # adopted first: the order a busy host gives at random, made certain.
    slow = net.lab.qemu_pids()[vm_b]
    os.kill(slow, signal.SIGSTOP)
    try:
        net.lab.start_agent()
        await net.lab.wait_host_alive()
        await asyncio.sleep(2.0)
    finally:
        os.kill(slow, signal.SIGCONT)

    def adopted_both() -> bool:
        return net.lab.agent_log_text().count("adopted QEMU") == 2

    assert await until(adopted_both, timeout=15.0) is not None
    assert net.lab.qemu_pids()[vm_b] == slow
    await asyncio.sleep(1.0)  # the pass that re-claims beta's port
    assert taps(netns) == before
    assert serves_metadata(net, netns, port_b.spec.ipv4[0], vm_b)
