"""What one VPC should look like on this host, as plain data.

The VPC controller builds a `VpcPlan` from the store; the pure builders turn it into
links (links.py), an nftables ruleset (firewall.py), a dnsmasq configuration (dhcp.py)
and metadata identities (metadata/). Nothing here touches the host.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from nubes.model.security_group import SecurityGroupRule


@dataclass(frozen=True)
class SubnetPlan:
    subnet_id: str
    bridge: str  # link name inside the VPC namespace
    vxlan: str  # link name inside the VPC namespace
    vni: int
    cidr: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None  # None when IPAM is none: a bare L2 segment
    ipv6_cidr: ipaddress.IPv6Network | None
    ipv6_gateway: ipaddress.IPv6Address | None
    dhcp: bool  # dnsmasq serves DHCPv4 and router advertisements here
    mtu: int
    dns_nameservers: tuple[str, ...] = ()


@dataclass(frozen=True)
class PortPlan:
    port_id: str
    index: int  # 1..4095, unique in the VPC namespace: the packet mark of its traffic
    tap: str  # link name inside the VPC namespace
    mac: str
    subnet_id: str
    ipv4: tuple[ipaddress.IPv4Address, ...]
    ipv6: tuple[ipaddress.IPv6Address, ...]  # fixed (SLAAC-predicted) global addresses
    ipv6_link_local: ipaddress.IPv6Address  # from the MAC
    security_groups: tuple[str, ...]
    port_security: bool  # False: no anti-spoofing and no security groups
    vm_id: str | None
    hostname: str | None


@dataclass(frozen=True)
class SecurityGroupPlan:
    """A group with its rules, and the addresses of its member ports (for remote-group
    rules of any group that names it)."""

    sg_id: str
    rules: tuple[SecurityGroupRule, ...]
    members_v4: frozenset[ipaddress.IPv4Address] = frozenset()
    members_v6: frozenset[ipaddress.IPv6Address] = frozenset()


@dataclass(frozen=True)
class FloatingIpPlan:
    fip_id: str
    address: ipaddress.IPv4Address
    fixed_ip: ipaddress.IPv4Address
    port_id: str


@dataclass(frozen=True)
class ExternalPlan:
    """The VPC's external veth: `link` in the namespace with `address`, default route."""

    network_id: str
    link: str  # inside the VPC namespace
    host_link: str  # its peer, in the host namespace, on `host_bridge`
    host_bridge: str
    address: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address | None


@dataclass(frozen=True)
class VpcPlan:
    vpc_id: str
    netns: str
    subnets: tuple[SubnetPlan, ...] = ()
    ports: tuple[PortPlan, ...] = ()
    # Every group a port uses and every group a rule names as remote, by id.
    security_groups: dict[str, SecurityGroupPlan] = field(default_factory=dict)
    external: ExternalPlan | None = None
    floating_ips: tuple[FloatingIpPlan, ...] = ()

    def subnet(self, subnet_id: str) -> SubnetPlan:
        for subnet in self.subnets:
            if subnet.subnet_id == subnet_id:
                return subnet
        raise KeyError(subnet_id)
