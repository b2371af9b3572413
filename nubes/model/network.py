"""Network records: the VPC (network), its subnets, the ports VMs plug into, and the
external networks floating IPs come from.

A VPC is an L3 domain: on every host where it has ports it is a network namespace,
each subnet a bridge in it (carrying the gateway) with a VXLAN device for the overlay.
The three IPAM modes follow the ucloud design: `none` is a bare L2 segment, `manual`
gives each port fixed addresses but no DHCP, `automatic` adds DHCP and router
advertisements.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime
from enum import StrEnum
from typing import Self

from pydantic import Field, field_validator, model_validator

from nubes.model.common import NAME_PATTERN, Model

MAX_VNI = (1 << 24) - 1
MAC_PATTERN = r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$"
# VXLAN over IPv4 costs 50 bytes of a 1500-byte underlay.
DEFAULT_MTU = 1450


class IpamMode(StrEnum):
    NONE = "none"  # L2 only: no addresses, no gateway, no DHCP
    MANUAL = "manual"  # fixed addresses and a gateway, no DHCP or RA: the guest is told by metadata
    AUTOMATIC = "automatic"  # fixed addresses handed out by DHCP, IPv6 by SLAAC


class ExternalSpec(Model):
    """Makes a network external: a provider segment on every host, floating IPs come from it."""

    physical_network: str = Field(
        default="external",
        pattern=r"^[a-z][a-z0-9-]{0,30}$",
        description="mapped to a host bridge by each agent's external_bridges setting",
    )
    cidr: str
    gateway: str | None = Field(default=None, description="the outside router, if any")

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, value: str) -> str:
        return str(_ipv4_network(value))

    @model_validator(mode="after")
    def _gateway_inside(self) -> Self:
        if self.gateway is not None:
            _address_in(self.gateway, ipaddress.ip_network(self.cidr), "gateway")
        return self


class ExternalGateway(Model):
    """A VPC's way out: its namespace gets `address` on the external network and SNATs to it."""

    network: str = Field(description="vpc- id of an external network")
    address: str

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return str(ipaddress.IPv4Address(value))


class NetworkSpec(Model):
    name: str = Field(pattern=NAME_PATTERN)
    external: ExternalSpec | None = Field(default=None, description="set on external networks")
    gateway: ExternalGateway | None = Field(default=None, description="the VPC's SNAT way out")
    mtu: int = Field(default=DEFAULT_MTU, ge=1280, le=9000)


class NetworkRecord(Model):
    id: str
    project: str = "default"
    spec: NetworkSpec
    deleting: bool = False
    created_at: datetime


class SubnetSpec(Model):
    name: str = Field(pattern=NAME_PATTERN)
    network: str = Field(description="vpc- id")
    cidr: str = Field(description="IPv4, /16 to /29")
    gateway: str | None = Field(default=None, description="defaults to the first address")
    ipv6_cidr: str | None = Field(default=None, description="an IPv6 /64 for SLAAC")
    ipam: IpamMode = IpamMode.AUTOMATIC
    dhcp: bool = True
    vni: int = Field(ge=1, le=MAX_VNI)
    dns_nameservers: list[str] = Field(default_factory=list, max_length=4)

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, value: str) -> str:
        network = _ipv4_network(value)
        if not 16 <= network.prefixlen <= 29:
            raise ValueError(f"{value} is a /{network.prefixlen}; give a /16 to /29")
        return str(network)

    @field_validator("ipv6_cidr")
    @classmethod
    def _ipv6_cidr(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            network = ipaddress.IPv6Network(value)
        except ValueError as error:
            raise ValueError(f"{value!r} is not an IPv6 network: {error}") from None
        if network.prefixlen != 64:
            raise ValueError(f"{value} is a /{network.prefixlen}; SLAAC needs a /64")
        return str(network)

    @field_validator("dns_nameservers")
    @classmethod
    def _nameservers(cls, value: list[str]) -> list[str]:
        return [str(ipaddress.ip_address(server)) for server in value]

    @model_validator(mode="after")
    def _gateway_inside(self) -> Self:
        if self.gateway is not None:
            _address_in(self.gateway, ipaddress.ip_network(self.cidr), "gateway")
        return self

    @property
    def network_v4(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.cidr)

    @property
    def network_v6(self) -> ipaddress.IPv6Network | None:
        return None if self.ipv6_cidr is None else ipaddress.IPv6Network(self.ipv6_cidr)

    @property
    def gateway_v4(self) -> ipaddress.IPv4Address:
        if self.gateway is not None:
            return ipaddress.IPv4Address(self.gateway)
        return self.network_v4.network_address + 1

    @property
    def gateway_v6(self) -> ipaddress.IPv6Address | None:
        network = self.network_v6
        return None if network is None else network.network_address + 1

    @property
    def serves_dhcp(self) -> bool:
        return self.ipam is IpamMode.AUTOMATIC and self.dhcp


class SubnetRecord(Model):
    id: str
    project: str = "default"
    spec: SubnetSpec
    deleting: bool = False
    created_at: datetime


class PortSpec(Model):
    network: str = Field(description="vpc- id")
    subnet: str = Field(description="subnet- id")
    mac: str = Field(pattern=MAC_PATTERN)
    fixed_ips: list[str] = Field(
        default_factory=list, max_length=8, description="IPv4 from the subnet, IPv6 SLAAC"
    )
    security_groups: list[str] = Field(default_factory=list, max_length=16)
    port_security: bool = Field(default=True, description="anti-spoofing and security groups")
    vm: str | None = Field(default=None, description="the VM it is plugged into")
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    auto_delete: bool = Field(
        default=False, description="made with its VM; deleted when the VM is deleted"
    )

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str) -> str:
        if int(value[:2], 16) & 1:
            raise ValueError(f"{value} is a multicast MAC address; give a unicast one")
        return value

    @field_validator("fixed_ips")
    @classmethod
    def _fixed_ips(cls, value: list[str]) -> list[str]:
        return [str(ipaddress.ip_address(address)) for address in value]

    @property
    def ipv4(self) -> list[ipaddress.IPv4Address]:
        return [a for a in map(ipaddress.ip_address, self.fixed_ips) if a.version == 4]

    @property
    def ipv6(self) -> list[ipaddress.IPv6Address]:
        return [a for a in map(ipaddress.ip_address, self.fixed_ips) if a.version == 6]


class PortRecord(Model):
    id: str
    project: str = "default"
    spec: PortSpec
    deleting: bool = False
    created_at: datetime


class LinkState(StrEnum):
    """The state of a port or floating IP on its host."""

    DOWN = "down"
    ACTIVE = "active"
    ERROR = "error"


class PortStatus(Model):
    state: LinkState
    reason: str | None = None
    host: str
    vm: str | None = None
    device: str | None = Field(default=None, description="the tap in the VPC namespace")
    updated_at: datetime


class FloatingIpSpec(Model):
    network: str = Field(description="vpc- id of an external network")
    address: str
    port: str | None = Field(default=None, description="the port it forwards to")
    fixed_ip: str | None = Field(default=None, description="which of the port's IPv4s")

    @field_validator("address", "fixed_ip")
    @classmethod
    def _ipv4(cls, value: str | None) -> str | None:
        return None if value is None else str(ipaddress.IPv4Address(value))


class FloatingIpRecord(Model):
    id: str
    project: str = "default"
    spec: FloatingIpSpec
    deleting: bool = False
    created_at: datetime


class FloatingIpStatus(Model):
    state: LinkState
    reason: str | None = None
    host: str | None = None
    fixed_ip: str | None = None
    updated_at: datetime


class KeypairRecord(Model):
    """An SSH public key a project's VMs can be given by name (`VmSpec.key_names`)."""

    name: str = Field(pattern=NAME_PATTERN)
    project: str = "default"
    public_key: str = Field(max_length=16 * 1024)
    created_at: datetime

    @field_validator("public_key")
    @classmethod
    def _public_key(cls, value: str) -> str:
        value = value.strip()
        words = value.split()
        known = (
            "ssh-ed25519",
            "ssh-rsa",
            "ecdsa-sha2-nistp256",
            "ecdsa-sha2-nistp384",
            "ecdsa-sha2-nistp521",
            "sk-ssh-ed25519@openssh.com",
        )
        if "\n" in value or len(words) < 2 or words[0] not in known:
            raise ValueError(
                "not an OpenSSH public key: give one line like 'ssh-ed25519 AAAA... comment'"
            )
        return value


def keypair_key_name(project: str, name: str) -> str:
    """The store name of a project's key pair (names are unique within a project)."""
    return f"{project}:{name}"


def _ipv4_network(value: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(value)
    except ValueError as error:
        raise ValueError(f"{value!r} is not an IPv4 network like 198.18.0.0/24: {error}") from None


def _address_in(
    value: str, network: ipaddress.IPv4Network | ipaddress.IPv6Network, what: str
) -> None:
    address = ipaddress.ip_address(value)
    if address not in network or address in (network.network_address, network.broadcast_address):
        raise ValueError(f"{what} {value} is not a host address of {network}")
