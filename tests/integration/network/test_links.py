"""The netlink door against the real kernel: namespaces, bridges, VXLANs, taps, the
external veth and proxy ARP for floating IPs.

The agent's own namespace is a namespace of the test (the code runs on a thread that
entered it), so nothing here touches the machine's root namespace.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import secrets
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv6Interface
from pathlib import Path
from typing import Any, TypeVar

import pytest

from nubes.agent.network import links, nsutil
from nubes.errors import CommandFailed
from nubes.process import run_tool

pytestmark = pytest.mark.integration

_T = TypeVar("_T")


@dataclass(frozen=True)
class Lab:
    prefix: str

    @property
    def agent(self) -> str:
        return f"{self.prefix}-agent"

    @property
    def vpc(self) -> str:
        return f"{self.prefix}-vpc"

    @property
    def outside(self) -> str:
        return f"{self.prefix}-out"

    def run(self, work: Callable[[], Awaitable[_T]]) -> _T:
        """Runs `work` on an event loop of a thread inside the lab's agent namespace."""

        async def main() -> _T:
            return await work()

        return nsutil.call_in_netns(self.agent, lambda: asyncio.run(main()))

    def ip(self, netns: str, *argv: str) -> Any:
        """`ip -n <netns> -j ...` parsed (or None when it prints nothing)."""
        output = run_tool(["ip", "-n", netns, "-j", *argv])
        return json.loads(output) if output.strip() else None

    def sh(self, netns: str, *argv: str) -> str:
        return run_tool(["ip", "netns", "exec", netns, *argv])


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab("t" + secrets.token_hex(2))
    run_tool(["ip", "netns", "add", lab.agent])
    try:
        run_tool(["ip", "-n", lab.agent, "link", "set", "lo", "up"])
        yield lab
    finally:
        for name in links.list_netns(lab.prefix):
            run_tool(["ip", "netns", "delete", name])


BRIDGE = "br-test"
BRIDGE_ADDRESSES = (IPv4Interface("198.18.10.1/24"), IPv6Interface("2001:db8:10::1/64"))


async def make_subnet(lab: Lab, *, vni: int = 4242) -> dict[str, float]:
    """A VPC namespace with a bridge, a VXLAN and a tap, and how long each step took."""
    timings: dict[str, float] = {}
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("ensure_netns", lambda: links.ensure_netns(lab.vpc)),
        (
            "ensure_bridge",
            lambda: links.ensure_bridge(lab.vpc, BRIDGE, mtu=1450, addresses=BRIDGE_ADDRESSES),
        ),
        (
            "ensure_vxlan",
            lambda: links.ensure_vxlan(
                lab.vpc,
                "vx-test",
                staging_name=f"{lab.prefix}v{vni:x}",
                vni=vni,
                local=IPv4Address("198.18.0.1"),
                bridge=BRIDGE,
                mtu=1450,
            ),
        ),
        ("ensure_tap", lambda: links.ensure_tap(lab.vpc, "tp-test", bridge=BRIDGE, mtu=1450)),
    ]
    for name, step in steps:
        started = time.perf_counter()
        await step()
        timings[name] = time.perf_counter() - started
    return timings


def addresses_of(lab: Lab, netns: str, link: str) -> set[str]:
    (info,) = lab.ip(netns, "address", "show", "dev", link)
    return {f"{item['local']}/{item['prefixlen']}" for item in info["addr_info"]}


def test_a_fresh_vpc_namespace_gets_its_subnet_links_and_every_ensure_is_idempotent(
    lab: Lab,
) -> None:
    first = lab.run(lambda: make_subnet(lab))
    second = lab.run(lambda: make_subnet(lab))
    steps = ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in first.items())
    print(
        f"\nfresh namespace: {steps}, total {sum(first.values()) * 1000:.1f} ms; "
        f"again (nothing to do) {sum(second.values()) * 1000:.1f} ms"
    )

    kinds = lab.run(lambda: links.list_links(lab.vpc))
    assert kinds == {"lo": "", BRIDGE: "bridge", "vx-test": "vxlan", "tp-test": "tun"}
    details = {item["ifname"]: item for item in lab.ip(lab.vpc, "-d", "link", "show")}
    bridge = details[BRIDGE]
    assert "UP" in bridge["flags"]
    assert bridge["mtu"] == 1450
    assert bridge["address"] == links.bridge_mac(BRIDGE), "kept while ports joined"
    assert bridge["linkinfo"]["info_data"]["stp_state"] == 0
    assert bridge["linkinfo"]["info_data"]["forward_delay"] == 0
    for port in ("vx-test", "tp-test"):
        assert details[port]["master"] == BRIDGE
        assert "UP" in details[port]["flags"]
    vxlan = details["vx-test"]["linkinfo"]["info_data"]
    assert (vxlan["id"], vxlan["port"], vxlan["local"]) == (4242, 4789, "198.18.0.1")
    assert vxlan["learning"] is False
    agent_links = {item["ifname"] for item in lab.ip(lab.agent, "link", "show")}
    assert f"{lab.prefix}v{4242:x}" not in agent_links, "the staging name is gone"

    on_bridge = addresses_of(lab, lab.vpc, BRIDGE)
    assert {"198.18.10.1/24", "2001:db8:10::1/64", "fe80::a9fe:a9fe/64"} <= on_bridge
    sysctls = nsutil.call_in_netns(
        lab.vpc,
        lambda: {
            key: Path("/proc/sys", key).read_text().strip()
            for key in (
                "net/ipv4/ip_forward",
                "net/ipv6/conf/all/forwarding",
                "net/ipv4/conf/all/rp_filter",
                "net/ipv6/conf/default/accept_ra",
                "net/ipv6/conf/default/accept_dad",
            )
        },
    )
    assert sysctls == {
        "net/ipv4/ip_forward": "1",
        "net/ipv6/conf/all/forwarding": "1",
        "net/ipv4/conf/all/rp_filter": "2",
        "net/ipv6/conf/default/accept_ra": "0",
        "net/ipv6/conf/default/accept_dad": "0",
    }
    (loopback,) = lab.ip(lab.vpc, "link", "show", "dev", "lo")
    assert "UP" in loopback["flags"]


def test_a_bridge_ends_with_exactly_the_asked_addresses_and_its_kernel_link_local(
    lab: Lab,
) -> None:
    lab.run(lambda: make_subnet(lab))
    kernel_link_local = {
        address for address in addresses_of(lab, lab.vpc, BRIDGE) if address.startswith("fe80::")
    } - {"fe80::a9fe:a9fe/64"}
    assert kernel_link_local, "the bridge has a port that is up, so it has a link-local address"
    wanted = (IPv4Interface("198.18.11.1/24"),)
    lab.run(lambda: links.ensure_bridge(lab.vpc, BRIDGE, mtu=1400, addresses=wanted))
    assert addresses_of(lab, lab.vpc, BRIDGE) == {
        "198.18.11.1/24",
        "fe80::a9fe:a9fe/64",
        *kernel_link_local,
    }
    (bridge,) = lab.ip(lab.vpc, "link", "show", "dev", BRIDGE)
    assert bridge["mtu"] == 1400


def test_the_vxlan_socket_is_bound_in_the_agents_namespace_not_the_vpcs(lab: Lab) -> None:
    lab.run(lambda: make_subnet(lab))
    in_agent = lab.sh(lab.agent, "ss", "-Huln")
    in_vpc = lab.sh(lab.vpc, "ss", "-Huln")
    assert ":4789 " in in_agent, in_agent
    assert ":4789 " not in in_vpc, in_vpc


def test_a_vxlan_with_another_vni_is_replaced(lab: Lab) -> None:
    lab.run(lambda: make_subnet(lab))
    (before,) = lab.ip(lab.vpc, "link", "show", "dev", "vx-test")
    lab.run(lambda: make_subnet(lab, vni=4343))
    (after,) = lab.ip(lab.vpc, "-d", "link", "show", "dev", "vx-test")
    assert after["linkinfo"]["info_data"]["id"] == 4343
    assert after["address"] != before["address"], "a new device (a new random MAC)"
    assert after["master"] == BRIDGE


def test_a_tap_persists_with_no_process_holding_it_and_opens_by_name_in_its_namespace(
    lab: Lab,
) -> None:
    lab.run(lambda: make_subnet(lab))
    # What QEMU's -netdev tap,ifname=... does from inside the namespace.
    iff_tap, iff_no_pi, iff_vnet_hdr = 0x0002, 0x1000, 0x4000

    def attach() -> None:
        fd = os.open("/dev/net/tun", os.O_RDWR)
        try:
            request = struct.pack("16sH22x", b"tp-test", iff_tap | iff_no_pi | iff_vnet_hdr)
            fcntl.ioctl(fd, 0x400454CA, request)
        finally:
            os.close(fd)

    nsutil.call_in_netns(lab.vpc, attach)
    assert lab.run(lambda: links.list_links(lab.vpc))["tp-test"] == "tun"
    (tap,) = lab.ip(lab.vpc, "link", "show", "dev", "tp-test")
    assert tap["master"] == BRIDGE
    lab.run(lambda: links.delete_link(lab.vpc, "tp-test"))
    lab.run(lambda: links.delete_link(lab.vpc, "tp-test"))
    assert "tp-test" not in lab.run(lambda: links.list_links(lab.vpc))


def test_ensure_external_without_the_bridge_names_it_and_the_setting(lab: Lab) -> None:
    lab.run(lambda: links.ensure_netns(lab.vpc))
    with pytest.raises(links.LinkError) as raised:
        lab.run(
            lambda: links.ensure_external(
                lab.vpc,
                link="ext0",
                host_link=f"{lab.prefix}x1",
                host_bridge="brnotthere",
                address=IPv4Interface("198.18.20.10/24"),
                gateway=None,
            )
        )
    assert "brnotthere" in str(raised.value)
    assert "external_bridges" in str(raised.value)
    assert raised.value.code == "link_error"


def make_outside(lab: Lab) -> None:
    """The agent's external bridge and, on it, an outside namespace at 198.18.20.1/24."""
    lab.run(
        lambda: links.ensure_bridge(
            lab.agent, "brext", mtu=1500, addresses=(IPv4Interface("198.18.20.254/24"),)
        )
    )
    run_tool(["ip", "netns", "add", lab.outside])
    run_tool(["ip", "-n", lab.outside, "link", "set", "lo", "up"])
    run_tool(
        [
            "ip",
            "-n",
            lab.outside,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "outpeer",
            "netns",
            lab.agent,
        ]
    )
    run_tool(["ip", "-n", lab.agent, "link", "set", "outpeer", "master", "brext", "up"])
    run_tool(["ip", "-n", lab.outside, "address", "add", "198.18.20.1/24", "dev", "eth0"])
    run_tool(["ip", "-n", lab.outside, "link", "set", "eth0", "up"])


def ensure_external(lab: Lab) -> None:
    lab.run(
        lambda: links.ensure_external(
            lab.vpc,
            link="ext0",
            host_link=f"{lab.prefix}x1",
            host_bridge="brext",
            address=IPv4Interface("198.18.20.10/24"),
            gateway=IPv4Address("198.18.20.1"),
        )
    )


def test_ensure_external_joins_the_namespace_to_the_external_bridge_with_a_default_route(
    lab: Lab,
) -> None:
    make_outside(lab)
    lab.run(lambda: links.ensure_netns(lab.vpc))
    ensure_external(lab)
    (first,) = lab.ip(lab.vpc, "link", "show", "dev", "ext0")
    ensure_external(lab)
    (second,) = lab.ip(lab.vpc, "link", "show", "dev", "ext0")
    assert first["ifindex"] == second["ifindex"], "a second call keeps the veth"

    (host_end,) = lab.ip(lab.agent, "link", "show", "dev", f"{lab.prefix}x1")
    assert host_end["master"] == "brext"
    assert "UP" in host_end["flags"]
    (default,) = lab.ip(lab.vpc, "route", "show", "default")
    assert (default["gateway"], default["dev"]) == ("198.18.20.1", "ext0")
    lab.sh(lab.vpc, "ping", "-c", "1", "-W", "2", "198.18.20.1")

    lab.run(lambda: links.remove_external(lab.vpc, host_link=f"{lab.prefix}x1"))
    lab.run(lambda: links.remove_external(lab.vpc, host_link=f"{lab.prefix}x1"))
    assert "ext0" not in lab.run(lambda: links.list_links(lab.vpc))
    assert lab.ip(lab.agent, "link", "show", "type", "veth", "master", "brext") != [], (
        "the outside's own port stays"
    )


def neighbour(lab: Lab, address: str) -> dict[str, Any] | None:
    entries = lab.ip(lab.outside, "neigh", "show", address, "dev", "eth0") or []
    return entries[0] if entries else None


def test_a_floating_ip_answers_arp_on_the_external_link_until_it_is_removed(lab: Lab) -> None:
    make_outside(lab)
    lab.run(lambda: make_subnet(lab))
    ensure_external(lab)
    (ext0,) = lab.ip(lab.vpc, "link", "show", "dev", "ext0")
    floating, fixed = IPv4Address("198.18.20.50"), IPv4Address("198.18.10.5")
    mapping = {floating: (fixed, BRIDGE)}
    lab.run(lambda: links.ensure_floating_ips(lab.vpc, link="ext0", mapping=mapping))
    lab.run(lambda: links.ensure_floating_ips(lab.vpc, link="ext0", mapping=mapping))
    # A route of someone else's, on the subnet bridge but without a gateway, must stay.
    run_tool(["ip", "-n", lab.vpc, "route", "add", "198.18.10.77/32", "dev", BRIDGE])

    with pytest.raises(CommandFailed):  # no NAT here (the firewall's job): ARP is the point
        lab.sh(lab.outside, "ping", "-c", "1", "-W", "1", str(floating))
    entry = neighbour(lab, str(floating))
    assert entry is not None
    assert entry.get("lladdr") == ext0["address"], entry
    (route,) = lab.ip(lab.vpc, "route", "show", f"{floating}/32")
    assert (route["gateway"], route["dev"]) == (str(fixed), BRIDGE)

    lab.run(lambda: links.ensure_floating_ips(lab.vpc, link="ext0", mapping={}))
    assert lab.ip(lab.vpc, "route", "show", f"{floating}/32") == []
    assert lab.ip(lab.vpc, "route", "show", "198.18.10.77/32") != []
    proxies = lab.ip(lab.vpc, "neigh", "show", "proxy") or []
    assert all(item["dst"] != str(floating) for item in proxies)
    run_tool(["ip", "-n", lab.outside, "neigh", "flush", "dev", "eth0"])
    with pytest.raises(CommandFailed):
        lab.sh(lab.outside, "ping", "-c", "1", "-W", "1", str(floating))
    entry = neighbour(lab, str(floating))
    assert entry is None or "lladdr" not in entry, entry


def test_delete_netns_removes_the_namespace_and_tolerates_its_absence(lab: Lab) -> None:
    lab.run(lambda: links.ensure_netns(lab.vpc))
    assert lab.vpc in links.list_netns(lab.prefix)
    lab.run(lambda: links.delete_netns(lab.vpc))
    lab.run(lambda: links.delete_netns(lab.vpc))
    assert lab.vpc not in links.list_netns(lab.prefix)
    with pytest.raises(links.LinkError):
        lab.run(lambda: links.list_links(lab.vpc))
