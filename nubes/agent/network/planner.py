"""From store records to the plan of one VPC on this host (pure: no host access).

The plan holds the ports claimed on this host and what they need: every subnet of their
VPC (the distributed gateway routes between subnets on each host, so a VM here reaches
a VM of another subnet on another host), security groups, external gateway and floating
IPs. The namespace is on a host while one of its ports is.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from nubes.agent.network import names
from nubes.agent.network.plan import (
    ExternalPlan,
    FloatingIpPlan,
    PortPlan,
    SecurityGroupPlan,
    SubnetPlan,
    VpcPlan,
)
from nubes.ipam import link_local_address, slaac_address
from nubes.model.network import (
    FloatingIpRecord,
    IpamMode,
    NetworkRecord,
    PortRecord,
    SubnetRecord,
)
from nubes.model.security_group import SecurityGroupRecord
from nubes.model.vm import VmRecord

MAX_PORTS_PER_VPC = 4095  # the port index is 12 bits of the packet mark


@dataclass
class NetworkRecords:
    """The agent's in-memory copy of every network record in the store, by id."""

    networks: dict[str, NetworkRecord] = field(default_factory=dict)
    subnets: dict[str, SubnetRecord] = field(default_factory=dict)
    ports: dict[str, PortRecord] = field(default_factory=dict)
    security_groups: dict[str, SecurityGroupRecord] = field(default_factory=dict)
    floating_ips: dict[str, FloatingIpRecord] = field(default_factory=dict)


@dataclass(frozen=True)
class PlanProblem:
    """Something of the VPC this host cannot make as asked; the rest is made."""

    subject: str  # the id of the record concerned (a floating IP, the network)
    message: str


def hostname_of(name: str) -> str:
    """A DNS label from a VM name: lowercase letters, digits and '-', at most 63."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return label or "vm"


def port_ipv6(port: PortRecord, subnet: SubnetRecord) -> tuple[ipaddress.IPv6Address, ...]:
    """The port's global IPv6 addresses: fixed ones, else the SLAAC one the guest forms."""
    fixed = tuple(port.spec.ipv6)
    prefix = subnet.spec.network_v6
    if fixed or prefix is None or subnet.spec.ipam is IpamMode.NONE:
        return fixed
    return (slaac_address(prefix, port.spec.mac),)


def build_vpc_plan(
    *,
    prefix: str,
    vpc_id: str,
    records: NetworkRecords,
    claimed: Mapping[str, str],
    vms: Mapping[str, VmRecord],
    external_bridges: Mapping[str, str],
) -> tuple[VpcPlan, list[PlanProblem]]:
    """The plan for `vpc_id` on this host, given the ports claimed here (port id -> VM id).

    Ports whose records are gone or belong to another VPC are left out (their VMs were
    refused at start); problems that leave part of the VPC unmade are returned.
    """
    problems: list[PlanProblem] = []
    network = records.networks.get(vpc_id)
    mtu = network.spec.mtu if network is not None else 1450
    ports: list[PortPlan] = []
    subnet_ids: set[str] = set()
    for index, port_id in enumerate(sorted(claimed), start=1):
        port = records.ports.get(port_id)
        if port is None or port.spec.network != vpc_id or index > MAX_PORTS_PER_VPC:
            continue
        subnet = records.subnets.get(port.spec.subnet)
        if subnet is None:
            continue
        subnet_ids.add(subnet.id)
        vm = vms.get(claimed[port_id])
        ports.append(
            PortPlan(
                port_id=port_id,
                index=index,
                tap=names.tap_name(port_id),
                mac=port.spec.mac,
                subnet_id=subnet.id,
                ipv4=tuple(port.spec.ipv4),
                ipv6=port_ipv6(port, subnet),
                ipv6_link_local=link_local_address(port.spec.mac),
                security_groups=tuple(port.spec.security_groups),
                port_security=port.spec.port_security,
                vm_id=claimed[port_id],
                hostname=hostname_of(vm.spec.name) if vm is not None else None,
            )
        )
    if subnet_ids:
        # Routed traffic to another subnet leaves this host on that subnet's VXLAN.
        subnet_ids.update(
            subnet.id
            for subnet in records.subnets.values()
            if subnet.spec.network == vpc_id and not subnet.deleting
        )
    subnets = tuple(
        _subnet_plan(records.subnets[subnet_id], mtu) for subnet_id in sorted(subnet_ids)
    )
    plan_ports = tuple(ports)
    groups = _security_groups(records, plan_ports)
    external, floating_ips = _external(
        prefix, vpc_id, network, records, plan_ports, external_bridges, problems
    )
    plan = VpcPlan(
        vpc_id=vpc_id,
        netns=names.netns_name(prefix, vpc_id),
        subnets=subnets,
        ports=plan_ports,
        security_groups=groups,
        external=external if plan_ports else None,
        floating_ips=floating_ips,
    )
    return plan, problems


def _subnet_plan(subnet: SubnetRecord, mtu: int) -> SubnetPlan:
    spec = subnet.spec
    routed = spec.ipam is not IpamMode.NONE
    return SubnetPlan(
        subnet_id=subnet.id,
        bridge=names.bridge_name(subnet.id),
        vxlan=names.vxlan_name(subnet.id),
        vni=spec.vni,
        cidr=spec.network_v4,
        gateway=spec.gateway_v4 if routed else None,
        ipv6_cidr=spec.network_v6 if routed else None,
        ipv6_gateway=spec.gateway_v6 if routed else None,
        dhcp=spec.serves_dhcp,
        mtu=mtu,
        dns_nameservers=tuple(spec.dns_nameservers),
    )


def _security_groups(
    records: NetworkRecords, ports: Iterable[PortPlan]
) -> dict[str, SecurityGroupPlan]:
    """The groups the ports use, and the groups their rules name, with their members."""
    wanted: set[str] = set()
    for port in ports:
        if port.port_security:
            wanted.update(port.security_groups)
    remote: set[str] = set()
    for group_id in wanted:
        group = records.security_groups.get(group_id)
        if group is not None and not group.deleting:
            remote.update(r.remote_group for r in group.spec.rules if r.remote_group)
    members_v4: dict[str, set[ipaddress.IPv4Address]] = {g: set() for g in remote}
    members_v6: dict[str, set[ipaddress.IPv6Address]] = {g: set() for g in remote}
    if remote:
        for record in records.ports.values():
            subnet = records.subnets.get(record.spec.subnet)
            for group_id in remote.intersection(record.spec.security_groups):
                members_v4[group_id].update(record.spec.ipv4)
                if subnet is not None:
                    members_v6[group_id].update(port_ipv6(record, subnet))
    plans: dict[str, SecurityGroupPlan] = {}
    for group_id in sorted(wanted | remote):
        group = records.security_groups.get(group_id)
        # A group that is gone allows nothing: its ports fall back to deny.
        rules = () if group is None or group.deleting else tuple(group.spec.rules)
        plans[group_id] = SecurityGroupPlan(
            sg_id=group_id,
            rules=rules if group_id in wanted else (),
            members_v4=frozenset(members_v4.get(group_id, ())),
            members_v6=frozenset(members_v6.get(group_id, ())),
        )
    return plans


def _external(
    prefix: str,
    vpc_id: str,
    network: NetworkRecord | None,
    records: NetworkRecords,
    ports: tuple[PortPlan, ...],
    external_bridges: Mapping[str, str],
    problems: list[PlanProblem],
) -> tuple[ExternalPlan | None, tuple[FloatingIpPlan, ...]]:
    if network is None or network.spec.gateway is None or network.deleting:
        return None, ()
    gateway = network.spec.gateway
    outside = records.networks.get(gateway.network)
    if outside is None or outside.spec.external is None:
        problems.append(
            PlanProblem(vpc_id, f"network {gateway.network} is not an external network")
        )
        return None, ()
    physical = outside.spec.external.physical_network
    bridge = external_bridges.get(physical)
    if bridge is None:
        problems.append(
            PlanProblem(
                vpc_id,
                f"this host has no bridge for physical network '{physical}'; "
                f"set external_bridges in the [agent] configuration",
            )
        )
        return None, ()
    cidr = ipaddress.IPv4Network(outside.spec.external.cidr)
    external = ExternalPlan(
        network_id=outside.id,
        link=names.EXTERNAL_LINK,
        host_link=names.external_host_link(prefix, vpc_id),
        host_bridge=bridge,
        address=ipaddress.IPv4Interface(f"{gateway.address}/{cidr.prefixlen}"),
        gateway=(
            ipaddress.IPv4Address(outside.spec.external.gateway)
            if outside.spec.external.gateway
            else None
        ),
    )
    by_port = {port.port_id: port for port in ports}
    floating: list[FloatingIpPlan] = []
    for fip in sorted(records.floating_ips.values(), key=lambda f: f.id):
        spec = fip.spec
        if fip.deleting or spec.port not in by_port or spec.network != outside.id:
            continue
        port = by_port[spec.port]
        fixed = ipaddress.IPv4Address(spec.fixed_ip) if spec.fixed_ip else None
        if fixed is None and port.ipv4:
            fixed = port.ipv4[0]
        if fixed is None or fixed not in port.ipv4:
            problems.append(
                PlanProblem(fip.id, f"port {port.port_id} has no IPv4 address {spec.fixed_ip}")
            )
            continue
        floating.append(
            FloatingIpPlan(
                fip_id=fip.id,
                address=ipaddress.IPv4Address(spec.address),
                fixed_ip=fixed,
                port_id=port.port_id,
            )
        )
    return external, tuple(floating)
