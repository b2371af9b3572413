"""The nftables firewall of one VPC namespace: anti-spoofing and security groups per port,
and NAT for floating IPs and the external network, loaded as one atomic JSON document.

Two tables. `bridge nubes` knows the taps and is stateless: it drops spoofed frames as
they enter, marks each frame with its port's index (mark bits 0-11), and applies the
destination port's ingress rules as frames leave (bridge forward and output hooks).
`inet nubes` sees bridged IP through br_netfilter and so has conntrack: it applies the
source port's egress rules, and sets mark bit 30 on established and related packets,
which the bridge table takes as "a reply of an allowed connection" (the kernel has no
nf_conntrack_bridge, so the bridge family cannot match `ct` itself). The namespace needs
net.bridge.bridge-nf-call-ip{,6}tables=1 and forwarding on (links.py sets them).
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from nubes.agent.network.firewall_rules import (
    ACCEPT,
    DROP,
    CompiledGroup,
    Expr,
    anonymous_set,
    compile_group,
    group_chain,
    jump,
    match,
    members_set,
    meta,
    network_value,
    payload,
)
from nubes.agent.network.nsutil import netns_exists
from nubes.agent.network.plan import PortPlan, VpcPlan
from nubes.errors import CommandFailed, NubesError
from nubes.model.security_group import Direction, EtherType
from nubes.process import run_tool_async

TABLE = "nubes"
PORT_INDEX_MASK = 0xFFF
ESTABLISHED_BIT = 0x40000000
METADATA_V4 = "169.254.169.254"
METADATA_V6 = "fe80::a9fe:a9fe"
UNSPECIFIED_V4 = "0.0.0.0"  # noqa: S104 - the source of a DHCP client without an address
# MLD query/report/done, router solicit/advert, neighbour solicit/advert, MLDv2 report.
_ND_TO_PORT = [130, 131, 132, 134, 135, 136, 143]
_ND_FROM_PORT = [131, 132, 133, 135, 136, 143]
_ROUTER_ONLY_ICMPV6 = [134, 137]  # router advertisement, redirect
# DHCP, DHCPv6 and router solicitations/advertisements stay on their host: each host's
# dnsmasq answers its own VMs, and another host's must not answer them over the overlay.
_HOST_LOCAL_UDP = [67, 68, 546, 547]
_HOST_LOCAL_ICMPV6 = [133, 134]


class FirewallError(NubesError):
    """nft refused a ruleset or could not be run in the namespace."""

    code = "firewall_error"


def _command(verb: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
    return {verb: {kind: body}}


def _rule(family: str, chain: str, expressions: list[Expr]) -> dict[str, Any]:
    return _command(
        "add", "rule", {"family": family, "table": TABLE, "chain": chain, "expr": expressions}
    )


def _chain(family: str, name: str, hook: tuple[str, str, int] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"family": family, "table": TABLE, "name": name}
    if hook is not None:
        kind, hook_name, priority = hook
        body |= {"type": kind, "hook": hook_name, "prio": priority, "policy": "accept"}
    return _command("add", "chain", body)


def _replace_tables() -> list[dict[str, Any]]:
    """Add-delete-add of both tables: in one transaction this empties whatever was there
    (or nothing) without a moment with no rules, and fails as a whole or not at all."""
    commands = []
    for family in ("bridge", "inet"):
        table = {"family": family, "name": TABLE}
        commands += [_command("add", "table", table), _command("delete", "table", table)]
    return commands


def _mark_is(port_index_or_zero: int) -> Expr:
    return match({"&": [meta("mark"), PORT_INDEX_MASK]}, port_index_or_zero)


_ESTABLISHED = match({"ct": {"key": "state"}}, ["established", "related"], "in")
_SET_ESTABLISHED_BIT = {
    "mangle": {"key": meta("mark"), "value": {"|": [meta("mark"), ESTABLISHED_BIT]}}
}
_HAS_ESTABLISHED_BIT = match({"&": [meta("mark"), ESTABLISHED_BIT]}, 0, "!=")


def _udp(source: int, destination: int) -> list[Expr]:
    return [match(payload("udp", "sport"), source), match(payload("udp", "dport"), destination)]


def port_out_rules(port: PortPlan) -> list[list[Expr]]:
    """Frames entering the bridge from `port`: mark them with its index and, with port
    security, drop what does not come from its MAC and addresses."""
    rules: list[list[Expr]] = [[{"mangle": {"key": meta("mark"), "value": port.index}}]]
    if not port.port_security:
        return rules
    rules.append([match(payload("ether", "saddr"), port.mac, "!="), DROP])
    ipv4 = [str(address) for address in sorted(set(port.ipv4))]
    fixed = bool(port.ipv4 or port.ipv6)  # no fixed IPs at all (IPAM none): filtered on MAC only
    rules.append([match(payload("arp", "saddr ether"), port.mac, "!="), DROP])
    if ipv4:
        allowed = anonymous_set([UNSPECIFIED_V4, *ipv4])
        rules.append([match(payload("arp", "saddr ip"), allowed, "!="), DROP])
    rules.append([match(payload("ether", "type"), "arp"), ACCEPT])
    # Acting as a DHCP or DHCPv6 server is never allowed.
    rules.append([match(payload("udp", "sport"), anonymous_set([67, 547])), DROP])
    if ipv4:
        rules.append([match(payload("ip", "saddr"), UNSPECIFIED_V4), *_udp(68, 67), ACCEPT])
        rules.append([match(payload("ip", "saddr"), anonymous_set(ipv4), "!="), DROP])
    rules.append([match(payload("ether", "type"), "ip"), ACCEPT])
    rules.append([match(payload("icmpv6", "type"), anonymous_set(_ROUTER_ONLY_ICMPV6)), DROP])
    if fixed:
        unspecified = ipaddress.IPv6Address("::")  # DAD and MLD before an address is up
        sources = sorted({unspecified, port.ipv6_link_local, *port.ipv6})
        allowed6 = anonymous_set(str(address) for address in sources)
        rules.append([match(payload("ip6", "saddr"), allowed6, "!="), DROP])
    rules.append([match(payload("ether", "type"), "ip6"), ACCEPT])
    rules.append([DROP])  # VLAN tags and every other ethertype
    return rules


def overlay_rules() -> list[list[Expr]]:
    """Frames between a DHCP-served subnet's VXLAN and the bridge: what stays on the host."""
    return [
        [match(payload("udp", "dport"), anonymous_set(_HOST_LOCAL_UDP)), DROP],
        [match(payload("icmpv6", "type"), anonymous_set(_HOST_LOCAL_ICMPV6)), DROP],
    ]


def _overlay_objects(plan: VpcPlan) -> list[dict[str, Any]]:
    """Base chains that send what enters from or leaves to a DHCP-served subnet's VXLAN
    through `overlay_rules` (no chains when no subnet here serves DHCP)."""
    family = "bridge"
    vxlans = sorted(subnet.vxlan for subnet in plan.subnets if subnet.dhcp)
    if not vxlans:
        return []
    commands = [
        _chain(family, "overlay"),
        # Before the ports' own chains (-300 and -100): this is about the host, not a port.
        _chain(family, "overlay_in", ("filter", "prerouting", -310)),
        _chain(family, "overlay_out_forward", ("filter", "forward", -110)),
        _chain(family, "overlay_out_output", ("filter", "output", -110)),
    ]
    commands += [_rule(family, "overlay", rule) for rule in overlay_rules()]
    entering = match(meta("iifname"), anonymous_set(vxlans))
    leaving = match(meta("oifname"), anonymous_set(vxlans))
    commands.append(_rule(family, "overlay_in", [entering, jump("overlay")]))
    for chain in ("overlay_out_forward", "overlay_out_output"):
        commands.append(_rule(family, chain, [leaving, jump("overlay")]))
    return commands


def port_in_rules(port: PortPlan) -> list[list[Expr]]:
    """Frames the bridge sends to a port-security `port`: replies, ARP, DHCP and ND, then
    what its groups' ingress rules allow."""
    rules: list[list[Expr]] = [
        [_HAS_ESTABLISHED_BIT, ACCEPT],
        [match(payload("ether", "type"), "arp"), ACCEPT],
        [*_udp(67, 68), ACCEPT],
        [*_udp(547, 546), ACCEPT],
        [match(payload("icmpv6", "type"), anonymous_set(_ND_TO_PORT)), ACCEPT],
    ]
    rules += [[jump(group_chain(sg, Direction.INGRESS))] for sg in port.security_groups]
    rules.append([DROP])
    return rules


def port_egress_rules(port: PortPlan) -> list[list[Expr]]:
    """New connections from a port-security `port`: DHCP, metadata and ND, then what its
    groups' egress rules allow."""
    rules: list[list[Expr]] = [
        [match({"ct": {"key": "state"}}, ["invalid"], "in"), DROP],
        [*_udp(68, 67), ACCEPT],
        [match(payload("ip6", "daddr"), "ff02::1:2"), *_udp(546, 547), ACCEPT],
        [match(payload("ip", "daddr"), METADATA_V4), match(payload("tcp", "dport"), 80), ACCEPT],
        [match(payload("ip6", "daddr"), METADATA_V6), match(payload("tcp", "dport"), 80), ACCEPT],
        [match(payload("icmpv6", "type"), anonymous_set(_ND_FROM_PORT)), ACCEPT],
    ]
    rules += [[jump(group_chain(sg, Direction.EGRESS))] for sg in port.security_groups]
    rules.append([DROP])
    return rules


def _groups(plan: VpcPlan, direction: Direction, family: str) -> list[CompiledGroup]:
    used = sorted({sg for port in plan.ports if port.port_security for sg in port.security_groups})
    compiled = []
    for sg_id in used:
        group = plan.security_groups.get(sg_id)
        if group is None:
            raise FirewallError(
                f"port security group {sg_id} is not in the plan of {plan.vpc_id}",
                hint="this is a bug in the VPC controller: every group a port uses is planned",
            )
        compiled.append(compile_group(group, direction, family, TABLE))
    return compiled


def _group_objects(
    plan: VpcPlan, direction: Direction, family: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(chain and set commands, rule commands) of every used group in one direction."""
    objects: list[dict[str, Any]] = []
    rules: list[dict[str, Any]] = []
    remote: set[tuple[str, EtherType]] = set()
    for group in _groups(plan, direction, family):
        objects.append(_chain(family, group.chain))
        objects += [_command("add", "set", body) for body in group.sets]
        rules += [_rule(family, group.chain, expressions) for expressions in group.rules]
        remote |= group.remote_groups
    for sg_id, ethertype in sorted(remote):
        target = plan.security_groups.get(sg_id)
        members: list[str] = []
        if target is not None:
            found = target.members_v4 if ethertype is EtherType.IPV4 else target.members_v6
            members = [str(address) for address in sorted(found)]
        body: dict[str, Any] = {
            "family": family,
            "table": TABLE,
            "name": members_set(sg_id, ethertype),
            "type": "ipv4_addr" if ethertype is EtherType.IPV4 else "ipv6_addr",
        }
        if members:
            body["elem"] = members
        objects.append(_command("add", "set", body))
    return objects, rules


def _bridge_table(plan: VpcPlan) -> list[dict[str, Any]]:
    family = "bridge"
    ports = sorted(plan.ports, key=lambda port: port.index)
    secured = [port for port in ports if port.port_security]
    objects = [
        _chain(family, "ports_out", ("filter", "prerouting", -300)),
        # -100: before br_netfilter's own forward hook (priority 0).
        _chain(family, "ports_in_forward", ("filter", "forward", -100)),
        _chain(family, "ports_in_output", ("filter", "output", -100)),
    ]
    rules: list[dict[str, Any]] = []
    for port in ports:
        objects.append(_chain(family, f"port{port.index}_out"))
        rules += [_rule(family, f"port{port.index}_out", r) for r in port_out_rules(port)]
    for port in secured:
        objects.append(_chain(family, f"port{port.index}_in"))
        rules += [_rule(family, f"port{port.index}_in", r) for r in port_in_rules(port)]
    if ports:
        entries = [[port.tap, jump(f"port{port.index}_out")] for port in ports]
        vmap = {"vmap": {"key": meta("iifname"), "data": {"set": entries}}}
        rules.append(_rule(family, "ports_out", [vmap]))
    if secured:
        entries = [[port.tap, jump(f"port{port.index}_in")] for port in secured]
        vmap = {"vmap": {"key": meta("oifname"), "data": {"set": entries}}}
        rules += [_rule(family, chain, [vmap]) for chain in ("ports_in_forward", "ports_in_output")]
    group_objects, group_rules = _group_objects(plan, Direction.INGRESS, family)
    return objects + group_objects + group_rules + rules + _overlay_objects(plan)


def _inet_table(plan: VpcPlan) -> list[dict[str, Any]]:
    family = "inet"
    secured = sorted((p for p in plan.ports if p.port_security), key=lambda p: p.index)
    objects = [
        # -150: after conntrack (-200), so `ct state` is known.
        _chain(family, "prerouting", ("filter", "prerouting", -150)),
        _chain(family, "output", ("filter", "output", -150)),
    ]
    rules = [
        _rule(family, "prerouting", [_ESTABLISHED, _SET_ESTABLISHED_BIT]),
        _rule(family, "prerouting", [_mark_is(0), ACCEPT]),  # not from a port
        _rule(family, "prerouting", [_ESTABLISHED, ACCEPT]),
        # Replies of the namespace's own servers (metadata, dnsmasq) to ports.
        _rule(family, "output", [_ESTABLISHED, _SET_ESTABLISHED_BIT]),
    ]
    for port in secured:
        objects.append(_chain(family, f"port{port.index}_egress"))
        rules += [_rule(family, f"port{port.index}_egress", r) for r in port_egress_rules(port)]
    if secured:
        entries = [[port.index, jump(f"port{port.index}_egress")] for port in secured]
        key = {"&": [meta("mark"), PORT_INDEX_MASK]}
        rules.append(
            _rule(family, "prerouting", [{"vmap": {"key": key, "data": {"set": entries}}}])
        )
    group_objects, group_rules = _group_objects(plan, Direction.EGRESS, family)
    return objects + group_objects + group_rules + rules + _nat(plan)


def _nat(plan: VpcPlan) -> list[dict[str, Any]]:
    """DNAT of floating IPs to their fixed IPs, SNAT to them, and SNAT of everything else
    that leaves through the external link to the VPC's external address."""
    if plan.external is None:
        return []
    family, link = "inet", plan.external.link
    commands = [
        _chain(family, "nat_prerouting", ("nat", "prerouting", -100)),
        _chain(family, "nat_postrouting", ("nat", "postrouting", 100)),
    ]
    out = match(meta("oifname"), link)
    for fip in sorted(plan.floating_ips, key=lambda f: (f.address, f.fip_id)):
        dnat = {"dnat": {"family": "ip", "addr": str(fip.fixed_ip)}}
        commands.append(
            _rule(family, "nat_prerouting", [match(payload("ip", "daddr"), str(fip.address)), dnat])
        )
        snat = {"snat": {"family": "ip", "addr": str(fip.address)}}
        source = match(payload("ip", "saddr"), str(fip.fixed_ip))
        commands.append(_rule(family, "nat_postrouting", [out, source, snat]))
    masquerade = {"snat": {"family": "ip", "addr": str(plan.external.address.ip)}}
    for subnet in sorted(plan.subnets, key=lambda s: s.subnet_id):
        source = match(payload("ip", "saddr"), network_value(subnet.cidr))
        commands.append(_rule(family, "nat_postrouting", [out, source, masquerade]))
    return commands


def build_ruleset(plan: VpcPlan) -> dict[str, Any]:
    """The whole firewall of `plan`'s namespace as one nft JSON document, which replaces
    both nubes tables in one transaction. Pure and deterministic.

    Raises:
        FirewallError: a port names a security group the plan does not carry.
    """
    commands = _replace_tables()
    commands += [_command("add", "table", {"family": f, "name": TABLE}) for f in ("bridge", "inet")]
    commands += _bridge_table(plan) + _inet_table(plan)
    return {"nftables": [{"metainfo": {"json_schema_version": 1}}, *commands]}


async def _load(netns: str, document: dict[str, Any]) -> None:
    data = json.dumps(document, separators=(",", ":")).encode()
    try:
        await run_tool_async(["ip", "netns", "exec", netns, "nft", "-j", "-f", "-"], stdin=data)
    except CommandFailed as error:
        raise FirewallError(
            f"nft refused the firewall of namespace {netns}: {error.stderr or error.message}"
        ) from error


async def apply_ruleset(netns: str, document: dict[str, Any]) -> None:
    """Loads a `build_ruleset` document into `netns`: all of it or, on error, none of it.

    Raises:
        FirewallError: nft refused the document, or the namespace does not exist.
        ToolMissing: ip or nft is not installed.
    """
    await _load(netns, document)


async def remove_ruleset(netns: str) -> None:
    """Deletes nubes' tables in `netns`; nothing to do when they or the namespace are gone.

    Raises:
        FirewallError: nft failed.
        ToolMissing: ip or nft is not installed.
    """
    if not netns_exists(netns):
        return
    await _load(netns, {"nftables": _replace_tables()})
