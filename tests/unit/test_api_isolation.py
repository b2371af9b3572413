"""Projects isolate: a member of one project cannot see, change or guess another's records."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.support.api_lab import ApiLab

PASSWORD = "long enough"  # noqa: S105 - the test users' password


async def two_projects(lab: ApiLab) -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
    """Projects alpha (member alice) and beta (member bob); returns (admin, alice)."""
    admin = await lab.admin()
    for project, user in [("alpha", "alice"), ("beta", "bob")]:
        assert (await admin.post("/v1/projects", json={"name": project})).status_code == 201
        body = {"name": user, "password": PASSWORD, "projects": [project]}
        assert (await admin.post("/v1/users", json=body)).status_code == 201
    login = await lab.client().post("/v1/auth/login", json={"user": "alice", "password": PASSWORD})
    assert login.status_code == 201, login.text
    return admin, lab.client(login.json()["token"])


async def test_a_member_sees_only_its_own_project(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        _, alice = await two_projects(lab)
        listed = (await alice.get("/v1/projects")).json()
        assert [item["name"] for item in listed["items"]] == ["alpha"]
        assert (await alice.get("/v1/projects/alpha")).status_code == 200
        assert (await alice.get("/v1/projects/alpha/usage")).status_code == 200
        for path in ["/v1/projects/beta", "/v1/projects/beta/usage", "/v1/users/bob"]:
            hidden = await alice.get(path)
            assert hidden.status_code == 404, path
            assert hidden.json()["code"] == "not_found"
        # Another project answers exactly like one that does not exist.
        real = await alice.get("/v1/projects/beta")
        made_up = await alice.get("/v1/projects/gamma")
        assert real.json()["message"].replace("beta", "X") == made_up.json()["message"].replace(
            "gamma", "X"
        )
        assert (await alice.get("/v1/users/nobody")).status_code == 404


async def test_a_member_cannot_log_into_another_project_or_tell_it_exists(
    tmp_path: Path,
) -> None:
    async with ApiLab.open(tmp_path) as lab:
        await two_projects(lab)
        client = lab.client()
        answers = {}
        for project in ["beta", "gamma", "default"]:
            body = {"user": "alice", "password": PASSWORD, "project": project}
            answer = await client.post("/v1/auth/login", json=body)
            assert answer.status_code == 401, project
            answers[project] = answer.json()
        shapes = {
            (body["code"], body["message"].replace(project, "X"), body["hint"])
            for project, body in answers.items()
        }
        assert len(shapes) == 1
        assert (
            await client.post("/v1/auth/login", json={"user": "alice", "password": PASSWORD})
        ).json()["project"] == "alpha"


async def test_an_admin_switches_project_by_logging_into_it(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        await two_projects(lab)
        client = lab.client()
        body = {"user": "admin", "password": "admin-password", "project": "beta"}
        login = await client.post("/v1/auth/login", json=body)
        assert login.status_code == 201, login.text
        admin_in_beta = lab.client(login.json()["token"])
        me = (await admin_in_beta.get("/v1/auth/whoami")).json()
        assert (me["project"], me["role"]) == ("beta", "admin")
        missing = await client.post("/v1/auth/login", json={**body, "project": "gamma"})
        assert missing.status_code == 404
        assert missing.json()["code"] == "not_found"


async def test_a_member_removed_from_its_project_loses_access(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin, alice = await two_projects(lab)
        assert (await alice.get("/v1/auth/whoami")).status_code == 200
        moved = await admin.patch("/v1/users/alice", json={"projects": ["beta"]})
        assert moved.status_code == 200
        assert (await alice.get("/v1/auth/whoami")).status_code == 401
        assert (await alice.get("/v1/flavors")).status_code == 401


async def test_a_member_cannot_touch_another_users_tokens_or_account(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        _, alice = await two_projects(lab)
        bob_login = await lab.client().post(
            "/v1/auth/login", json={"user": "bob", "password": PASSWORD}
        )
        bob = lab.client(bob_login.json()["token"])
        bob_token = bob_login.json()["token_id"]
        assert (await alice.delete(f"/v1/auth/tokens/{bob_token}")).status_code == 404
        assert (await alice.get("/v1/auth/tokens", params={"user": "bob"})).status_code == 403
        change = {"old_password": PASSWORD, "new_password": "taken over"}
        assert (await alice.post("/v1/users/bob/password", json=change)).status_code == 404
        assert (await alice.patch("/v1/users/bob", json={"projects": []})).status_code == 403
        assert (await alice.delete("/v1/users/bob/totp")).status_code == 403
        assert (await bob.get("/v1/auth/whoami")).json()["project"] == "beta"


async def test_flavors_are_shared_but_only_admins_change_them(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin, alice = await two_projects(lab)
        body = {"name": "beta-only", "vcpus": 2, "memory_mb": 1024}
        assert (await alice.post("/v1/flavors", json=body)).status_code == 403
        assert (await alice.delete("/v1/flavors/small")).status_code == 403
        assert (await admin.post("/v1/flavors", json=body)).status_code == 201
        names = [item["name"] for item in (await alice.get("/v1/flavors")).json()["items"]]
        assert "beta-only" in names
