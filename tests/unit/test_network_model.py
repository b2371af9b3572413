"""Network records, IPAM and the per-host plan: pure, no root."""

from __future__ import annotations

import ipaddress

import pytest

from nubes.agent.network import names
from nubes.agent.network.planner import NetworkRecords, build_vpc_plan, hostname_of
from nubes.errors import Conflict, InvalidInput
from nubes.ipam import allocate_ipv4, allocate_vni, link_local_address, random_mac, slaac_address
from nubes.model.common import now
from nubes.model.network import (
    ExternalGateway,
    ExternalSpec,
    FloatingIpRecord,
    FloatingIpSpec,
    IpamMode,
    KeypairRecord,
    NetworkRecord,
    NetworkSpec,
    PortRecord,
    PortSpec,
    SubnetRecord,
    SubnetSpec,
)
from nubes.model.security_group import (
    Direction,
    SecurityGroupRecord,
    SecurityGroupRule,
    SecurityGroupSpec,
)
from nubes.model.vm import Flavor, VmRecord, VmSpec

VPC = "vpc-aaaaaaaaaa"
EXT = "vpc-eeeeeeeeee"
SUBNET = "subnet-aaaaaaaaaa"
MAC = "02:6e:75:00:00:0a"


def subnet_spec(**changes: object) -> SubnetSpec:
    fields: dict[str, object] = {"name": "s", "network": VPC, "cidr": "198.18.10.0/24", "vni": 1001}
    fields.update(changes)
    return SubnetSpec.model_validate(fields)


def test_a_subnet_gateway_defaults_to_the_first_address() -> None:
    spec = subnet_spec()
    assert spec.gateway_v4 == ipaddress.IPv4Address("198.18.10.1")
    assert spec.serves_dhcp


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"cidr": "198.18.10.0/30"}, "/16 to /29"),
        ({"cidr": "not-a-net"}, "not an IPv4 network"),
        ({"gateway": "198.18.11.1"}, "not a host address"),
        ({"ipv6_cidr": "2001:db8::/56"}, "SLAAC needs a /64"),
        ({"vni": 0}, "greater than or equal"),
    ],
)
def test_a_bad_subnet_is_refused_with_the_reason(changes: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        SubnetRecord.from_json(
            {
                "id": SUBNET,
                "spec": {**subnet_spec().to_json(), **changes},
                "created_at": now().isoformat(),
            }  # type: ignore[dict-item]
        )


def test_a_multicast_mac_and_a_bad_key_are_refused() -> None:
    with pytest.raises(ValueError, match="multicast"):
        PortSpec(network=VPC, subnet=SUBNET, mac="01:00:5e:00:00:01")
    with pytest.raises(ValueError, match="OpenSSH public key"):
        KeypairRecord(name="k", public_key="ssh-ed25519 AAAA\nssh-rsa BBBB", created_at=now())


@pytest.mark.parametrize(
    ("rule", "words"),
    [
        ({"protocol": "icmp", "ethertype": "ipv6"}, "icmpv6"),
        ({"protocol": "any", "port_min": 22, "port_max": 22}, "ports need protocol"),
        ({"protocol": "tcp", "port_min": 30, "port_max": 20}, "port_min 30 > port_max 20"),
        ({"protocol": "tcp", "port_min": 22}, "both port_min and port_max"),
        ({"remote_cidr": "2001:db8::/64"}, "is not ipv4"),
        ({"remote_cidr": "198.18.0.0/16", "remote_group": "sg-aaaaaaaaaa"}, "not both"),
    ],
)
def test_a_contradictory_rule_is_refused(rule: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        SecurityGroupRule(direction=Direction.INGRESS, **rule)  # type: ignore[arg-type]


def test_a_new_group_allows_all_egress_and_nothing_in() -> None:
    rules = SecurityGroupSpec(name="g").rules
    assert {r.direction for r in rules} == {Direction.EGRESS}
    assert {r.ethertype for r in rules} == {"ipv4", "ipv6"}


def test_ipam_takes_the_lowest_free_address_after_the_gateway() -> None:
    spec = subnet_spec(cidr="198.18.10.0/29")
    used = [ipaddress.IPv4Address("198.18.10.2")]
    assert allocate_ipv4(spec, used) == ipaddress.IPv4Address("198.18.10.3")
    full = [ipaddress.IPv4Address(f"198.18.10.{n}") for n in range(2, 7)]
    with pytest.raises(Conflict, match="no free address"):
        allocate_ipv4(spec, full)


def test_slaac_and_link_local_follow_modified_eui64() -> None:
    prefix = ipaddress.IPv6Network("2001:db8:1::/64")
    assert slaac_address(prefix, "52:54:00:12:34:56") == ipaddress.IPv6Address(
        "2001:db8:1::5054:ff:fe12:3456"
    )
    assert link_local_address("52:54:00:12:34:56") == ipaddress.IPv6Address(
        "fe80::5054:ff:fe12:3456"
    )


def test_random_macs_are_local_unicast_and_vnis_come_from_the_pool() -> None:
    mac = random_mac()
    assert int(mac[:2], 16) & 0b11 == 0b10
    assert allocate_vni([1000, 1001]) == 1002


def test_names_fit_linux_limits_and_map_back() -> None:
    assert len(names.tap_name("port-abcdefghij")) <= names.MAX_LINK_NAME
    assert len(names.external_host_link("abcdef", VPC)) <= names.MAX_LINK_NAME
    assert len(names.vxlan_staging_name("abcdef", (1 << 24) - 1)) <= names.MAX_LINK_NAME
    assert names.vpc_of_netns("nb", names.netns_name("nb", VPC)) == VPC
    assert names.vpc_of_netns("nb", "other-vpc-aaaaaaaaaa") is None
    assert hostname_of("Web_1.example") == "web-1-example"


def records() -> NetworkRecords:
    made = now()
    found = NetworkRecords()
    found.networks[EXT] = NetworkRecord(
        id=EXT,
        spec=NetworkSpec(name="ext", external=ExternalSpec(cidr="198.19.0.0/24")),
        created_at=made,
    )
    found.networks[VPC] = NetworkRecord(
        id=VPC,
        spec=NetworkSpec(name="v", gateway=ExternalGateway(network=EXT, address="198.19.0.5")),
        created_at=made,
    )
    found.subnets[SUBNET] = SubnetRecord(
        id=SUBNET, spec=subnet_spec(ipv6_cidr="2001:db8:1::/64"), created_at=made
    )
    group = SecurityGroupRecord(
        id="sg-aaaaaaaaaa",
        spec=SecurityGroupSpec(
            name="g",
            rules=[SecurityGroupRule(direction=Direction.INGRESS, remote_group="sg-bbbbbbbbbb")],
        ),
        created_at=made,
    )
    found.security_groups[group.id] = group
    for index, port_id in enumerate(("port-aaaaaaaaaa", "port-bbbbbbbbbb", "port-cccccccccc")):
        found.ports[port_id] = PortRecord(
            id=port_id,
            spec=PortSpec(
                network=VPC,
                subnet=SUBNET,
                mac=f"02:6e:75:00:00:0{index}",
                fixed_ips=[f"198.18.10.{10 + index}"],
                security_groups=["sg-aaaaaaaaaa"] if index == 0 else ["sg-bbbbbbbbbb"],
            ),
            created_at=made,
        )
    found.floating_ips["fip-aaaaaaaaaa"] = FloatingIpRecord(
        id="fip-aaaaaaaaaa",
        spec=FloatingIpSpec(network=EXT, address="198.19.0.50", port="port-aaaaaaaaaa"),
        created_at=made,
    )
    return found


def vm(vm_id: str) -> VmRecord:
    spec = VmSpec(name="Web", flavor=Flavor(name="f", vcpus=1, memory_mb=96, disk_gb=0))
    return VmRecord(id=vm_id, spec=spec, created_at=now())


def test_the_plan_holds_only_what_the_claimed_ports_need() -> None:
    plan, problems = build_vpc_plan(
        prefix="nb",
        vpc_id=VPC,
        records=records(),
        claimed={"port-aaaaaaaaaa": "i-aaaaaaaaaa"},
        vms={"i-aaaaaaaaaa": vm("i-aaaaaaaaaa")},
        external_bridges={"external": "brext"},
    )
    assert problems == []
    assert plan.netns == "nb-vpc-aaaaaaaaaa"
    [port] = plan.ports
    assert (port.index, port.hostname, port.tap) == (1, "web", "tp-aaaaaaaaaa")
    assert port.ipv6 == (slaac_address(ipaddress.IPv6Network("2001:db8:1::/64"), port.mac),)
    # The remote group's members are every port in it, claimed here or not.
    remote = plan.security_groups["sg-bbbbbbbbbb"]
    assert remote.members_v4 == {ipaddress.IPv4Address(a) for a in ("198.18.10.11", "198.18.10.12")}
    assert remote.rules == ()
    assert plan.external is not None
    assert plan.external.host_bridge == "brext"
    assert str(plan.external.address) == "198.19.0.5/24"
    [fip] = plan.floating_ips
    assert (str(fip.address), str(fip.fixed_ip)) == ("198.19.0.50", "198.18.10.10")


def test_without_a_bridge_for_the_external_network_the_plan_says_what_to_set() -> None:
    plan, problems = build_vpc_plan(
        prefix="nb",
        vpc_id=VPC,
        records=records(),
        claimed={"port-aaaaaaaaaa": "i-aaaaaaaaaa"},
        vms={},
        external_bridges={},
    )
    assert plan.external is None
    assert plan.floating_ips == ()
    assert [p.subject for p in problems] == [VPC]
    assert "external_bridges" in problems[0].message


def test_with_no_claimed_port_the_plan_is_empty() -> None:
    plan, _ = build_vpc_plan(
        prefix="nb", vpc_id=VPC, records=records(), claimed={}, vms={}, external_bridges={}
    )
    assert (plan.ports, plan.subnets, plan.external) == ((), (), None)


def test_an_l2_only_subnet_has_no_gateway_and_no_dhcp() -> None:
    found = records()
    found.subnets[SUBNET] = SubnetRecord(
        id=SUBNET, spec=subnet_spec(ipam=IpamMode.NONE), created_at=now()
    )
    plan, _ = build_vpc_plan(
        prefix="nb",
        vpc_id=VPC,
        records=found,
        claimed={"port-bbbbbbbbbb": "i-aaaaaaaaaa"},
        vms={},
        external_bridges={},
    )
    [subnet] = plan.subnets
    assert (subnet.gateway, subnet.dhcp, subnet.ipv6_cidr) == (None, False, None)
