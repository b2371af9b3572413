"""Networks and subnets through the API: VPCs, external networks every project sees, CIDR
overlap refused, VNIs unique under concurrency, deletes refused while something uses them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from tests.support.api_lab import ApiLab


async def make(client: httpx.AsyncClient, path: str, **body: Any) -> dict[str, Any]:
    response = await client.post(f"/v1/{path}", json=body)
    assert response.status_code == 201, response.text
    made: dict[str, Any] = response.json()
    return made


async def external(admin: httpx.AsyncClient, name: str = "public") -> dict[str, Any]:
    spec = {"cidr": "198.19.0.0/24", "gateway": "198.19.0.1", "physical_network": "external"}
    return await make(admin, "networks", name=name, external=spec)


async def keys(lab: ApiLab) -> list[str]:
    """Every key but the event log's (a refused request is an event, and nothing else)."""
    found = (await lab.store.range("/nubes/")).kvs
    return [kv.key for kv in found if not kv.key.startswith("/nubes/events/")]


async def test_a_member_makes_a_vpc_and_a_subnet_with_defaults(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        vpc = await make(alice, "networks", name="web")
        assert vpc["id"].startswith("vpc-")
        assert (vpc["project"], vpc["spec"]["mtu"], vpc["spec"]["gateway"]) == ("alpha", 1450, None)
        subnet = await make(alice, "subnets", name="front", network="web", cidr="198.18.4.0/24")
        spec = subnet["spec"]
        assert (spec["network"], spec["gateway"], spec["ipam"]) == (
            vpc["id"],
            "198.18.4.1",
            "automatic",
        )
        assert spec["vni"] >= 1000
        listed = (await alice.get("/v1/subnets", params={"network": "web"})).json()
        assert [item["id"] for item in listed["items"]] == [subnet["id"]]
        got = await alice.get(f"/v1/networks/{vpc['id']}")
        assert got.json()["spec"]["name"] == "web"


async def test_subnet_shapes_are_checked(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        await make(alice, "networks", name="web")
        for cidr, words in [
            ("10.0.0.0/8", "give a /16 to /29"),
            ("198.18.0.0/30", "give a /16 to /29"),
            ("not-a-cidr", "not an IPv4 network"),
        ]:
            refused = await alice.post(
                "/v1/subnets", json={"name": "s", "network": "web", "cidr": cidr}
            )
            assert refused.status_code == 400, refused.text
            assert refused.json()["code"] == "invalid_input"
            assert words in refused.json()["message"]
        outside = await alice.post(
            "/v1/subnets",
            json={"name": "s", "network": "web", "cidr": "198.18.0.0/24", "gateway": "198.18.1.1"},
        )
        assert outside.status_code == 400
        assert "gateway" in outside.json()["message"]
        v6 = await alice.post(
            "/v1/subnets",
            json={"name": "s", "network": "web", "cidr": "198.18.0.0/24", "ipv6_cidr": "fd00::/48"},
        )
        assert v6.status_code == 400
        assert "SLAAC needs a /64" in v6.json()["message"]
        assert not [key for key in await keys(lab) if "/subnets/" in key or "/claims/vni" in key]


async def test_overlapping_subnets_of_one_vpc_are_refused(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        await make(alice, "networks", name="web")
        await make(alice, "networks", name="db")
        await make(alice, "subnets", name="a", network="web", cidr="198.18.0.0/24")
        refused = await alice.post(
            "/v1/subnets", json={"name": "b", "network": "web", "cidr": "198.18.0.128/25"}
        )
        assert refused.status_code == 409
        body = refused.json()
        assert body["code"] == "cidr_overlap"
        assert "198.18.0.0/24" in body["message"]
        assert "hint" in body
        # Another VPC is another namespace: the same CIDR is fine there.
        await make(alice, "subnets", name="c", network="db", cidr="198.18.0.0/24")


async def test_concurrent_overlapping_subnets_leave_exactly_one(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        await make(alice, "networks", name="web")
        answers = await asyncio.gather(
            *(
                alice.post(
                    "/v1/subnets",
                    json={
                        "name": f"s{index}",
                        "network": "web",
                        "cidr": f"198.18.0.0/{24 + index % 4}",
                    },
                )
                for index in range(8)
            )
        )
        codes = sorted(answer.status_code for answer in answers)
        assert codes == [201] + [409] * 7, [a.text for a in answers]


async def test_concurrent_subnets_get_distinct_vnis(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        await make(alice, "networks", name="web")
        answers = await asyncio.gather(
            *(
                alice.post(
                    "/v1/subnets",
                    json={"name": f"s{index}", "network": "web", "cidr": f"198.18.{index}.0/24"},
                )
                for index in range(12)
            )
        )
        assert all(answer.status_code == 201 for answer in answers), [a.text for a in answers]
        vnis = [answer.json()["spec"]["vni"] for answer in answers]
        assert len(set(vnis)) == 12
        claims = [key for key in await keys(lab) if key.startswith("/nubes/claims/vni/")]
        assert len(claims) == 12


async def test_a_deleted_subnet_gives_its_vni_back(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        await make(alice, "networks", name="web")
        first = await make(alice, "subnets", name="a", network="web", cidr="198.18.0.0/24")
        assert (await alice.delete(f"/v1/subnets/{first['id']}")).status_code == 204
        again = await make(alice, "subnets", name="a", network="web", cidr="198.18.0.0/24")
        assert again["spec"]["vni"] == first["spec"]["vni"]


async def test_deletes_are_refused_while_something_uses_the_network(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        vpc = await make(alice, "networks", name="web")
        subnet = await make(alice, "subnets", name="a", network="web", cidr="198.18.0.0/28")
        port = await make(alice, "ports", network="web")
        refused = await alice.delete(f"/v1/networks/{vpc['id']}")
        assert refused.status_code == 409
        assert refused.json()["code"] == "in_use"
        assert subnet["id"] in refused.json()["message"]
        busy = await alice.delete(f"/v1/subnets/{subnet['id']}")
        assert busy.status_code == 409
        assert port["id"] in busy.json()["message"]
        assert (await alice.delete(f"/v1/ports/{port['id']}")).status_code == 204
        assert (await alice.delete(f"/v1/subnets/{subnet['id']}")).status_code == 204
        assert (await alice.delete(f"/v1/networks/{vpc['id']}")).status_code == 204
        left = [
            k for k in await keys(lab) if "/networks/" in k or "/claims/" in k or "/names/n" in k
        ]
        # Only the default security group made for the port remains.
        assert [k for k in left if "sg-" not in k] == [], left


async def test_external_networks_are_made_by_admins_and_seen_by_every_project(
    tmp_path: Path,
) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        alice = await lab.member("alpha")
        body = {"name": "public", "external": {"cidr": "198.19.0.0/24"}}
        refused = await alice.post("/v1/networks", json=body)
        assert refused.status_code == 403
        public = await external(admin)
        assert public["spec"]["external"]["physical_network"] == "external"
        assert (await alice.get(f"/v1/networks/{public['id']}")).status_code == 200
        assert (await alice.get("/v1/networks/public")).json()["id"] == public["id"]
        listed = (await alice.get("/v1/networks", params={"external": True})).json()["items"]
        assert [item["id"] for item in listed] == [public["id"]]
        assert (await alice.delete(f"/v1/networks/{public['id']}")).status_code == 403
        subnet = await alice.post(
            "/v1/subnets", json={"name": "s", "network": "public", "cidr": "198.19.0.0/24"}
        )
        assert subnet.status_code == 400
        assert "external network" in subnet.json()["message"]


async def test_a_vpc_gateway_takes_an_external_address_that_nothing_else_gets(
    tmp_path: Path,
) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        alice = await lab.member("alpha")
        bob = await lab.member("beta")
        public = await external(admin)
        web = await make(alice, "networks", name="web", external_gateway="public")
        other = await make(bob, "networks", name="web", external_gateway=public["id"])
        addresses = {web["spec"]["gateway"]["address"], other["spec"]["gateway"]["address"]}
        assert addresses == {"198.19.0.2", "198.19.0.3"}  # .1 is the outside gateway
        fip = await make(alice, "floating-ips", network="public")
        assert fip["spec"]["address"] == "198.19.0.4"
        taken = await alice.post(
            "/v1/floating-ips", json={"network": "public", "address": "198.19.0.2"}
        )
        assert taken.status_code == 409
        assert taken.json()["code"] == "address_in_use"
        busy = await admin.delete(f"/v1/networks/{public['id']}")
        assert busy.status_code == 409
        assert busy.json()["code"] == "in_use"
        # Removing the gateway gives the address back.
        cleared = await alice.patch(f"/v1/networks/{web['id']}", json={"external_gateway": None})
        assert cleared.status_code == 200, cleared.text
        assert cleared.json()["spec"]["gateway"] is None
        again = await make(alice, "floating-ips", network="public")
        assert again["spec"]["address"] == "198.19.0.2"


async def test_another_project_cannot_see_or_use_a_vpc(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        bob = await lab.member("beta")
        vpc = await make(alice, "networks", name="web")
        subnet = await make(alice, "subnets", name="a", network="web", cidr="198.18.0.0/24")
        for path in (f"/v1/networks/{vpc['id']}", f"/v1/subnets/{subnet['id']}"):
            assert (await bob.get(path)).status_code == 404
            assert (await bob.delete(path)).status_code == 404
            assert (await bob.patch(path, json={"name": "mine"})).status_code == 404
        assert (await bob.get("/v1/networks")).json()["items"] == []
        assert (await bob.get("/v1/subnets")).json()["items"] == []
        sneaky = await bob.post(
            "/v1/subnets", json={"name": "s", "network": vpc["id"], "cidr": "198.18.9.0/24"}
        )
        assert sneaky.status_code == 404
        assert (await bob.post("/v1/ports", json={"network": vpc["id"]})).status_code == 404


async def test_names_are_unique_per_project_and_renames_free_the_old_name(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        bob = await lab.member("beta")
        vpc = await make(alice, "networks", name="web")
        await make(bob, "networks", name="web")
        twice = await alice.post("/v1/networks", json={"name": "web"})
        assert twice.status_code == 409
        renamed = await alice.patch(f"/v1/networks/{vpc['id']}", json={"name": "www", "mtu": 1400})
        assert renamed.json()["spec"]["name"] == "www"
        assert renamed.json()["spec"]["mtu"] == 1400
        await make(alice, "networks", name="web")
