"""Floating IPs through the API: addresses of an external network under a quota, pointed at
ports whose VPC has a way out there, never shared, and released."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from nubes.api.bootstrap import ensure_project
from nubes.model.project import Quota
from tests.support.api_lab import ApiLab


async def make(client: httpx.AsyncClient, path: str, **body: Any) -> dict[str, Any]:
    response = await client.post(f"/v1/{path}", json=body)
    assert response.status_code == 201, response.text
    made: dict[str, Any] = response.json()
    return made


async def setup(lab: ApiLab, cidr: str = "198.19.0.0/24") -> tuple[httpx.AsyncClient, str]:
    """An external network `public` and a member of `alpha` with a port on VPC `web`."""
    admin = await lab.admin()
    spec = {"cidr": cidr, "gateway": str(cidr.replace("0/", "1/").split("/")[0])}
    await make(admin, "networks", name="public", external=spec)
    alice = await lab.member("alpha")
    await make(alice, "networks", name="web")
    await make(alice, "subnets", name="s", network="web", cidr="198.18.0.0/24")
    port = await make(alice, "ports", network="web")
    return alice, port["id"]


async def test_a_floating_ip_points_at_a_port_once_its_vpc_has_a_way_out(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice, port = await setup(lab)
        fip = await make(alice, "floating-ips", network="public")
        assert (fip["spec"]["address"], fip["spec"]["port"]) == ("198.19.0.2", None)
        path = f"/v1/floating-ips/{fip['id']}"
        refused = await alice.post(f"{path}/associate", json={"port": port})
        assert refused.status_code == 409
        assert refused.json()["code"] == "no_external_gateway"
        assert "external_gateway" in refused.json()["hint"]
        web = (await alice.get("/v1/networks/web")).json()
        await alice.patch(f"/v1/networks/{web['id']}", json={"external_gateway": "public"})
        associated = await alice.post(f"{path}/associate", json={"port": port})
        assert associated.status_code == 200, associated.text
        assert associated.json()["spec"]["fixed_ip"] == "198.18.0.2"
        # A port's address takes one floating IP; the port and the gateway stay meanwhile.
        second = await make(alice, "floating-ips", network="public")
        taken = await alice.post(f"/v1/floating-ips/{second['id']}/associate", json={"port": port})
        assert taken.status_code == 409
        assert taken.json()["code"] == "address_in_use"
        assert (await alice.delete(f"/v1/ports/{port}")).status_code == 409
        kept = await alice.patch(f"/v1/networks/{web['id']}", json={"external_gateway": None})
        assert kept.status_code == 409
        off = await alice.post(f"{path}/disassociate")
        assert off.json()["spec"]["port"] is None
        moved = await alice.post(f"/v1/floating-ips/{second['id']}/associate", json={"port": port})
        assert moved.status_code == 200
        wrong = await alice.post(f"{path}/associate", json={"port": port, "fixed_ip": "198.18.0.9"})
        assert wrong.status_code == 400


async def test_release_frees_the_address_and_the_quota(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice, _ = await setup(lab)
        await ensure_project(lab.store, "alpha")
        record = await lab.store.get("/nubes/projects/alpha")
        assert record is not None
        assert isinstance(record.value, dict)
        document = dict(record.value)
        document["quota"] = Quota(floating_ips=2).model_dump()
        await lab.store.put("/nubes/projects/alpha", document)
        first = await make(alice, "floating-ips", network="public")
        await make(alice, "floating-ips", network="public")
        over = await alice.post("/v1/floating-ips", json={"network": "public"})
        assert over.status_code == 409
        assert over.json()["code"] == "quota_exceeded"
        assert (await alice.delete(f"/v1/floating-ips/{first['id']}")).status_code == 204
        again = await make(alice, "floating-ips", network="public")
        assert again["spec"]["address"] == first["spec"]["address"]


async def test_concurrent_allocations_never_share_an_address(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice, _ = await setup(lab, cidr="198.19.0.0/29")
        answers = await asyncio.gather(
            *(alice.post("/v1/floating-ips", json={"network": "public"}) for _ in range(8))
        )
        made = [a.json()["spec"]["address"] for a in answers if a.status_code == 201]
        # .1 is the gateway: .2 to .6 are free.
        assert sorted(made) == [f"198.19.0.{n}" for n in range(2, 7)]
        assert {a.json()["code"] for a in answers if a.status_code != 201} == {"no_free_address"}


async def test_asking_for_the_gateway_or_a_foreign_address_is_refused(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice, _ = await setup(lab)
        for address in ("198.19.0.1", "198.19.1.5", "198.19.0.255", "nope"):
            refused = await alice.post(
                "/v1/floating-ips", json={"network": "public", "address": address}
            )
            assert refused.status_code == 400, refused.text
        vpc = await alice.post("/v1/floating-ips", json={"network": "web"})
        assert vpc.status_code == 400
        assert "not an external network" in vpc.json()["message"]


async def test_another_project_cannot_see_or_use_a_floating_ip(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice, port = await setup(lab)
        bob = await lab.member("beta")
        fip = await make(alice, "floating-ips", network="public")
        path = f"/v1/floating-ips/{fip['id']}"
        assert (await bob.get(path)).status_code == 404
        assert (await bob.delete(path)).status_code == 404
        assert (await bob.post(f"{path}/disassociate")).status_code == 404
        assert (await bob.get("/v1/floating-ips")).json()["items"] == []
        own = await make(bob, "floating-ips", network="public")
        stolen = await bob.post(f"/v1/floating-ips/{own['id']}/associate", json={"port": port})
        assert stolen.status_code == 404
