"""Security groups through the API: default egress, rules with stable ids, remote groups
of the same project only, deletes refused while ports or rules use a group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from nubes.model.security_group import MAX_RULES, SecurityGroupRule
from tests.support.api_lab import ApiLab


async def make(client: httpx.AsyncClient, path: str, **body: Any) -> dict[str, Any]:
    response = await client.post(f"/v1/{path}", json=body)
    assert response.status_code == 201, response.text
    made: dict[str, Any] = response.json()
    return made


SSH = {"direction": "ingress", "protocol": "tcp", "port_min": 22, "port_max": 22}


async def test_a_new_group_allows_egress_and_rules_come_and_go_by_id(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        group = await make(alice, "security-groups", name="web", description="front")
        assert {r["direction"] for r in group["spec"]["rules"]} == {"egress"}
        rule = await make(alice, f"security-groups/{group['id']}/rules", **SSH)
        assert rule["id"] == SecurityGroupRule(**SSH).id  # type: ignore[arg-type]
        again = await alice.post(f"/v1/security-groups/{group['id']}/rules", json=SSH)
        assert again.status_code == 409
        assert rule["id"] in again.json()["message"]
        got = (await alice.get(f"/v1/security-groups/{group['id']}")).json()
        assert rule["id"] in [r["id"] for r in got["spec"]["rules"]]
        gone = await alice.delete(f"/v1/security-groups/{group['id']}/rules/{rule['id']}")
        assert gone.status_code == 204
        missing = await alice.delete(f"/v1/security-groups/{group['id']}/rules/{rule['id']}")
        assert missing.status_code == 404


async def test_rules_are_validated(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        group = await make(alice, "security-groups", name="web")
        path = f"/v1/security-groups/{group['id']}/rules"
        for rule in [
            {"direction": "ingress", "protocol": "tcp", "port_min": 30, "port_max": 20},
            {"direction": "ingress", "protocol": "icmp", "ethertype": "ipv6"},
            {"direction": "sideways"},
            {"direction": "ingress", "id": "chosen1"},
        ]:
            refused = await alice.post(path, json=rule)
            assert refused.status_code == 422, refused.text
            assert refused.json()["code"] == "invalid_input"
        twice = await alice.put(path, json=[SSH, SSH])
        assert twice.status_code == 400
        assert "twice" in twice.json()["message"]


async def test_replacing_rules_and_the_rule_limit(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        group = await make(alice, "security-groups", name="web")
        path = f"/v1/security-groups/{group['id']}/rules"
        replaced = await alice.put(path, json=[SSH])
        assert replaced.status_code == 200, replaced.text
        assert [r["port_min"] for r in replaced.json()["spec"]["rules"]] == [22]
        many = [
            {"direction": "ingress", "protocol": "tcp", "port_min": port, "port_max": port}
            for port in range(1, MAX_RULES + 1)
        ]
        full = await alice.put(path, json=many)
        assert full.status_code == 200
        over = await alice.post(path, json={"direction": "ingress", "protocol": "udp"})
        assert over.status_code == 409
        assert str(MAX_RULES) in over.json()["message"]


async def test_remote_groups_must_be_the_projects_own(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        bob = await lab.member("beta")
        web = await make(alice, "security-groups", name="web")
        db = await make(
            alice,
            "security-groups",
            name="db",
            rules=[{"direction": "ingress", "remote_group": "web"}],
        )
        assert db["spec"]["rules"][0]["remote_group"] == web["id"]
        theirs = await make(bob, "security-groups", name="theirs")
        refused = await alice.post(
            f"/v1/security-groups/{db['id']}/rules",
            json={"direction": "ingress", "remote_group": theirs["id"]},
        )
        assert refused.status_code == 404
        # web is named by db's rule: it stays until the rule goes.
        busy = await alice.delete(f"/v1/security-groups/{web['id']}")
        assert busy.status_code == 409
        assert busy.json()["code"] == "in_use"
        assert (await alice.delete(f"/v1/security-groups/{db['id']}")).status_code == 204
        assert (await alice.delete(f"/v1/security-groups/{web['id']}")).status_code == 204


async def test_a_group_used_by_a_port_is_not_deleted(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        await make(alice, "networks", name="net")
        await make(alice, "subnets", name="s", network="net", cidr="198.18.0.0/24")
        group = await make(alice, "security-groups", name="web")
        port = await make(alice, "ports", network="net", security_groups=["web"])
        refused = await alice.delete(f"/v1/security-groups/{group['id']}")
        assert refused.status_code == 409
        assert port["id"] in refused.json()["message"]
        await alice.patch(f"/v1/ports/{port['id']}", json={"security_groups": []})
        assert (await alice.delete(f"/v1/security-groups/{group['id']}")).status_code == 204


async def test_another_project_cannot_see_or_change_a_group(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        bob = await lab.member("beta")
        group = await make(alice, "security-groups", name="web")
        path = f"/v1/security-groups/{group['id']}"
        assert (await bob.get(path)).status_code == 404
        assert (await bob.patch(path, json={"name": "x"})).status_code == 404
        assert (await bob.post(f"{path}/rules", json=SSH)).status_code == 404
        assert (await bob.put(f"{path}/rules", json=[])).status_code == 404
        assert (await bob.delete(path)).status_code == 404
        assert (await bob.get("/v1/security-groups")).json()["items"] == []
        renamed = await alice.patch(path, json={"name": "www", "description": "d"})
        assert renamed.json()["spec"]["name"] == "www"
        await make(alice, "security-groups", name="web")
