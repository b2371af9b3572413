"""Ports through the API: addresses from IPAM (distinct under concurrency), fixed IPs
checked, SLAAC IPv6, the default security group, deletes that free addresses."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import httpx

from nubes.api.context import Caller
from nubes.api.netops import (
    lost_race,
    merge_guards,
    port_claim_keys,
    port_write_guards,
    prepare_port,
)
from nubes.api.records import Records
from nubes.ipam import slaac_address
from nubes.model.network import PortRecord
from nubes.model.project import Role
from nubes.store.keys import Kind
from tests.support.api_lab import ApiLab


async def make(client: httpx.AsyncClient, path: str, **body: Any) -> dict[str, Any]:
    response = await client.post(f"/v1/{path}", json=body)
    assert response.status_code == 201, response.text
    made: dict[str, Any] = response.json()
    return made


ALICE = Caller(user="u", role=Role.MEMBER, project="alpha", token_id="direct")  # noqa: S106


async def vpc(client: httpx.AsyncClient, cidr: str = "198.18.0.0/24", **subnet: Any) -> str:
    await make(client, "networks", name="web")
    made = await make(client, "subnets", name="front", network="web", cidr=cidr, **subnet)
    subnet_id: str = made["id"]
    return subnet_id


async def test_a_port_gets_the_lowest_free_address_a_mac_and_the_default_group(
    tmp_path: Path,
) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        subnet = await vpc(alice)
        first = await make(alice, "ports", network="web", name="eth0")
        second = await make(alice, "ports", network="web")
        assert first["spec"]["subnet"] == subnet
        assert first["spec"]["fixed_ips"] == ["198.18.0.2"]
        assert second["spec"]["fixed_ips"] == ["198.18.0.3"]
        assert first["spec"]["mac"].startswith("02:6e:75:")
        assert first["spec"]["mac"] != second["spec"]["mac"]
        [group] = first["spec"]["security_groups"]
        assert second["spec"]["security_groups"] == [group]
        default = (await alice.get(f"/v1/security-groups/{group}")).json()
        assert default["spec"]["name"] == "default"
        ingress = [r for r in default["spec"]["rules"] if r["direction"] == "ingress"]
        assert {r["remote_group"] for r in ingress} == {group}
        assert (await alice.get("/v1/ports", params={"name": "eth0"})).json()["items"][0]["id"] == (
            first["id"]
        )


async def test_a_v6_subnet_gives_ports_their_slaac_address(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        await vpc(alice, ipv6_cidr="fd00:1:2:3::/64")
        port = await make(alice, "ports", network="web")
        v4, v6 = port["spec"]["fixed_ips"]
        expected = slaac_address(ipaddress.IPv6Network("fd00:1:2:3::/64"), port["spec"]["mac"])
        assert (v4, v6) == ("198.18.0.2", str(expected))


async def test_fixed_ips_must_be_free_host_addresses_of_the_subnet(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        await vpc(alice)
        chosen = await make(alice, "ports", network="web", fixed_ip="198.18.0.50")
        assert chosen["spec"]["fixed_ips"] == ["198.18.0.50"]
        for address, words in [
            ("198.18.1.5", "is not in subnet"),
            ("198.18.0.0", "network or broadcast"),
            ("198.18.0.255", "network or broadcast"),
            ("198.18.0.1", "is the gateway"),
            ("fd00::5", "not an IPv4 address"),
        ]:
            refused = await alice.post("/v1/ports", json={"network": "web", "fixed_ip": address})
            assert refused.status_code == 400, refused.text
            assert words in refused.json()["message"]
        taken = await alice.post("/v1/ports", json={"network": "web", "fixed_ip": "198.18.0.50"})
        assert taken.status_code == 409
        assert taken.json()["code"] == "address_in_use"
        assert chosen["id"] in taken.json()["message"]


async def test_twenty_concurrent_ports_in_a_slash_28_get_distinct_addresses(
    tmp_path: Path,
) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        await vpc(alice, cidr="198.18.0.0/28")
        answers = await asyncio.gather(
            *(alice.post("/v1/ports", json={"network": "web"}) for _ in range(20))
        )
        made = [answer.json() for answer in answers if answer.status_code == 201]
        full = [answer.json() for answer in answers if answer.status_code != 201]
        # 14 host addresses, one of them the gateway: 13 ports fit.
        assert len(made) == 13, [answer.text for answer in answers]
        addresses = [port["spec"]["fixed_ips"][0] for port in made]
        assert sorted(addresses, key=ipaddress.IPv4Address) == [
            f"198.18.0.{n}" for n in range(2, 15)
        ]
        assert {error["code"] for error in full} == {"no_free_address"}
        assert all("no free address" in error["message"] for error in full)
        claims = [kv.key for kv in (await lab.store.range("/nubes/claims/ip-")).kvs]
        assert len(claims) == 13


async def test_deleting_a_port_frees_its_address_and_name(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        await vpc(alice)
        port = await make(alice, "ports", network="web", name="eth0")
        assert (await alice.delete(f"/v1/ports/{port['id']}")).status_code == 204
        again = await make(alice, "ports", network="web", name="eth0")
        assert again["spec"]["fixed_ips"] == port["spec"]["fixed_ips"]
        record = PortRecord.model_validate({k: v for k, v in again.items() if k != "status"})
        for key in port_claim_keys(record):
            assert await lab.store.get(key) is not None, key


async def test_a_port_plugged_into_a_vm_is_not_deleted(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        await vpc(alice)
        caller = ALICE
        port_id, record, guards = await prepare_port(
            lab.store, caller, network="web", vm="i-aaaaaaaaaa", auto_delete=True
        )
        await Records(lab.store).create(caller, Kind.PORT, port_id, record, guards)
        refused = await alice.delete(f"/v1/ports/{port_id}")
        assert refused.status_code == 409
        assert refused.json()["code"] == "in_use"
        assert "i-aaaaaaaaaa" in refused.json()["message"]


async def test_ports_prepared_for_one_vm_never_share_an_address(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        await vpc(alice)
        caller = ALICE
        first_id, first, first_guards = await prepare_port(lab.store, caller, network="web")
        second_id, second, second_guards = await prepare_port(
            lab.store, caller, network="web", also_claimed=first_guards.claims
        )
        assert first.spec.fixed_ips != second.spec.fixed_ips
        guards = merge_guards(first_guards, second_guards, port_write_guards(second_id, second))
        # Both reference the same network, subnet and group: each key is written once.
        written = [operation.key for operation in guards.operations]
        assert len(written) == len(set(written))
        assert not await lost_race(lab.store, guards)
        await Records(lab.store).create(caller, Kind.PORT, first_id, first, guards)
        listed = (await alice.get("/v1/ports")).json()["items"]
        assert {port["id"] for port in listed} >= {first_id, second_id}


async def test_updates_change_groups_and_port_security(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        await vpc(alice)
        group = await make(alice, "security-groups", name="ssh")
        port = await make(alice, "ports", network="web", security_groups=["ssh"])
        assert port["spec"]["security_groups"] == [group["id"]]
        changed = await alice.patch(
            f"/v1/ports/{port['id']}",
            json={"security_groups": [], "port_security": False, "name": "bare"},
        )
        assert changed.status_code == 200, changed.text
        spec = changed.json()["spec"]
        assert (spec["security_groups"], spec["port_security"], spec["name"]) == ([], False, "bare")


async def test_another_project_cannot_see_or_change_a_port(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        bob = await lab.member("beta")
        subnet = await vpc(alice)
        port = await make(alice, "ports", network="web")
        path = f"/v1/ports/{port['id']}"
        assert (await bob.get(path)).status_code == 404
        assert (await bob.patch(path, json={"name": "x"})).status_code == 404
        assert (await bob.delete(path)).status_code == 404
        assert (await bob.get("/v1/ports")).json()["items"] == []
        await make(bob, "networks", name="own")
        await make(bob, "subnets", name="s", network="own", cidr="198.18.0.0/24")
        stolen = await bob.post("/v1/ports", json={"network": "own", "subnet": subnet})
        assert stolen.status_code == 404
        group = port["spec"]["security_groups"][0]
        borrowed = await bob.post("/v1/ports", json={"network": "own", "security_groups": [group]})
        assert borrowed.status_code == 404


async def test_a_failed_port_create_leaves_nothing(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        await vpc(alice)
        await make(alice, "ports", network="web", name="eth0")
        before = [
            kv.key for kv in (await lab.store.range("/nubes/")).kvs if "/events/" not in kv.key
        ]
        twice = await alice.post("/v1/ports", json={"network": "web", "name": "eth0"})
        assert twice.status_code == 409
        no_group = await alice.post("/v1/ports", json={"network": "web", "security_groups": ["x"]})
        assert no_group.status_code == 404
        after = [
            kv.key for kv in (await lab.store.range("/nubes/")).kvs if "/events/" not in kv.key
        ]
        assert after == before
