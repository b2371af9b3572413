"""The firewall document as data: what build_ruleset makes of a plan, without nft."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
from typing import Any

import pytest

from nubes.agent.network.firewall import (
    ESTABLISHED_BIT,
    FirewallError,
    build_ruleset,
    remove_ruleset,
)
from nubes.agent.network.firewall_rules import compile_group, disjoint_boxes
from nubes.agent.network.plan import (
    ExternalPlan,
    FloatingIpPlan,
    PortPlan,
    SecurityGroupPlan,
    SubnetPlan,
    VpcPlan,
)
from nubes.model.security_group import Direction, SecurityGroupRule
from tests.support.netlab import wide_group_rules

WEB = "sg-web0000001"
PEERS = "sg-peers00001"


def rule(**fields: Any) -> SecurityGroupRule:
    return SecurityGroupRule(**fields)


def make_port(index: int, **changes: Any) -> PortPlan:
    fields: dict[str, Any] = {
        "port_id": f"pt-{index:010d}",
        "index": index,
        "tap": f"tp-{index}",
        "mac": f"02:00:00:00:00:{index:02x}",
        "subnet_id": "sn-aaaaaaaaaa",
        "ipv4": (ipaddress.IPv4Address(f"198.18.1.{10 + index}"),),
        "ipv6": (ipaddress.IPv6Address(f"2001:db8:1::{10 + index:x}"),),
        "ipv6_link_local": ipaddress.IPv6Address(f"fe80::ff:fe00:{index:x}"),
        "security_groups": (WEB,),
        "port_security": True,
        "vm_id": None,
        "hostname": None,
    }
    return PortPlan(**(fields | changes))


WEB_RULES = (
    rule(direction="ingress", protocol="tcp", port_min=80, port_max=80),
    rule(
        direction="ingress", protocol="tcp", port_min=8000, port_max=8100,
        remote_cidr="198.18.0.0/16",
    ),
    rule(direction="ingress", protocol="udp", port_min=53, port_max=53),
    rule(direction="ingress", protocol="tcp"),
    rule(direction="ingress", protocol="icmp", port_min=8),
    rule(direction="ingress", protocol="icmp"),
    rule(direction="ingress", ethertype="ipv6", protocol="icmpv6", port_min=128),
    rule(
        direction="ingress", ethertype="ipv6", protocol="tcp", port_min=22, port_max=22,
        remote_cidr="2001:db8::/32",
    ),
    rule(direction="ingress", protocol="any", remote_cidr="198.19.0.0/24"),
    rule(direction="ingress", protocol="tcp", port_min=5432, port_max=5432, remote_group=PEERS),
    rule(direction="ingress", ethertype="ipv6", remote_group=PEERS),
    rule(direction="egress"),
    rule(direction="egress", ethertype="ipv6", protocol="udp", remote_cidr="2001:db8:2::/48"),
)  # fmt: skip


def small_plan(**changes: Any) -> VpcPlan:
    subnet = SubnetPlan(
        "sn-aaaaaaaaaa", "br-a", "vx-a", 7, ipaddress.IPv4Network("198.18.1.0/24"),
        ipaddress.IPv4Address("198.18.1.1"), None, None, True, 1450,
    )  # fmt: skip
    groups = {
        WEB: SecurityGroupPlan(WEB, WEB_RULES),
        PEERS: SecurityGroupPlan(
            PEERS,
            (),
            frozenset({ipaddress.IPv4Address("198.18.1.50")}),
            frozenset({ipaddress.IPv6Address("2001:db8:1::50")}),
        ),
    }
    external = ExternalPlan(
        "nt-external01", "ext0", "hx", "hbr", ipaddress.IPv4Interface("198.19.0.2/24"), None
    )
    fip = FloatingIpPlan(
        "fi-aaaaaaaaaa",
        ipaddress.IPv4Address("198.19.0.10"),
        ipaddress.IPv4Address("198.18.1.11"),
        "pt-0000000001",
    )
    fields: dict[str, Any] = {
        "vpc_id": "nt-aaaaaaaaaa",
        "netns": "x-nt-aaaaaaaaaa",
        "subnets": (subnet,),
        "ports": (make_port(1), make_port(2, security_groups=(WEB, PEERS))),
        "security_groups": groups,
        "external": external,
        "floating_ips": (fip,),
    }
    return VpcPlan(**(fields | changes))


# -- reading a document -----------------------------------------------------------------------


def objects(document: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [c["add"][kind] for c in document["nftables"] if kind in c.get("add", {})]


def chain(document: dict[str, Any], family: str, name: str) -> dict[str, Any]:
    (found,) = [c for c in objects(document, "chain") if (c["family"], c["name"]) == (family, name)]
    return found


def rules(document: dict[str, Any], family: str, name: str) -> list[list[Any]]:
    chain(document, family, name)  # it exists
    return [
        r["expr"] for r in objects(document, "rule") if (r["family"], r["chain"]) == (family, name)
    ]


def named_set(document: dict[str, Any], family: str, name: str) -> dict[str, Any]:
    (found,) = [s for s in objects(document, "set") if (s["family"], s["name"]) == (family, name)]
    return found


def text(expressions: Any) -> str:
    return json.dumps(expressions)


# -- the document -------------------------------------------------------------------------------


def test_the_document_replaces_both_tables_in_one_transaction() -> None:
    commands = build_ruleset(small_plan())["nftables"]
    tables = [c for c in commands if "table" in next(iter(c.values()), {})]
    assert tables[:6] == [
        {"add": {"table": {"family": "bridge", "name": "nubes"}}},
        {"delete": {"table": {"family": "bridge", "name": "nubes"}}},
        {"add": {"table": {"family": "inet", "name": "nubes"}}},
        {"delete": {"table": {"family": "inet", "name": "nubes"}}},
        {"add": {"table": {"family": "bridge", "name": "nubes"}}},
        {"add": {"table": {"family": "inet", "name": "nubes"}}},
    ]
    assert len(tables) == 6


def test_the_document_is_deterministic_whatever_the_order_of_the_plan() -> None:
    plan = small_plan()
    shuffled = small_plan(
        ports=tuple(reversed(plan.ports)),
        security_groups=dict(reversed(list(plan.security_groups.items()))),
    )
    assert json.dumps(build_ruleset(plan)) == json.dumps(build_ruleset(shuffled))
    assert build_ruleset(plan) == build_ruleset(plan)


def test_frames_from_a_tap_jump_to_their_port_chain_which_marks_and_checks_the_source() -> None:
    document = build_ruleset(small_plan())
    hook = chain(document, "bridge", "ports_out")
    assert (hook["hook"], hook["prio"]) == ("prerouting", -300)
    [[vmap]] = rules(document, "bridge", "ports_out")
    assert vmap["vmap"]["key"] == {"meta": {"key": "iifname"}}
    assert vmap["vmap"]["data"]["set"] == [
        ["tp-1", {"jump": {"target": "port1_out"}}],
        ["tp-2", {"jump": {"target": "port2_out"}}],
    ]
    out = rules(document, "bridge", "port1_out")
    assert out[0] == [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 1}}]
    body = text(out)
    for expected in (
        '"field": "saddr"}}, "right": "02:00:00:00:00:01"}}, {"drop": null}',
        '"field": "saddr ether"}}, "right": "02:00:00:00:00:01"}}, {"drop": null}',
        '"field": "saddr ip"}}, "right": {"set": ["0.0.0.0", "198.18.1.11"]}}}, {"drop": null}',
        '"protocol": "ip", "field": "saddr"}}, "right": {"set": ["198.18.1.11"]}}}, {"drop": null}',
        '"right": {"set": ["::", "2001:db8:1::b", "fe80::ff:fe00:1"]}}}, {"drop": null}',
        '"field": "sport"}}, "right": {"set": [67, 547]}}}, {"drop": null}',
        '"field": "type"}}, "right": {"set": [134, 137]}}}, {"drop": null}',
    ):
        assert expected in body
    # A DHCP client without an address yet is let through before the source check.
    dhcp = [r for r in out if '"right": "0.0.0.0"' in text(r)]
    assert dhcp
    assert out.index(dhcp[0]) < next(
        i
        for i, r in enumerate(out)
        if '"198.18.1.11"]}}}, {"drop"' in text(r) and '"ip", "field": "saddr"' in text(r)
    )
    assert out[-1] == [{"drop": None}], "VLAN tags and other ethertypes end here"


def test_a_port_without_fixed_ips_is_filtered_on_its_mac_only() -> None:
    plan = small_plan(ports=(make_port(3, ipv4=(), ipv6=()),))
    body = text(rules(build_ruleset(plan), "bridge", "port3_out"))
    assert '"saddr ether"}}, "right": "02:00:00:00:00:03"' in body
    assert '"saddr ip"' not in body
    assert '"protocol": "ip", "field": "saddr"}}, "right": {"set"' not in body
    assert '"protocol": "ip6", "field": "saddr"' not in body


def test_a_port_without_port_security_is_only_marked() -> None:
    plan = small_plan(ports=(make_port(1), make_port(9, port_security=False)))
    document = build_ruleset(plan)
    assert rules(document, "bridge", "port9_out") == [
        [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 9}}]
    ]
    assert "port9_in" not in text(objects(document, "chain"))
    assert "port9_egress" not in text(document)


def test_frames_to_a_port_pass_replies_arp_dhcp_and_nd_then_its_groups_then_drop() -> None:
    document = build_ruleset(small_plan())
    for name in ("ports_in_forward", "ports_in_output"):
        hook = chain(document, "bridge", name)
        assert hook["prio"] == -100
        [[vmap]] = rules(document, "bridge", name)
        assert vmap["vmap"]["key"] == {"meta": {"key": "oifname"}}
    assert {
        chain(document, "bridge", n)["hook"] for n in ("ports_in_forward", "ports_in_output")
    } == {"forward", "output"}
    incoming = rules(document, "bridge", "port2_in")
    assert incoming[0][0]["match"]["left"] == {"&": [{"meta": {"key": "mark"}}, ESTABLISHED_BIT]}
    assert incoming[-3:] == [
        [{"jump": {"target": "sg_web0000001_ingress"}}],
        [{"jump": {"target": "sg_peers00001_ingress"}}],
        [{"drop": None}],
    ]
    assert '"right": "arp"}}, {"accept": null}' in text(incoming)


def test_inet_prerouting_marks_replies_and_sends_new_flows_to_the_ports_egress_chain() -> None:
    document = build_ruleset(small_plan())
    hook = chain(document, "inet", "prerouting")
    assert (hook["hook"], hook["prio"]) == ("prerouting", -150)
    first, *_rest, dispatch = rules(document, "inet", "prerouting")
    assert first[0]["match"]["left"] == {"ct": {"key": "state"}}
    assert first[1]["mangle"]["value"] == {"|": [{"meta": {"key": "mark"}}, ESTABLISHED_BIT]}
    assert dispatch[0]["vmap"]["data"]["set"] == [
        [1, {"jump": {"target": "port1_egress"}}],
        [2, {"jump": {"target": "port2_egress"}}],
    ]
    assert rules(document, "inet", "output")[0] == first
    egress = text(rules(document, "inet", "port1_egress"))
    for always in ('"169.254.169.254"', '"fe80::a9fe:a9fe"', '"right": 67}', '"invalid"', "133"):
        assert always in egress


def test_floating_ips_and_subnets_get_dnat_and_snat_on_the_external_link() -> None:
    document = build_ruleset(small_plan())
    assert chain(document, "inet", "nat_prerouting")["type"] == "nat"
    [dnat] = rules(document, "inet", "nat_prerouting")
    assert dnat[-1] == {"dnat": {"family": "ip", "addr": "198.18.1.11"}}
    assert '"198.19.0.10"' in text(dnat)
    fip, subnet = rules(document, "inet", "nat_postrouting")
    assert fip[-1] == {"snat": {"family": "ip", "addr": "198.19.0.10"}}
    assert subnet[-1] == {"snat": {"family": "ip", "addr": "198.19.0.2"}}
    assert '"right": "ext0"' in text(subnet)
    assert '"len": 24' in text(subnet)

    without = build_ruleset(small_plan(floating_ips=()))
    assert "198.19.0.10" not in text(without)
    assert "nat_prerouting" not in text(build_ruleset(small_plan(external=None, floating_ips=())))


def test_a_port_naming_a_group_the_plan_lacks_is_refused() -> None:
    plan = small_plan(ports=(make_port(1, security_groups=("sg-missing0001",)),))
    with pytest.raises(FirewallError, match="sg-missing0001"):
        build_ruleset(plan)


def test_removing_from_a_namespace_that_is_gone_does_nothing() -> None:
    asyncio.run(remove_ruleset("nubes-no-such-namespace-here"))


# -- security groups ------------------------------------------------------------------------------


def test_every_rule_kind_lands_in_its_set_or_rule() -> None:
    document = build_ruleset(small_plan())
    ported = named_set(document, "bridge", "sg_web0000001_ingress_v4_ports")
    assert ported["type"] == ["ipv4_addr", "inet_proto", "inet_service"]
    assert ported["flags"] == ["interval"]
    assert ported["elem"] == [
        {"concat": [{"prefix": {"addr": "0.0.0.0", "len": 0}}, 6, 80]},
        {"concat": [{"prefix": {"addr": "198.18.0.0", "len": 16}}, 6, {"range": [8000, 8100]}]},
        {"concat": [{"prefix": {"addr": "0.0.0.0", "len": 0}}, 17, 53]},
    ]
    protocols = text(named_set(document, "bridge", "sg_web0000001_ingress_v4_protocols")["elem"])
    assert '{"addr": "0.0.0.0", "len": 0}}, 1]' in protocols  # icmp, every type
    assert '{"addr": "0.0.0.0", "len": 0}}, 6]' in protocols  # tcp, every port
    icmp = named_set(document, "bridge", "sg_web0000001_ingress_v4_icmp")
    assert icmp["type"] == ["ipv4_addr", "icmp_type"]
    icmpv6 = named_set(document, "bridge", "sg_web0000001_ingress_v6_icmp")
    assert icmpv6["elem"] == [{"concat": [{"prefix": {"addr": "::", "len": 0}}, 128]}]
    v6 = named_set(document, "bridge", "sg_web0000001_ingress_v6_ports")
    assert v6["elem"] == [{"concat": [{"prefix": {"addr": "2001:db8::", "len": 32}}, 6, 22]}]
    anything = named_set(document, "bridge", "sg_web0000001_ingress_v4_any")
    assert anything["elem"] == [{"prefix": {"addr": "198.19.0.0", "len": 24}}]
    members = named_set(document, "bridge", "members_sg_peers00001_v4")
    assert members["elem"] == ["198.18.1.50"]
    assert named_set(document, "bridge", "members_sg_peers00001_v6")["elem"] == ["2001:db8:1::50"]

    ingress = text(rules(document, "bridge", "sg_web0000001_ingress"))
    assert '"right": "@members_sg_peers00001_v4"' in ingress
    assert '"right": 5432' in ingress
    assert '"right": "@members_sg_peers00001_v6"' in ingress
    assert '"field": "saddr"' in ingress
    assert '"field": "daddr"' not in ingress
    egress = text(rules(document, "inet", "sg_web0000001_egress"))
    assert '"field": "daddr"' in egress
    assert '"field": "saddr"' not in egress
    assert '{"meta": {"key": "nfproto"}}, "right": "ipv4"}}, {"accept": null}' in egress
    assert named_set(document, "inet", "sg_web0000001_egress_v6_protocols")["elem"] == [
        {"concat": [{"prefix": {"addr": "2001:db8:2::", "len": 48}}, 17]}
    ]


def test_a_thousand_rule_group_compiles_to_a_handful_of_nft_rules() -> None:
    wide = SecurityGroupPlan(
        "sg-wide000001",
        tuple(
            rule(**r)
            for r in wide_group_rules(1000, allow_tcp_port=5201, allow_from="198.18.1.0/24")
        ),
    )
    compiled = compile_group(wide, Direction.INGRESS, "bridge", "nubes")
    assert len(compiled.rules) == 4, "one lookup per set: v4 ports, v4 icmp, v4 any, v6 ports"
    # One element a rule, but neighbouring hosts that allow the same ports share one.
    assert sum(len(s["elem"]) for s in compiled.sets) >= 850


def test_overlapping_cidrs_and_ports_become_disjoint_elements_that_allow_the_same() -> None:
    generator = random.Random(5)
    wanted: dict[Any, list[tuple[int, int]]] = {}
    for _ in range(60):
        base = generator.choice([0xC6120000, 0xC6120100, 0xC6120180]) + generator.randrange(4)
        length = generator.choice([15, 16, 24, 25, 30, 32])
        network = ipaddress.IPv4Network((base, length), strict=False)
        low = generator.randrange(1, 200)
        wanted.setdefault(network, []).append((low, low + generator.randrange(0, 30)))
    boxes = disjoint_boxes(wanted)
    for pair_a in boxes:
        for pair_b in boxes:
            if pair_a is not pair_b and pair_a[0].overlaps(pair_b[0]):
                assert pair_a[1][1] < pair_b[1][0] or pair_b[1][1] < pair_a[1][0]
    for _ in range(3000):
        address = ipaddress.IPv4Address(
            generator.choice([0x0A000000, 0x0A010000, 0x0A010100, 0x0B000000])
            + generator.randrange(8)
        )
        port = generator.randrange(1, 240)
        allowed = any(
            address in n and lo <= port <= hi for n, ranges in wanted.items() for lo, hi in ranges
        )
        found = any(address in n and lo <= port <= hi for n, (lo, hi) in boxes)
        assert allowed == found, (address, port)


def test_rules_a_wider_rule_already_covers_add_no_elements() -> None:
    boxes = disjoint_boxes(
        {
            ipaddress.IPv4Network("0.0.0.0/0"): [(1, 65535)],
            ipaddress.IPv4Network("198.18.1.0/24"): [(22, 22)],
        }
    )
    assert boxes == [(ipaddress.IPv4Network("0.0.0.0/0"), (1, 65535))]
