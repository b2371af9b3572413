"""Security groups compiled to nftables JSON: a few set lookups per group, not one rule per
rule, and the small expression helpers the firewall document is written with.

Pure: nothing here touches the host. firewall.py assembles the whole document.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nubes.agent.network.plan import SecurityGroupPlan
from nubes.model.security_group import Direction, EtherType, Protocol, SecurityGroupRule

Expr = Any  # one nft JSON expression or statement
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PortRange = tuple[int, int]

PROTOCOL_NUMBERS = {Protocol.TCP: 6, Protocol.UDP: 17, Protocol.ICMP: 1, Protocol.ICMPV6: 58}
_ANYWHERE: dict[EtherType, Network] = {
    EtherType.IPV4: ipaddress.IPv4Network("0.0.0.0/0"),
    EtherType.IPV6: ipaddress.IPv6Network("::/0"),
}

# -- expression helpers ------------------------------------------------------------------


def payload(protocol: str, name: str) -> Expr:
    return {"payload": {"protocol": protocol, "field": name}}


def meta(key: str) -> Expr:
    return {"meta": {"key": key}}


def match(left: Expr, right: Expr, op: str = "==") -> Expr:
    return {"match": {"op": op, "left": left, "right": right}}


def anonymous_set(values: Iterable[Expr]) -> Expr:
    return {"set": list(values)}


def jump(chain: str) -> Expr:
    return {"jump": {"target": chain}}


ACCEPT: Expr = {"accept": None}
DROP: Expr = {"drop": None}


def network_value(network: Network) -> Expr:
    """A CIDR as nft JSON: a bare address for a host route, else a prefix."""
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


def range_value(ports: PortRange) -> Expr:
    low, high = ports
    return low if low == high else {"range": [low, high]}


def ip_protocol(ethertype: EtherType) -> str:
    return "ip" if ethertype is EtherType.IPV4 else "ip6"


def address_type(ethertype: EtherType) -> str:
    return "ipv4_addr" if ethertype is EtherType.IPV4 else "ipv6_addr"


def safe_name(identifier: str) -> str:
    """An id as part of an nft object name (ids are lowercase alphanumerics and '-')."""
    return identifier.replace("-", "_")


def group_chain(sg_id: str, direction: Direction) -> str:
    return f"{safe_name(sg_id)}_{direction.value}"


def members_set(sg_id: str, ethertype: EtherType) -> str:
    return f"members_{safe_name(sg_id)}_{'v4' if ethertype is EtherType.IPV4 else 'v6'}"


# -- making set elements disjoint ---------------------------------------------------------


def merge_ranges(ranges: Iterable[PortRange]) -> tuple[PortRange, ...]:
    """Sorted port ranges with overlapping and adjacent ones joined."""
    merged: list[PortRange] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return tuple(merged)


def subtract_ranges(ranges: tuple[PortRange, ...], taken: tuple[PortRange, ...]) -> list[PortRange]:
    """The parts of merged `ranges` that merged `taken` does not cover."""
    left: list[PortRange] = []
    for low, high in ranges:
        for taken_low, taken_high in taken:
            if taken_high < low or taken_low > high:
                continue
            if taken_low > low:
                left.append((low, taken_low - 1))
            low = taken_high + 1
            if low > high:
                break
        if low <= high:
            left.append((low, high))
    return left


def disjoint_boxes(
    ranges_by_network: Mapping[Network, Iterable[PortRange]],
) -> list[tuple[Network, PortRange]]:
    """(network, port range) pairs that allow exactly what the input allows, none overlapping.

    The kernel's concatenated interval sets (pipapo) refuse an element that partly overlaps
    another, as nested CIDRs with overlapping ports do. Each CIDR keeps only the ports that
    the CIDRs containing it do not already allow: boxes on nested CIDRs then have disjoint
    ports, and an address still gets the ports of every CIDR that contains it.
    """
    networks = sorted(ranges_by_network, key=lambda n: (n.network_address, n.prefixlen))
    effective: dict[Network, tuple[PortRange, ...]] = {}  # with what its ancestors allow
    by_range: dict[PortRange, list[Network]] = defaultdict(list)
    ancestors: list[Network] = []  # the chain of CIDRs containing the current one
    for network in networks:
        while ancestors and not network.subnet_of(ancestors[-1]):  # type: ignore[arg-type]
            ancestors.pop()
        inherited = effective[ancestors[-1]] if ancestors else ()
        added = subtract_ranges(merge_ranges(ranges_by_network[network]), inherited)
        if not added:
            continue  # inside a CIDR that already allows all of it: redundant
        effective[network] = merge_ranges((*inherited, *added))
        ancestors.append(network)
        for port_range in added:
            by_range[port_range].append(network)
    boxes = [
        (network, port_range)
        for port_range, found in by_range.items()
        for network in ipaddress.collapse_addresses(found)  # type: ignore[type-var]
    ]
    return sorted(boxes, key=lambda box: (box[0].network_address, box[0].prefixlen, box[1]))


def collapse(networks: Iterable[Network]) -> list[Network]:
    return list(ipaddress.collapse_addresses(networks))  # type: ignore[type-var]


# -- compiling one group's rules of one direction ------------------------------------------


@dataclass
class CompiledGroup:
    """One group's rules of one direction: the chain's rules and the sets they look up.

    `remote_groups` lists the (group, ethertype) member sets the rules reference; the
    caller defines each once per table.
    """

    chain: str
    sets: list[dict[str, Any]] = field(default_factory=list)
    rules: list[list[Expr]] = field(default_factory=list)
    remote_groups: set[tuple[str, EtherType]] = field(default_factory=set)


@dataclass
class _Buckets:
    ported: dict[int, dict[Network, list[PortRange]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    protocols: dict[int, list[Network]] = field(default_factory=lambda: defaultdict(list))
    anything: list[Network] = field(default_factory=list)
    icmp_types: dict[Network, list[PortRange]] = field(default_factory=lambda: defaultdict(list))
    single: list[list[Expr]] = field(default_factory=list)


def compile_group(
    group: SecurityGroupPlan, direction: Direction, family: str, table: str
) -> CompiledGroup:
    """The chain body of `group` for `direction`: ingress matches the peer as the source
    (`saddr`), egress as the destination (`daddr`). Each rule that names ports, a protocol
    an ICMP type or nothing becomes an element of a per-family interval set; remote-group
    rules stay single rules (their set is the group's members). Every match ends in accept."""
    peer = "saddr" if direction is Direction.INGRESS else "daddr"
    compiled = CompiledGroup(chain=group_chain(group.sg_id, direction))
    buckets = {EtherType.IPV4: _Buckets(), EtherType.IPV6: _Buckets()}
    for rule in group.rules:
        if rule.direction is direction:
            _sort_rule(rule, peer, buckets[rule.ethertype], compiled)
    for ethertype, bucket in buckets.items():
        _emit_sets(compiled, bucket, ethertype, peer, family, table)
        compiled.rules += bucket.single
    return compiled


def _protocol_match(rule: SecurityGroupRule) -> list[Expr]:
    """What a single rule says about protocol and ports (nothing for protocol any)."""
    if rule.protocol is Protocol.ANY:
        return []
    if rule.protocol in (Protocol.ICMP, Protocol.ICMPV6):
        name = rule.protocol.value
        if rule.port_min is not None:
            return [match(payload(name, "type"), rule.port_min)]
        return [match(meta("l4proto"), PROTOCOL_NUMBERS[rule.protocol])]
    found = [match(meta("l4proto"), PROTOCOL_NUMBERS[rule.protocol])]
    if rule.ports is not None:
        found.append(match(payload("th", "dport"), range_value(rule.ports)))
    return found


def _sort_rule(
    rule: SecurityGroupRule, peer: str, bucket: _Buckets, compiled: CompiledGroup
) -> None:
    address = payload(ip_protocol(rule.ethertype), peer)
    if rule.remote_group is not None:
        compiled.remote_groups.add((rule.remote_group, rule.ethertype))
        remote = match(address, "@" + members_set(rule.remote_group, rule.ethertype))
        bucket.single.append([remote, *_protocol_match(rule), ACCEPT])
        return
    network: Network = (
        ipaddress.ip_network(rule.remote_cidr)
        if rule.remote_cidr is not None
        else _ANYWHERE[rule.ethertype]
    )
    if rule.protocol in (Protocol.ICMP, Protocol.ICMPV6) and rule.port_min is not None:
        bucket.icmp_types[network].append((rule.port_min, rule.port_min))
    elif rule.protocol is Protocol.ANY:
        bucket.anything.append(network)
    elif rule.ports is not None:
        bucket.ported[PROTOCOL_NUMBERS[rule.protocol]][network].append(rule.ports)
    else:
        bucket.protocols[PROTOCOL_NUMBERS[rule.protocol]].append(network)


def _emit_sets(
    compiled: CompiledGroup,
    bucket: _Buckets,
    ethertype: EtherType,
    peer: str,
    family: str,
    table: str,
) -> None:
    version = "v4" if ethertype is EtherType.IPV4 else "v6"
    address = payload(ip_protocol(ethertype), peer)
    base = f"{compiled.chain}_{version}"

    def add_set(suffix: str, types: list[str], elements: list[Expr], key: list[Expr]) -> None:
        name = f"{base}_{suffix}"
        compiled.sets.append(
            {
                "family": family,
                "table": table,
                "name": name,
                "type": types[0] if len(types) == 1 else types,
                "flags": ["interval"],
                "elem": elements,
            }
        )
        left = key[0] if len(key) == 1 else {"concat": key}
        compiled.rules.append([match(left, "@" + name), ACCEPT])

    ported = [
        {"concat": [network_value(network), protocol, range_value(ports)]}
        for protocol in sorted(bucket.ported)
        for network, ports in disjoint_boxes(bucket.ported[protocol])
    ]
    if ported:
        key = [address, meta("l4proto"), payload("th", "dport")]
        add_set("ports", [address_type(ethertype), "inet_proto", "inet_service"], ported, key)
    icmp = [
        {"concat": [network_value(network), range_value(types)]}
        for network, types in disjoint_boxes(bucket.icmp_types)
    ]
    if icmp:
        name = "icmp" if ethertype is EtherType.IPV4 else "icmpv6"
        key = [address, payload(name, "type")]
        add_set("icmp", [address_type(ethertype), f"{name}_type"], icmp, key)
    protocols = [
        {"concat": [network_value(network), protocol]}
        for protocol in sorted(bucket.protocols)
        for network in collapse(bucket.protocols[protocol])
    ]
    if protocols:
        key = [address, meta("l4proto")]
        add_set("protocols", [address_type(ethertype), "inet_proto"], protocols, key)
    if bucket.anything:
        networks = collapse(bucket.anything)
        if any(network.prefixlen == 0 for network in networks):
            # Anywhere, any protocol: a plain family match, no set needed.
            compiled.rules.append(
                [match(payload("ether", "type"), ip_protocol(ethertype)), ACCEPT]
                if family == "bridge"
                else [match(meta("nfproto"), "ipv4" if version == "v4" else "ipv6"), ACCEPT]
            )
        else:
            add_set(
                "any", [address_type(ethertype)], [network_value(n) for n in networks], [address]
            )
