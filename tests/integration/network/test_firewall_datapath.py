"""The VPC firewall on the real datapath: namespaces as VMs on veths across a bridge in a
VPC namespace, real nft, real br_netfilter and conntrack; traffic decides every test."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from nubes.agent.network.firewall import (
    FirewallError,
    apply_ruleset,
    build_ruleset,
    remove_ruleset,
)
from nubes.agent.network.nsutil import socket_in_netns
from nubes.agent.network.plan import (
    ExternalPlan,
    FloatingIpPlan,
    PortPlan,
    SecurityGroupPlan,
    SubnetPlan,
    VpcPlan,
)
from nubes.model.security_group import SecurityGroupRule
from tests.support.netlab import (
    BROADCAST,
    VPC_SYSCTLS,
    NetLab,
    Vm,
    arp_reply_frame,
    eventually,
    ipv4_udp_frame,
    ipv6_frame,
    mac_bytes,
    wide_group_rules,
)

pytestmark = pytest.mark.integration

SUBNET_1 = "sn-aaaaaaaaa1"
SUBNET_2 = "sn-aaaaaaaaa2"
OPEN = "sg-open000001"  # ICMP, tcp/2222 and every UDP port from anywhere
QUIET = "sg-quiet00001"  # egress only


def allow(
    protocol: str = "any",
    port_number: int | None = None,
    *,
    v6: bool = False,
    direction: str = "ingress",
    **remote: str,
) -> dict[str, Any]:
    """A security group rule as keyword arguments; `port_number` is the ICMP type for icmp."""
    fields: dict[str, Any] = {"direction": direction, "protocol": protocol, **remote}
    fields["ethertype"] = "ipv6" if v6 else "ipv4"
    if port_number is not None:
        fields["port_min"] = port_number
        if protocol in ("tcp", "udp"):
            fields["port_max"] = port_number
    return fields


EGRESS_ALL = [allow(direction="egress"), allow(direction="egress", v6=True)]
OPEN_RULES = [
    *EGRESS_ALL,
    allow("icmp"),
    allow("icmpv6", v6=True),
    allow("tcp", 2222),
    allow("tcp", 2222, v6=True),
    allow("udp"),
    allow("udp", v6=True),
]


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture
def lab() -> Iterator[NetLab]:
    if os.geteuid() != 0:
        pytest.fail("the firewall datapath tests need root (namespaces, nft)")
    with NetLab() as made:
        yield made


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def group(
    sg_id: str, rules: Sequence[dict[str, Any]], members: Sequence[Vm] = ()
) -> SecurityGroupPlan:
    return SecurityGroupPlan(
        sg_id,
        tuple(SecurityGroupRule(**rule) for rule in rules),
        frozenset(vm.ipv4.ip for vm in members if vm.ipv4 is not None),
        frozenset(vm.ipv6.ip for vm in members if vm.ipv6 is not None),
    )


def port(
    vm: Vm, index: int, groups: Sequence[str], *, subnet: str = SUBNET_1, secured: bool = True
) -> PortPlan:
    return PortPlan(
        port_id=f"pt-{index:010d}",
        index=index,
        tap=vm.tap,
        mac=vm.mac,
        subnet_id=subnet,
        ipv4=() if vm.ipv4 is None else (vm.ipv4.ip,),
        ipv6=() if vm.ipv6 is None else (vm.ipv6.ip,),
        ipv6_link_local=vm.link_local,
        security_groups=tuple(groups),
        port_security=secured,
        vm_id=None,
        hostname=None,
    )


def subnet(subnet_id: str, bridge: str, number: int) -> SubnetPlan:
    return SubnetPlan(
        subnet_id=subnet_id,
        bridge=bridge,
        vxlan=f"vx-{number}",
        vni=number,
        cidr=ipaddress.IPv4Network(f"198.18.{number}.0/24"),
        gateway=ipaddress.IPv4Address(f"198.18.{number}.1"),
        ipv6_cidr=ipaddress.IPv6Network(f"2001:db8:{number}::/64"),
        ipv6_gateway=ipaddress.IPv6Address(f"2001:db8:{number}::1"),
        dhcp=False,
        mtu=1500,
    )


def vpc_plan(
    netns: str,
    ports: Sequence[PortPlan],
    groups: Sequence[SecurityGroupPlan],
    **extra: Any,
) -> VpcPlan:
    return VpcPlan(
        vpc_id="nt-aaaaaaaaaa",
        netns=netns,
        ports=tuple(ports),
        security_groups={g.sg_id: g for g in groups},
        **extra,
    )


def apply(plan: VpcPlan) -> float:
    """Builds and loads `plan`'s ruleset; the seconds the load took."""
    start = time.monotonic()
    asyncio.run(apply_ruleset(plan.netns, build_ruleset(plan)))
    return time.monotonic() - start


def one_subnet(lab: NetLab, count: int) -> tuple[str, list[Vm]]:
    vpc = lab.namespace("vpc", VPC_SYSCTLS)
    lab.bridge(vpc, "br1", ["198.18.1.1/24", "2001:db8:1::1/64"])
    vms = [
        lab.vm(
            f"v{number}",
            vpc=vpc,
            bridge="br1",
            mac=f"02:00:00:00:01:{number:02x}",
            ipv4=f"198.18.1.{10 + number}/24",
            ipv6=f"2001:db8:1::{10 + number:x}/64",
            gateway4="198.18.1.1",
            gateway6="2001:db8:1::1",
        )
        for number in range(count)
    ]
    return vpc, vms


def listen(sockets: list[socket.socket], vm: Vm, port_number: int) -> None:
    """A TCP listener in `vm` on `port_number`, IPv4 and IPv6."""
    server = socket_in_netns(vm.netns, socket.AF_INET6)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    server.bind(("::", port_number))
    server.listen(8)
    sockets.append(server)


def connects(vm: Vm, address: str, port_number: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connection from `vm` to `address`:`port_number` is set up."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    client = socket_in_netns(vm.netns, family)
    client.settimeout(timeout)
    try:
        client.connect((address, port_number))
    except (TimeoutError, ConnectionRefusedError):
        return False
    finally:
        client.close()
    return True


def ip4(vm: Vm) -> str:
    assert vm.ipv4 is not None
    return str(vm.ipv4.ip)


def ip6(vm: Vm) -> str:
    assert vm.ipv6 is not None
    return str(vm.ipv6.ip)


# -- 1. one subnet ---------------------------------------------------------------------------


def test_group_allows_ping_and_its_tcp_port_and_replies_flow_back(
    lab: NetLab, sockets: list[socket.socket]
) -> None:
    vpc, (server, quiet) = one_subnet(lab, 2)
    assert lab.ping(quiet.netns, ip4(server)), "the topology itself does not carry traffic"
    assert lab.ping(server.netns, ip4(quiet)), "the topology itself does not carry traffic"
    for number in (2222, 2223):
        listen(sockets, server, number)
    plan = vpc_plan(
        vpc,
        [port(server, 1, [OPEN]), port(quiet, 2, [QUIET])],
        [group(OPEN, OPEN_RULES), group(QUIET, EGRESS_ALL)],
    )
    apply(plan)

    assert lab.ping(quiet.netns, ip4(server)), "ICMP is allowed in, and its reply comes back"
    assert lab.ping(quiet.netns, ip6(server)), "ICMPv6 is allowed in, and its reply comes back"
    assert connects(quiet, ip4(server), 2222)
    assert connects(quiet, ip6(server), 2222)
    assert not connects(quiet, ip4(server), 2223), "no rule allows tcp/2223"
    assert not connects(quiet, ip6(server), 2223), "no rule allows tcp/2223 over IPv6"
    assert not lab.ping(server.netns, ip4(quiet)), "the quiet port has no ingress rule"
    assert not lab.ping(server.netns, ip6(quiet)), "the quiet port has no ingress rule"

    # An established connection carries data both ways.
    client = socket_in_netns(quiet.netns, socket.AF_INET)
    sockets.append(client)
    client.settimeout(2)
    client.connect((ip4(server), 2222))
    sockets[0].settimeout(2)
    while True:  # the earlier probes' connections wait in the backlog too
        accepted, peer = sockets[0].accept()
        sockets.append(accepted)
        if peer[1] == client.getsockname()[1]:
            break
    accepted.settimeout(2)
    client.sendall(b"ping")
    assert accepted.recv(4) == b"ping"
    accepted.sendall(b"pong" * 1000)
    received = b""
    while len(received) < 4000:
        received += client.recv(4000)
    assert received == b"pong" * 1000


def test_a_port_without_security_groups_is_reachable_by_nothing(lab: NetLab) -> None:
    vpc, (bare, other) = one_subnet(lab, 2)
    apply(vpc_plan(vpc, [port(bare, 1, []), port(other, 2, [OPEN])], [group(OPEN, OPEN_RULES)]))
    assert not lab.ping(other.netns, ip4(bare))
    assert not lab.ping(bare.netns, ip4(other)), "no group: no egress either"


# -- 2. remote groups and CIDRs -------------------------------------------------------------


def test_remote_group_and_remote_cidr_rules_allow_exactly_their_peers(
    lab: NetLab, sockets: list[socket.socket]
) -> None:
    vpc, (target, member, stranger) = one_subnet(lab, 3)
    members = "sg-members001"
    rules = [
        allow("tcp", 2222, remote_group=members),
        allow("tcp", 2222, v6=True, remote_group=members),
        allow("tcp", 3333, remote_cidr=f"{ip4(stranger)}/32"),
        allow("tcp", 4444, v6=True, remote_cidr=f"{ip6(stranger)}/128"),
        allow("icmp", 8, remote_cidr=f"{ip4(stranger)}/32"),
        allow("icmpv6", 128, v6=True, remote_group=members),
    ]
    for number in (2222, 3333, 4444):
        listen(sockets, target, number)
    groups = [
        group("sg-target0001", rules),
        group(members, EGRESS_ALL, members=[member]),
        group(QUIET, EGRESS_ALL),
    ]
    ports = [
        port(target, 1, ["sg-target0001"]),
        port(member, 2, [members]),
        port(stranger, 3, [QUIET]),
    ]
    apply(vpc_plan(vpc, ports, groups))

    assert connects(member, ip4(target), 2222)
    assert connects(member, ip6(target), 2222)
    assert not connects(stranger, ip4(target), 2222), "not a member of the remote group"
    assert not connects(stranger, ip6(target), 2222), "not a member of the remote group"
    assert connects(stranger, ip4(target), 3333)
    assert not connects(member, ip4(target), 3333), "outside the remote CIDR"
    assert connects(stranger, ip6(target), 4444)
    assert not connects(member, ip6(target), 4444), "outside the remote IPv6 CIDR"
    assert not connects(stranger, ip4(target), 4444), "the 4444 rule is IPv6 only"
    assert lab.ping(stranger.netns, ip4(target)), "echo requests from the CIDR"
    assert not lab.ping(member.netns, ip4(target)), "echo requests from the CIDR only"
    assert lab.ping(member.netns, ip6(target)), "ICMPv6 echo requests from the members"
    assert not lab.ping(stranger.netns, ip6(target)), "ICMPv6 echo requests from members only"


# -- 3. live changes -----------------------------------------------------------------------


def test_a_new_ruleset_allows_within_a_second_and_revoking_works(lab: NetLab) -> None:
    vpc, (target, client) = one_subnet(lab, 2)
    closed = vpc_plan(
        vpc,
        [port(target, 1, [QUIET]), port(client, 2, [QUIET])],
        [group(QUIET, EGRESS_ALL)],
    )
    opened = vpc_plan(
        vpc,
        [port(target, 1, [OPEN]), port(client, 2, [QUIET])],
        [group(OPEN, OPEN_RULES), group(QUIET, EGRESS_ALL)],
    )
    apply(closed)
    assert not lab.ping(client.netns, ip4(target))

    apply(opened)
    took = eventually(lambda: lab.ping(client.netns, ip4(target), wait=0.2), timeout=1.0)
    print(f"reachable {took:.3f} s after the new ruleset was loaded")

    apply(closed)
    assert not lab.ping(client.netns, ip4(target)), "revoked: a new ping is dropped again"


def test_a_refused_document_leaves_the_loaded_ruleset_in_place(lab: NetLab) -> None:
    vpc, (target, client) = one_subnet(lab, 2)
    plan = vpc_plan(
        vpc,
        [port(target, 1, [QUIET]), port(client, 2, [QUIET])],
        [group(QUIET, EGRESS_ALL)],
    )
    apply(plan)
    document = build_ruleset(plan)
    broken = {"add": {"rule": {"family": "inet", "table": "nubes", "chain": "nowhere", "expr": []}}}
    document["nftables"].append(broken)
    with pytest.raises(FirewallError, match=r"nowhere|No such file"):
        asyncio.run(apply_ruleset(vpc, document))
    assert not lab.ping(client.netns, ip4(target)), "the old ruleset still drops"

    asyncio.run(remove_ruleset(vpc))
    asyncio.run(remove_ruleset(vpc))  # nothing left to remove is fine
    assert lab.run(vpc, "nft", "list", "ruleset").stdout.strip() == ""
    assert lab.ping(client.netns, ip4(target)), "no firewall, no drop"


# -- 4. anti-spoofing -----------------------------------------------------------------------


def test_spoofed_frames_are_dropped_and_the_ports_own_traffic_flows(lab: NetLab) -> None:
    vpc, (sender, receiver) = one_subnet(lab, 2)
    apply(
        vpc_plan(
            vpc,
            # The receiver filters nothing: whatever is dropped, the sender's port dropped.
            [port(sender, 1, [OPEN]), port(receiver, 2, [], secured=False)],
            [group(OPEN, OPEN_RULES)],
        )
    )
    own_ip, own_mac, ll = ip4(sender), sender.mac, str(sender.link_local)
    udp6 = struct.pack("!HHHH", 5000, 5001, 8 + 8, 0) + b"own-ip6x"
    router_advert = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0) + b"spoof-ra"
    dhcp6_reply = struct.pack("!HHHH", 547, 546, 8 + 8, 0) + b"spoof-d6"
    frames = {
        b"own-ip4x": ipv4_udp_frame(own_mac, own_ip, 5000, 5001, b"own-ip4x"),
        b"own-ip6x": ipv6_frame(own_mac, ll, 17, udp6),
        b"own-arpx": arp_reply_frame(own_mac, own_ip, b"own-arpx"),
        b"spoof-ip": ipv4_udp_frame(own_mac, "198.18.1.99", 5000, 5001, b"spoof-ip"),
        b"spoof-mc": ipv4_udp_frame("02:00:00:00:01:99", own_ip, 5000, 5001, b"spoof-mc"),
        b"spoof-dh": ipv4_udp_frame(own_mac, own_ip, 67, 68, b"spoof-dh"),
        b"spoof-ra": ipv6_frame(own_mac, ll, 58, router_advert),
        b"spoof-d6": ipv6_frame(own_mac, ll, 17, dhcp6_reply),
        b"spoof-v6": ipv6_frame(own_mac, "2001:db8:1::99", 17, udp6[:8] + b"spoof-v6"),
        b"spoof-ar": arp_reply_frame(own_mac, ip4(receiver), b"spoof-ar"),
        b"spoof-vl": BROADCAST + mac_bytes(own_mac) + b"\x81\x00\x00\x05\x08\x00" + b"spoof-vl" * 8,
    }
    capture = socket_in_netns(receiver.netns, socket.AF_PACKET, socket.SOCK_RAW)
    send = socket_in_netns(sender.netns, socket.AF_PACKET, socket.SOCK_RAW)
    with contextlib.closing(capture), contextlib.closing(send):
        capture.bind(("eth0", 0x0003))  # ETH_P_ALL
        capture.settimeout(0.2)
        send.bind(("eth0", 0))
        for frame in frames.values():
            send.send(frame)
        seen: set[bytes] = set()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                data = capture.recv(2048)
                seen |= {marker for marker in frames if marker in data}
    assert {b"own-ip4x", b"own-ip6x", b"own-arpx"} <= seen, "the port's own frames must flow"
    assert sorted(marker for marker in seen if marker.startswith(b"spoof")) == []


def test_a_port_whose_group_allows_nothing_still_gets_dhcp_and_metadata(
    lab: NetLab, sockets: list[socket.socket]
) -> None:
    vpc, (vm, _other) = one_subnet(lab, 2)
    nothing = "sg-nothing001"
    apply(vpc_plan(vpc, [port(vm, 1, [nothing])], [group(nothing, [])]))
    lab.ip("-n", vpc, "address", "add", "169.254.169.254/32", "dev", "lo")
    namespace_side = Vm(vpc, "", "", None, None)
    listen(sockets, namespace_side, 80)
    listen(sockets, namespace_side, 2222)
    assert connects(vm, "169.254.169.254", 80), "metadata is always reachable"
    assert not connects(vm, "198.18.1.1", 2222), "nothing else is"

    server = socket_in_netns(vpc, socket.AF_INET, socket.SOCK_DGRAM)
    client = socket_in_netns(vm.netns, socket.AF_INET, socket.SOCK_DGRAM)
    send = socket_in_netns(vm.netns, socket.AF_PACKET, socket.SOCK_RAW)
    for made in (server, client, send):
        sockets.append(made)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"br1")
    server.bind(("0.0.0.0", 67))
    server.settimeout(2)
    client.bind(("0.0.0.0", 68))
    client.settimeout(2)
    send.bind(("eth0", 0))
    # A client without an address asks from 0.0.0.0; the server answers by broadcast.
    send.send(ipv4_udp_frame(vm.mac, "0.0.0.0", 68, 67, b"discover"))
    assert server.recv(100) == b"discover"
    server.sendto(b"offer", ("255.255.255.255", 68))
    assert client.recv(100) == b"offer"


# -- 5. routed between subnets ---------------------------------------------------------------


def test_routed_traffic_obeys_the_destination_ports_ingress_rules(
    lab: NetLab, sockets: list[socket.socket]
) -> None:
    vpc = lab.namespace("vpc", VPC_SYSCTLS)
    lab.bridge(vpc, "br1", ["198.18.1.1/24", "2001:db8:1::1/64"])
    lab.bridge(vpc, "br2", ["198.18.2.1/24", "2001:db8:2::1/64"])
    client = lab.vm(
        "c", vpc=vpc, bridge="br1", mac="02:00:00:00:01:0a", ipv4="198.18.1.10/24",
        ipv6="2001:db8:1::a/64", gateway4="198.18.1.1", gateway6="2001:db8:1::1",
    )  # fmt: skip
    server = lab.vm(
        "s", vpc=vpc, bridge="br2", mac="02:00:00:00:02:0a", ipv4="198.18.2.10/24",
        ipv6="2001:db8:2::a/64", gateway4="198.18.2.1", gateway6="2001:db8:2::1",
    )  # fmt: skip
    for number in (2222, 2223):
        listen(sockets, server, number)
    from_subnet_1 = [
        *EGRESS_ALL,
        allow("icmp", remote_cidr="198.18.1.0/24"),
        allow("icmpv6", v6=True, remote_cidr="2001:db8:1::/64"),
        allow("tcp", 2222, remote_cidr="198.18.1.0/24"),
    ]
    ports = [port(client, 1, [QUIET]), port(server, 2, ["sg-server0001"], subnet=SUBNET_2)]
    apply(vpc_plan(vpc, ports, [group(QUIET, EGRESS_ALL), group("sg-server0001", from_subnet_1)]))

    assert lab.ping(client.netns, ip4(server))
    assert lab.ping(client.netns, ip6(server))
    assert connects(client, ip4(server), 2222)
    assert not connects(client, ip4(server), 2223)
    assert not lab.ping(server.netns, ip4(client)), "the client has no ingress rule"
    assert lab.ping(server.netns, "198.18.2.1"), "its gateway answers (egress is allowed)"

    apply(vpc_plan(vpc, ports, [group(QUIET, EGRESS_ALL), group("sg-server0001", EGRESS_ALL)]))
    assert not lab.ping(client.netns, ip4(server))
    assert not lab.ping(client.netns, ip6(server))


# -- 6. NAT ---------------------------------------------------------------------------------


def _peer_address(sockets: list[socket.socket], timeout: float = 2.0) -> str:
    """The source address of the next connection the last listener accepts."""
    server = sockets[-1]
    server.settimeout(timeout)
    accepted, (address, *_rest) = server.accept()
    accepted.close()
    return str(address).removeprefix("::ffff:")


def test_floating_ips_dnat_in_and_snat_out_and_other_ports_snat_to_the_external_address(
    lab: NetLab, sockets: list[socket.socket]
) -> None:
    vpc, (floating, plain) = one_subnet(lab, 2)
    outside = lab.namespace("out")
    lab.veth(vpc, "ext0", outside, "eth0")
    lab.ip("-n", vpc, "address", "add", "198.19.0.2/24", "dev", "ext0")
    lab.ip("-n", outside, "address", "add", "198.19.0.1/24", "dev", "eth0")
    lab.ip("-n", outside, "link", "set", "eth0", "up")
    fip = "198.19.0.10"
    # What the links module does for a floating IP: answer ARP for it, route it to the port.
    lab.ip("-n", vpc, "neigh", "add", "proxy", fip, "dev", "ext0")
    lab.ip("-n", vpc, "route", "add", f"{fip}/32", "via", ip4(floating))
    external = ExternalPlan(
        network_id="nt-external01",
        link="ext0",
        host_link="unused",
        host_bridge="unused",
        address=ipaddress.IPv4Interface("198.19.0.2/24"),
        gateway=None,
    )
    fixed = ipaddress.IPv4Address(ip4(floating))
    floating_ip = FloatingIpPlan("fi-aaaaaaaaaa", ipaddress.IPv4Address(fip), fixed, "pt-1")
    ports = [port(floating, 1, [OPEN]), port(plain, 2, [OPEN])]
    groups = [group(OPEN, OPEN_RULES)]
    common = {"subnets": (subnet(SUBNET_1, "br1", 1),), "external": external}
    with_fip = vpc_plan(vpc, ports, groups, floating_ips=(floating_ip,), **common)
    apply(with_fip)

    assert lab.ping(outside, fip), "DNAT to the floating IP reaches the port"
    listen(sockets, floating, 2222)
    outsider = Vm(outside, "", "", ipaddress.IPv4Interface("198.19.0.1/24"), None)
    assert connects(outsider, fip, 2222)
    assert _peer_address(sockets) == "198.19.0.1", "DNAT keeps the outside source"

    listen(sockets, outsider, 8080)
    assert connects(floating, "198.19.0.1", 8080)
    assert _peer_address(sockets) == fip, "the port goes out as its floating IP"
    assert connects(plain, "198.19.0.1", 8080)
    assert _peer_address(sockets) == "198.19.0.2", "others go out as the external address"

    without_fip = vpc_plan(vpc, ports, groups, **common)
    document = build_ruleset(without_fip)
    assert fip not in str(document)
    apply(without_fip)
    assert fip not in lab.run(vpc, "nft", "list", "ruleset").stdout
    assert not lab.ping(outside, fip), "no DNAT any more"
    assert connects(floating, "198.19.0.1", 8080)
    assert _peer_address(sockets) == "198.19.0.2"


# -- 7. a wide group --------------------------------------------------------------------------


def test_a_thousand_rule_group_loads_in_one_apply_and_filters(
    lab: NetLab, sockets: list[socket.socket]
) -> None:
    vpc, (server, client) = one_subnet(lab, 2)
    for number in (5201, 10003):
        listen(sockets, server, number)
    wide = [*EGRESS_ALL, *wide_group_rules(1000, allow_tcp_port=5201, allow_from="198.18.1.0/24")]
    plan = vpc_plan(
        vpc,
        [port(server, 1, ["sg-wide000001"]), port(client, 2, ["sg-wide000001"])],
        [group("sg-wide000001", wide)],
    )
    start = time.monotonic()
    document = build_ruleset(plan)
    built = time.monotonic() - start
    start = time.monotonic()
    asyncio.run(apply_ruleset(vpc, document))
    loaded = time.monotonic() - start
    rules = sum(1 for command in document["nftables"] if "rule" in command.get("add", {}))
    print(
        f"1,002 group rules -> {rules} nft rules: built in {built:.3f} s, loaded in {loaded:.3f} s"
    )
    assert loaded < 5
    assert connects(client, ip4(server), 5201), "the last rule allows it"
    assert not connects(client, ip4(server), 10003), "allowed only from 198.19.100.1"
