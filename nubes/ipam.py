"""Address management, pure: pick a port's IPv4 from its subnet, predict its SLAAC IPv6,
make MACs, take a VNI from the pool. The callers keep what is used (the store); these
functions only choose.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Collection

from nubes.errors import Conflict
from nubes.model.network import MAX_VNI, SubnetSpec

# Locally administered, unicast; "nu" in the second and third byte.
MAC_PREFIX = (0x02, 0x6E, 0x75)
VNI_POOL = range(1000, MAX_VNI + 1)


def random_mac() -> str:
    """A random locally administered unicast MAC address."""
    tail = secrets.token_bytes(3)
    return ":".join(f"{byte:02x}" for byte in (*MAC_PREFIX, *tail))


def allocate_ipv4(
    subnet: SubnetSpec, used: Collection[ipaddress.IPv4Address]
) -> ipaddress.IPv4Address:
    """The lowest free host address of the subnet after its gateway.

    Raises:
        Conflict: every address is taken.
    """
    taken = {*used, subnet.gateway_v4}
    for address in subnet.network_v4.hosts():
        if address not in taken:
            return address
    raise Conflict(
        f"subnet {subnet.name} ({subnet.cidr}) has no free address left",
        hint="delete unused ports or make a larger subnet",
    )


def slaac_address(prefix: ipaddress.IPv6Network, mac: str) -> ipaddress.IPv6Address:
    """The address a guest forms from a router advertisement of `prefix` (modified EUI-64)."""
    return ipaddress.IPv6Address(int(prefix.network_address) | _interface_id(mac))


def link_local_address(mac: str) -> ipaddress.IPv6Address:
    """The guest's fe80:: address formed from its MAC (modified EUI-64)."""
    return ipaddress.IPv6Address((0xFE80 << 112) | _interface_id(mac))


def allocate_vni(used: Collection[int]) -> int:
    """The lowest VNI of the pool nobody uses.

    Raises:
        Conflict: the pool is exhausted.
    """
    taken = set(used)
    for vni in VNI_POOL:
        if vni not in taken:
            return vni
    raise Conflict("no VXLAN network identifier is left", hint="delete unused subnets")


def _interface_id(mac: str) -> int:
    octets = [int(part, 16) for part in mac.split(":")]
    if len(octets) != 6:
        raise ValueError(f"{mac!r} is not a MAC address")
    eui = [octets[0] ^ 0x02, *octets[1:3], 0xFF, 0xFE, *octets[3:]]
    return int.from_bytes(bytes(eui), "big")
