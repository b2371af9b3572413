"""The dnsmasq configuration and hosts file of a VPC, rendered from its plan: what each
subnet gets, and that nothing from the store can add a line of its own.
"""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from nubes.agent.network.dhcp import (
    DnsmasqFiles,
    render_config,
    render_hosts,
    sanitise_hostname,
)
from nubes.agent.network.plan import PortPlan, SubnetPlan, VpcPlan

DUAL_STACK = SubnetPlan(
    subnet_id="subnet-aaaaaaaaaa",
    bridge="br-aaaaaaaaaa",
    vxlan="vx-aaaaaaaaaa",
    vni=100,
    cidr=IPv4Network("198.18.30.0/24"),
    gateway=IPv4Address("198.18.30.1"),
    ipv6_cidr=IPv6Network("2001:db8:30::/64"),
    ipv6_gateway=IPv6Address("2001:db8:30::1"),
    dhcp=True,
    mtu=1450,
    dns_nameservers=("198.18.0.53", "2001:db8::53"),
)
NO_DHCP = SubnetPlan(
    subnet_id="subnet-bbbbbbbbbb",
    bridge="br-bbbbbbbbbb",
    vxlan="vx-bbbbbbbbbb",
    vni=101,
    cidr=IPv4Network("198.18.31.0/24"),
    gateway=IPv4Address("198.18.31.1"),
    ipv6_cidr=None,
    ipv6_gateway=None,
    dhcp=False,
    mtu=1450,
)
FILES = DnsmasqFiles.in_directory(Path("/run/nubes/dnsmasq/vpc-aaaaaaaaaa"), "nubes:h1:vpc-a")


def port(
    number: int,
    *,
    subnet: SubnetPlan = DUAL_STACK,
    address: str | None = None,
    mac: str | None = None,
    hostname: str | None = "vm",
) -> PortPlan:
    return PortPlan(
        port_id=f"port-{number:010d}",
        index=number,
        tap=f"tp-{number:010d}",
        mac=mac or f"02:00:00:00:00:{number:02x}",
        subnet_id=subnet.subnet_id,
        ipv4=(IPv4Address(address or f"{subnet.cidr.network_address + 10 + number}"),),
        ipv6=(),
        ipv6_link_local=IPv6Address("fe80::1"),
        security_groups=(),
        port_security=True,
        vm_id=None,
        hostname=hostname,
    )


def plan(*ports: PortPlan, subnets: tuple[SubnetPlan, ...] = (DUAL_STACK, NO_DHCP)) -> VpcPlan:
    return VpcPlan(vpc_id="vpc-aaaaaaaaaa", netns="h1-vpc-aaaaaaaaaa", subnets=subnets, ports=ports)


def config_lines(vpc: VpcPlan) -> list[str]:
    return [line for line in render_config(vpc, FILES).splitlines() if line]


def test_a_dhcp_subnet_gets_a_static_range_router_mtu_classless_routes_and_dns() -> None:
    lines = config_lines(plan())
    for expected in (
        "interface=br-aaaaaaaaaa",
        "dhcp-range=set:br-aaaaaaaaaa,198.18.30.0,static,255.255.255.0,infinite",
        "dhcp-option=tag:br-aaaaaaaaaa,option:router,198.18.30.1",
        "dhcp-option=tag:br-aaaaaaaaaa,option:mtu,1450",
        "dhcp-option=tag:br-aaaaaaaaaa,option:classless-static-route,"
        "169.254.169.254/32,198.18.30.1,0.0.0.0/0,198.18.30.1",
        "dhcp-option=tag:br-aaaaaaaaaa,option:dns-server,198.18.0.53",
    ):
        assert expected in lines


def test_an_ipv6_subnet_gets_router_advertisements_for_slaac_with_its_mtu_and_dns() -> None:
    lines = config_lines(plan())
    assert "enable-ra" in lines
    assert "dhcp-range=set:br-aaaaaaaaaa,2001:db8:30::,ra-only,64" in lines
    assert "ra-param=br-aaaaaaaaaa,mtu:1450,60" in lines
    assert "dhcp-option=tag:br-aaaaaaaaaa,option6:dns-server,[2001:db8::53]" in lines


def test_a_subnet_without_dhcp_or_ipv6_is_not_served_at_all() -> None:
    assert not any("br-bbbbbbbbbb" in line for line in config_lines(plan()))
    v4_only = dataclasses.replace(DUAL_STACK, ipv6_cidr=None, ipv6_gateway=None)
    assert "enable-ra" not in config_lines(plan(subnets=(v4_only,)))


def test_without_dns_servers_no_dns_option_and_dnsmasq_serves_no_dns_itself() -> None:
    bare = dataclasses.replace(DUAL_STACK, dns_nameservers=())
    lines = config_lines(plan(subnets=(bare,)))
    assert not any("dns-server" in line for line in lines)
    assert "port=0" in lines


def test_dnsmasq_reads_no_host_file_and_keeps_its_files_in_the_vpc_directory() -> None:
    lines = config_lines(plan())
    assert {"no-resolv", "no-hosts", "bind-dynamic", "dhcp-authoritative", "log-dhcp"} <= set(lines)
    directory = "/run/nubes/dnsmasq/vpc-aaaaaaaaaa"
    for key in ("pid-file", "log-facility", "dhcp-leasefile", "dhcp-hostsfile"):
        (line,) = [line for line in lines if line.startswith(f"{key}=")]
        assert line.startswith(f"{key}={directory}/")
    assert FILES.config == Path(directory, "nubes:h1:vpc-a.conf"), "the marker names it"


def test_hosts_lines_are_mac_address_hostname_infinite_for_served_subnets_only() -> None:
    hosts = render_hosts(
        plan(
            port(2, hostname="Web One!"),
            port(1, hostname=None),
            port(3, subnet=NO_DHCP),
        )
    )
    assert hosts.splitlines() == [
        "02:00:00:00:00:01,198.18.30.11,infinite",
        "02:00:00:00:00:02,198.18.30.12,web-one,infinite",
    ]


def test_a_port_without_an_address_in_its_subnet_gets_no_host_line() -> None:
    assert render_hosts(plan(port(1, address="198.18.99.5"))) == ""


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("web", "web"),
        ("Web One!", "web-one"),
        ("db.example.org", "db"),
        ("  spaced  out  ", "spaced-out"),
        ("ünïcode", "n-code"),
        ("---", None),
        ("", None),
        (None, None),
        ("a" * 80, "a" * 63),
    ],
)
def test_hostnames_become_one_dns_label(given: str | None, expected: str | None) -> None:
    assert sanitise_hostname(given) == expected


@pytest.mark.parametrize(
    "hostname",
    [
        "evil\ndhcp-option=3,6.6.6.6",
        "evil,198.18.30.99",
        "evil\r\n02:00:00:00:00:99,198.18.30.99",
        "a\x00b",
    ],
)
def test_a_hostname_cannot_add_a_line_or_a_field_to_the_hosts_file(hostname: str) -> None:
    hosts = render_hosts(plan(port(1, hostname=hostname)))
    (line,) = hosts.splitlines()
    mac, address, name, lease = line.split(",")
    assert (mac, address, lease) == ("02:00:00:00:00:01", "198.18.30.11", "infinite")
    assert name.replace("-", "").isalnum()


@pytest.mark.parametrize(
    "mac", ["02:00:00:00:00:01\n02:00:00:00:00:99", "02:00:00:00:00:01,x", "nonsense"]
)
def test_a_malformed_mac_leaves_only_its_own_port_out(mac: str) -> None:
    hosts = render_hosts(plan(port(1, mac=mac), port(2)))
    assert hosts == "02:00:00:00:00:02,198.18.30.12,vm,infinite\n"


def test_a_dns_server_that_is_not_an_address_is_dropped() -> None:
    odd = dataclasses.replace(DUAL_STACK, dns_nameservers=("198.18.0.53\nport=53", "1.1.1.1"))
    lines = config_lines(plan(subnets=(odd,)))
    assert "port=53" not in lines
    assert "dhcp-option=tag:br-aaaaaaaaaa,option:dns-server,1.1.1.1" in lines


KNOWN_OPTIONS = {
    "port",
    "no-resolv",
    "no-hosts",
    "bind-dynamic",
    "user",
    "group",
    "pid-file",
    "log-facility",
    "log-dhcp",
    "dhcp-authoritative",
    "dhcp-leasefile",
    "dhcp-hostsfile",
    "enable-ra",
    "interface",
    "dhcp-range",
    "dhcp-option",
    "ra-param",
}


def test_every_config_line_is_a_comment_or_one_of_the_options_nubes_writes() -> None:
    hostile = dataclasses.replace(
        DUAL_STACK, dns_nameservers=("1.1.1.1\nconf-file=/etc/x", "1.1.1.1,port=53")
    )
    vpc = plan(port(1, hostname="x\nconf-file=/etc/x"), subnets=(hostile, NO_DHCP))
    for line in config_lines(vpc):
        if not line.startswith("#"):
            assert line.partition("=")[0] in KNOWN_OPTIONS, line


@pytest.mark.parametrize("bridge", ["br-a\ndhcp-option=3,1.2.3.4", "br a", "br,a", ""])
def test_a_bridge_name_that_could_break_the_file_is_refused(bridge: str) -> None:
    broken = dataclasses.replace(DUAL_STACK, bridge=bridge)
    with pytest.raises(ValueError, match="bridge name"):
        render_config(plan(subnets=(broken,)), FILES)


@pytest.mark.parametrize("marker", ["a/b", "a\nb", "", "a b"])
def test_a_marker_that_is_not_one_word_is_refused(marker: str) -> None:
    with pytest.raises(ValueError, match="marker"):
        DnsmasqFiles.in_directory(Path("/run/x"), marker)


def test_a_directory_with_a_line_break_is_refused() -> None:
    with pytest.raises(ValueError, match="directory"):
        DnsmasqFiles.in_directory(Path("/run/x\nport=53"), "m")
