"""The overlay plan: which flood, FDB and neighbour entries a subnet's VXLAN carries on a
host, from port records, port statuses and host underlay addresses (l2pop)."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime

from nubes.agent.network.links import METADATA_LINK_LOCAL, bridge_mac
from nubes.agent.network.overlay import (
    OverlayPlan,
    build_overlay_plan,
    parse_underlay,
    remote_host_of,
)
from nubes.agent.network.planner import NetworkRecords, _subnet_plan
from nubes.ipam import link_local_address, slaac_address
from nubes.model.network import (
    IpamMode,
    LinkState,
    PortRecord,
    PortSpec,
    PortStatus,
    SubnetRecord,
    SubnetSpec,
)

WHEN = datetime(2025, 1, 1, tzinfo=UTC)
NET = "vpc-aaaaaaaaaa"
SUB = "subnet-aaaaaaaaaa"
OTHER_SUB = "subnet-bbbbbbbbbb"
H1, H2, H3 = (ipaddress.IPv4Address(f"198.18.64.{i}") for i in (1, 2, 3))
UNDERLAYS = {"h1": H1, "h2": H2, "h3": H3}


def subnet(subnet_id: str = SUB, **spec: object) -> SubnetRecord:
    fields: dict[str, object] = {
        "name": "s",
        "network": NET,
        "cidr": "198.18.20.0/24",
        "vni": 4242,
    }
    fields.update(spec)
    return SubnetRecord(id=subnet_id, spec=SubnetSpec(**fields), created_at=WHEN)  # type: ignore[arg-type]


def port(number: int, subnet_id: str = SUB, *extra_ips: str) -> PortRecord:
    return PortRecord(
        id=f"port-{number:010d}",
        spec=PortSpec(
            network=NET,
            subnet=subnet_id,
            mac=f"02:00:00:00:00:{number:02x}",
            fixed_ips=[f"198.18.20.{10 + number}", *extra_ips],
        ),
        created_at=WHEN,
    )


def status(host: str, state: LinkState = LinkState.ACTIVE) -> PortStatus:
    return PortStatus(state=state, host=host, updated_at=WHEN)


def records(*ports: PortRecord, subnets: tuple[SubnetRecord, ...] = ()) -> NetworkRecords:
    found = NetworkRecords()
    for record in subnets or (subnet(),):
        found.subnets[record.id] = record
    for record in ports:
        found.ports[record.id] = record
    return found


def plan_on(
    host: str,
    known: NetworkRecords,
    where: dict[str, PortStatus],
    underlays: dict[str, ipaddress.IPv4Address] | None = None,
    subnet_id: str = SUB,
) -> OverlayPlan:
    return build_overlay_plan(
        host=host,
        subnet=_subnet_plan(known.subnets[subnet_id], 1450),
        records=known,
        port_statuses=where,
        underlays=UNDERLAYS if underlays is None else underlays,
    )


def gateway_neighbours(subnet_id: str = SUB) -> dict[object, str]:
    mac = bridge_mac(f"br-{subnet_id.split('-')[1]}")
    return {
        ipaddress.IPv4Address("198.18.20.1"): mac,
        link_local_address(mac): mac,
        METADATA_LINK_LOCAL.ip: mac,
    }


def test_each_other_host_with_a_port_of_the_subnet_gets_one_flood_entry() -> None:
    a, b, c, d = port(1), port(2), port(3), port(4)
    where = {a.id: status("h1"), b.id: status("h2"), c.id: status("h3"), d.id: status("h3")}
    plan = plan_on("h1", records(a, b, c, d), where)
    assert plan.flood == {H2, H3}
    assert plan.fdb == {b.spec.mac: H2, c.spec.mac: H3, d.spec.mac: H3}


def test_a_port_active_on_this_host_is_local_and_programs_nothing() -> None:
    a = port(1)
    plan = plan_on("h1", records(a), {a.id: status("h1")})
    assert plan.flood == frozenset()
    assert plan.fdb == {}
    assert plan.neighbours == gateway_neighbours()


def test_remote_ports_are_answered_for_their_addresses_and_the_gateway_locally() -> None:
    sub = subnet(ipv6_cidr="2001:db8:20::/64")
    b = port(2)
    plan = plan_on("h1", records(b, subnets=(sub,)), {b.id: status("h2")})
    mac = b.spec.mac
    expected = {
        ipaddress.IPv4Address("198.18.20.12"): mac,
        link_local_address(mac): mac,
        slaac_address(ipaddress.IPv6Network("2001:db8:20::/64"), mac): mac,
        **gateway_neighbours(),
        ipaddress.IPv6Address("2001:db8:20::1"): bridge_mac(f"br-{SUB.split('-')[1]}"),
    }
    assert plan.neighbours == expected


def test_a_subnet_without_ipam_has_no_gateway_to_answer_for() -> None:
    sub = subnet(ipam=IpamMode.NONE)
    b = PortRecord(
        id="port-0000000002",
        spec=PortSpec(network=NET, subnet=SUB, mac="02:00:00:00:00:02"),
        created_at=WHEN,
    )
    plan = plan_on("h1", records(b, subnets=(sub,)), {b.id: status("h2")})
    assert plan.neighbours == {link_local_address(b.spec.mac): b.spec.mac}
    assert plan.fdb == {b.spec.mac: H2}


def test_ports_that_are_down_missing_or_of_another_subnet_do_not_count() -> None:
    a, b, c = port(1), port(2), port(3, OTHER_SUB)
    known = records(a, b, c, subnets=(subnet(), subnet(OTHER_SUB, cidr="198.18.21.0/24")))
    where = {a.id: status("h2", LinkState.DOWN), c.id: status("h3")}  # b has no status
    plan = plan_on("h1", known, where)
    assert plan.flood == frozenset()
    assert plan.fdb == {}


def test_a_port_that_moves_to_another_host_moves_its_entry_and_the_flood_list() -> None:
    a, b = port(1), port(2)
    known = records(a, b)
    before = plan_on("h1", known, {a.id: status("h1"), b.id: status("h2")})
    after = plan_on("h1", known, {a.id: status("h1"), b.id: status("h3")})
    assert (before.flood, before.fdb) == ({H2}, {b.spec.mac: H2})
    assert (after.flood, after.fdb) == ({H3}, {b.spec.mac: H3})
    # Moved here, it is local: the tap has it.
    here = plan_on("h1", known, {a.id: status("h1"), b.id: status("h1")})
    assert (here.flood, here.fdb) == (frozenset(), {})


def test_hosts_without_a_known_underlay_address_are_reported_not_programmed() -> None:
    b, c = port(2), port(3)
    where = {b.id: status("h2"), c.id: status("h9")}
    plan = plan_on("h1", records(b, c), where)
    assert plan.flood == {H2}
    assert plan.unreachable_hosts == {"h9"}
    # A host claiming our own underlay address would make a loop: left out too.
    clash = plan_on("h1", records(b), {b.id: status("h2")}, {"h1": H1, "h2": H1})
    assert clash.flood == frozenset()
    assert clash.unreachable_hosts == {"h2"}


def test_underlay_addresses_and_remote_hosts_are_read_defensively() -> None:
    assert parse_underlay("198.18.64.1") == H1
    assert parse_underlay(None) is None
    assert parse_underlay("not an address") is None
    assert parse_underlay("2001:db8::1") is None
    assert remote_host_of(None, "h1") is None
    assert remote_host_of(status("h1"), "h1") is None
    assert remote_host_of(status("h2", LinkState.ERROR), "h1") is None
    assert remote_host_of(status("h2"), "h1") == "h2"
