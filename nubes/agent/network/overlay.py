"""The overlay across hosts, as Neutron's l2pop does it: from the store, which forwarding
and neighbour entries one subnet's VXLAN on this host should have (pure: no host access).

A port counts where its status says it is active. Every other host with an active port of
the subnet gets a flood entry (broadcast and unknown unicast go there, no multicast), each
remote port a static FDB entry to its host and permanent neighbour entries for its
addresses, which the VXLAN answers ARP and ND with (proxy on) instead of flooding them.
The subnet's gateway is the same on every host (an anycast gateway): its addresses are
answered locally too, so asking for the gateway never crosses hosts.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from nubes.agent.network.links import METADATA_LINK_LOCAL, bridge_mac
from nubes.agent.network.plan import SubnetPlan
from nubes.agent.network.planner import NetworkRecords, port_ipv6
from nubes.ipam import link_local_address
from nubes.model.network import LinkState, PortStatus

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ZERO_MAC = "00:00:00:00:00:00"  # the FDB key of broadcast and unknown unicast


@dataclass(frozen=True)
class OverlayPlan:
    """What the VXLAN of one subnet should carry: flood destinations (underlay addresses),
    MAC -> underlay address, and IP -> MAC for ARP/ND answered by the VXLAN itself."""

    flood: frozenset[ipaddress.IPv4Address] = frozenset()
    fdb: Mapping[str, ipaddress.IPv4Address] = field(default_factory=dict)
    neighbours: Mapping[IpAddress, str] = field(default_factory=dict)
    # Hosts with active ports of the subnet whose underlay address nobody knows (yet).
    unreachable_hosts: frozenset[str] = frozenset()


def parse_underlay(value: str | None) -> ipaddress.IPv4Address | None:
    """A host record's underlay address, or None when it has none or a bad one."""
    if value is None:
        return None
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        return None


def remote_host_of(status: PortStatus | None, host: str) -> str | None:
    """The host a port is active on, when that is not `host`; else None."""
    if status is None or status.state is not LinkState.ACTIVE or status.host == host:
        return None
    return status.host


def build_overlay_plan(
    *,
    host: str,
    subnet: SubnetPlan,
    records: NetworkRecords,
    port_statuses: Mapping[str, PortStatus],
    underlays: Mapping[str, ipaddress.IPv4Address],
) -> OverlayPlan:
    """The entries of `subnet`'s VXLAN on `host`, given where every port is active
    (port id -> status) and every host's underlay address (host -> address)."""
    flood: set[ipaddress.IPv4Address] = set()
    fdb: dict[str, ipaddress.IPv4Address] = {}
    neighbours: dict[IpAddress, str] = {}
    unreachable: set[str] = set()
    subnet_record = records.subnets.get(subnet.subnet_id)
    local_underlay = underlays.get(host)
    for port_id, port in sorted(records.ports.items()):
        if port.spec.subnet != subnet.subnet_id:
            continue
        where = remote_host_of(port_statuses.get(port_id), host)
        if where is None:
            continue
        underlay = underlays.get(where)
        if underlay is None or underlay == local_underlay:
            unreachable.add(where)
            continue
        flood.add(underlay)
        mac = port.spec.mac
        fdb[mac] = underlay
        addresses: list[IpAddress] = [*port.spec.ipv4, link_local_address(mac)]
        if subnet_record is not None:
            addresses += port_ipv6(port, subnet_record)
        for address in addresses:
            neighbours[address] = mac
    if subnet.gateway is not None:
        gateway_mac = bridge_mac(subnet.bridge)
        gateways: list[IpAddress] = [
            subnet.gateway,
            link_local_address(gateway_mac),
            METADATA_LINK_LOCAL.ip,
        ]
        if subnet.ipv6_gateway is not None:
            gateways.append(subnet.ipv6_gateway)
        for address in gateways:
            neighbours[address] = gateway_mac
    return OverlayPlan(
        flood=frozenset(flood),
        fdb=fdb,
        neighbours=neighbours,
        unreachable_hosts=frozenset(unreachable),
    )
