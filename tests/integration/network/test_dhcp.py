"""The VPC's dnsmasq against real clients: busybox udhcpc and the kernel's SLAAC, in a
client namespace on a veth whose other end sits on the subnet bridge (as a tap would).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import signal
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from pathlib import Path

import pytest

from nubes.agent.network import links, names
from nubes.agent.network.dhcp import Dnsmasq
from nubes.agent.network.plan import PortPlan, SubnetPlan, VpcPlan
from nubes.errors import CommandFailed
from nubes.ipam import link_local_address, slaac_address
from nubes.process import run_tool, run_tool_async

pytestmark = pytest.mark.integration

SUBNET_A = SubnetPlan(
    subnet_id="subnet-aaaaaaaaaa",
    bridge=names.bridge_name("subnet-aaaaaaaaaa"),
    vxlan=names.vxlan_name("subnet-aaaaaaaaaa"),
    vni=4100,
    cidr=IPv4Network("198.18.30.0/24"),
    gateway=IPv4Address("198.18.30.1"),
    ipv6_cidr=IPv6Network("2001:db8:30::/64"),
    ipv6_gateway=IPv6Address("2001:db8:30::1"),
    dhcp=True,
    mtu=1450,
)
SUBNET_B = SubnetPlan(
    subnet_id="subnet-bbbbbbbbbb",
    bridge=names.bridge_name("subnet-bbbbbbbbbb"),
    vxlan=names.vxlan_name("subnet-bbbbbbbbbb"),
    vni=4101,
    cidr=IPv4Network("198.18.31.0/24"),
    gateway=IPv4Address("198.18.31.1"),
    ipv6_cidr=None,
    ipv6_gateway=None,
    dhcp=False,
    mtu=1400,
)
CLIENT_LINK = "c0"
PEER_LINK = "pc0"  # the client's veth end in the VPC namespace, where a tap would be


def port(number: int, subnet: SubnetPlan, address: str, *, hostname: str | None) -> PortPlan:
    mac = f"02:00:00:00:00:{number:02x}"
    return PortPlan(
        port_id=f"port-{number:010d}",
        index=number,
        tap=names.tap_name(f"port-{number:010d}"),
        mac=mac,
        subnet_id=subnet.subnet_id,
        ipv4=(IPv4Address(address),),
        ipv6=(),
        ipv6_link_local=link_local_address(mac),
        security_groups=(),
        port_security=True,
        vm_id=None,
        hostname=hostname,
    )


WEB = port(1, SUBNET_A, "198.18.30.10", hostname="Web One!")
DB = port(2, SUBNET_A, "198.18.30.11", hostname="db")
WORKER = port(3, SUBNET_B, "198.18.31.20", hostname="worker")


def alive(pid: int) -> bool:
    """The process runs (a zombie waiting for init to reap it does not)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat_line.rpartition(")")[2].split()[0] not in ("Z", "X")


@dataclass
class Lab:
    prefix: str
    directory: Path

    @property
    def vpc(self) -> str:
        return f"{self.prefix}-vpc"

    @property
    def client(self) -> str:
        return f"{self.prefix}-client"

    @property
    def marker(self) -> str:
        return f"nubes:{self.prefix}:vpc-aaaaaaaaaa"

    def dnsmasq(self) -> Dnsmasq:
        return Dnsmasq(self.vpc, self.directory, marker=self.marker)

    def plan(self, *ports: PortPlan, subnet_b: SubnetPlan = SUBNET_B) -> VpcPlan:
        return VpcPlan(
            vpc_id="vpc-aaaaaaaaaa", netns=self.vpc, subnets=(SUBNET_A, subnet_b), ports=ports
        )

    async def client_on(self, subnet: SubnetPlan, mac: str) -> None:
        """The client's veth, with `mac`, plugged into `subnet`'s bridge."""
        await run_tool_async(["ip", "-n", self.client, "link", "set", CLIENT_LINK, "down"])
        await run_tool_async(["ip", "-n", self.client, "link", "set", CLIENT_LINK, "address", mac])
        await run_tool_async(
            ["ip", "-n", self.vpc, "link", "set", PEER_LINK, "master", subnet.bridge, "up"]
        )
        await run_tool_async(["ip", "-n", self.client, "link", "set", CLIENT_LINK, "up"])

    async def lease(self) -> dict[str, str]:
        """What udhcpc got (its script's environment); CommandFailed when no lease."""
        script = self.directory.parent / "udhcpc.sh"
        result = self.directory.parent / "lease.env"
        result.unlink(missing_ok=True)
        script.write_text(f'#!/bin/sh\n[ "$1" = bound ] && env > {result}\nexit 0\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        await run_tool_async(
            [
                "ip",
                "netns",
                "exec",
                self.client,
                "busybox",
                "udhcpc",
                "-f",
                "-q",
                "-n",
                "-t",
                "2",
                "-T",
                "1",
                "-i",
                CLIENT_LINK,
                "-s",
                str(script),
                "-O",
                "staticroutes",
                "-O",
                "mtu",
            ]
        )
        pairs = (line.partition("=") for line in result.read_text().splitlines())
        return {key: value for key, equals, value in pairs if equals}


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    lab = Lab("t" + secrets.token_hex(2), tmp_path / "dnsmasq" / "vpc-aaaaaaaaaa")
    try:
        await links.ensure_netns(lab.vpc)
        for subnet in (SUBNET_A, SUBNET_B):
            addresses: list[IPv4Interface | IPv6Interface] = [
                IPv4Interface(f"{subnet.gateway}/{subnet.cidr.prefixlen}")
            ]
            if subnet.ipv6_gateway is not None and subnet.ipv6_cidr is not None:
                addresses.append(
                    IPv6Interface(f"{subnet.ipv6_gateway}/{subnet.ipv6_cidr.prefixlen}")
                )
            await links.ensure_bridge(lab.vpc, subnet.bridge, mtu=subnet.mtu, addresses=addresses)
        await run_tool_async(["ip", "netns", "add", lab.client])
        await run_tool_async(
            [
                "ip",
                "-n",
                lab.client,
                "link",
                "add",
                CLIENT_LINK,
                "type",
                "veth",
                "peer",
                "name",
                PEER_LINK,
                "netns",
                lab.vpc,
            ]
        )
        yield lab
    finally:
        pid = lab.dnsmasq().pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        for name in links.list_netns(lab.prefix):
            run_tool(["ip", "netns", "delete", name])


async def test_a_known_mac_gets_exactly_its_static_lease_with_router_mtu_and_routes(
    lab: Lab,
) -> None:
    await lab.dnsmasq().ensure(lab.plan(WEB, DB, WORKER))
    await lab.client_on(SUBNET_A, WEB.mac)
    lease = await lab.lease()
    assert lease["ip"] == "198.18.30.10"
    assert lease["subnet"] == "255.255.255.0"
    assert lease["router"] == "198.18.30.1"
    assert lease["mtu"] == "1450"
    assert lease["staticroutes"] == "169.254.169.254/32 198.18.30.1 0.0.0.0/0 198.18.30.1"
    assert lease["hostname"] == "web-one"
    assert "dns" not in lease, "no DNS servers were given, and dnsmasq serves no DNS"
    assert int(lease["lease"]) == 0xFFFFFFFF, "infinite"


async def test_an_unknown_mac_or_a_subnet_without_dhcp_gets_no_lease(lab: Lab) -> None:
    dnsmasq = lab.dnsmasq()
    await dnsmasq.ensure(lab.plan(WEB, WORKER))
    await lab.client_on(SUBNET_A, "02:00:00:00:00:99")
    with pytest.raises(CommandFailed):
        await lab.lease()
    # WEB's MAC, but asking on subnet B's bridge, where DHCP is off.
    await lab.client_on(SUBNET_B, WEB.mac)
    with pytest.raises(CommandFailed):
        await lab.lease()
    log = dnsmasq.files.log.read_text()
    assert "02:00:00:00:00:99" in log, "the refusal is in dnsmasq's log, to be read"


async def test_a_new_host_entry_is_served_after_a_reload_not_a_restart(lab: Lab) -> None:
    dnsmasq = lab.dnsmasq()
    await dnsmasq.ensure(lab.plan(WEB))
    pid = dnsmasq.pid()
    config_written = dnsmasq.files.config.stat().st_mtime_ns
    await dnsmasq.ensure(lab.plan(WEB))
    assert dnsmasq.pid() == pid
    assert dnsmasq.files.config.stat().st_mtime_ns == config_written, "nothing was rewritten"

    await lab.client_on(SUBNET_A, DB.mac)
    with pytest.raises(CommandFailed):
        await lab.lease()
    await dnsmasq.ensure(lab.plan(WEB, DB))
    assert dnsmasq.pid() == pid
    assert (await lab.lease())["ip"] == "198.18.30.11"


async def test_a_changed_subnet_set_restarts_dnsmasq_and_serves_the_new_subnet(lab: Lab) -> None:
    dnsmasq = lab.dnsmasq()
    await dnsmasq.ensure(lab.plan(WEB, WORKER))
    pid = dnsmasq.pid()
    await dnsmasq.ensure(lab.plan(WEB, WORKER, subnet_b=dataclasses.replace(SUBNET_B, dhcp=True)))
    assert dnsmasq.pid() not in (None, pid)
    assert pid is not None
    assert not alive(pid), "the old one has ended"
    await lab.client_on(SUBNET_B, WORKER.mac)
    lease = await lab.lease()
    assert (lease["ip"], lease["router"], lease["mtu"]) == ("198.18.31.20", "198.18.31.1", "1400")


async def test_the_clients_slaac_address_is_the_one_ipam_predicts(lab: Lab) -> None:
    await lab.dnsmasq().ensure(lab.plan(WEB))
    await lab.client_on(SUBNET_A, WEB.mac)
    assert SUBNET_A.ipv6_cidr is not None
    expected = slaac_address(SUBNET_A.ipv6_cidr, WEB.mac)
    deadline = time.monotonic() + 20
    found: list[str] = []
    show = ["ip", "-n", lab.client, "-j", "-6", "address", "show", "dev", CLIENT_LINK]
    while time.monotonic() < deadline:
        shown = json.loads(await run_tool_async([*show, "scope", "global"]))
        found = [item["local"] for entry in shown for item in entry["addr_info"] if item]
        if found:
            break
        await asyncio.sleep(0.2)
    assert found == [str(expected)]
    routes = json.loads(
        await run_tool_async(["ip", "-n", lab.client, "-j", "-6", "route", "show", "default"])
    )
    assert routes, "the advertisement made the bridge the client's default router"
    assert routes[0]["gateway"].startswith("fe80::")


async def test_a_new_object_adopts_the_running_dnsmasq_without_restarting_it(lab: Lab) -> None:
    await lab.dnsmasq().ensure(lab.plan(WEB))
    first = lab.dnsmasq().pid()
    assert first is not None
    adopted = lab.dnsmasq()
    assert adopted.pid() == first
    await adopted.ensure(lab.plan(WEB))
    assert adopted.pid() == first
    other = Dnsmasq(lab.vpc, lab.directory, marker=f"nubes:{lab.prefix}:vpc-bbbbbbbbbb")
    assert other.pid() is None, "a pidfile alone is not enough: the command line must match"


async def test_stop_ends_the_process_and_removes_its_files(lab: Lab) -> None:
    dnsmasq = lab.dnsmasq()
    await dnsmasq.ensure(lab.plan(WEB))
    pid = dnsmasq.pid()
    assert pid is not None
    await dnsmasq.stop()
    assert not alive(pid)
    assert not lab.directory.exists()
    assert dnsmasq.pid() is None
    await dnsmasq.stop()


async def test_a_plan_with_no_subnet_to_serve_stops_dnsmasq(lab: Lab) -> None:
    dnsmasq = lab.dnsmasq()
    await dnsmasq.ensure(lab.plan(WEB))
    pid = dnsmasq.pid()
    assert pid is not None
    no_dhcp = VpcPlan(vpc_id="vpc-aaaaaaaaaa", netns=lab.vpc, subnets=(SUBNET_B,), ports=(WORKER,))
    await dnsmasq.ensure(no_dhcp)
    assert not alive(pid)
    assert dnsmasq.pid() is None
