"""Projects through the API: admins run them, quotas bound creates, only empty ones go."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from nubes.api.context import Caller
from nubes.api.records import Guards, Records, name_guard
from nubes.errors import QuotaExceeded
from nubes.model.common import now
from nubes.model.network import KeypairRecord, keypair_key_name
from nubes.model.project import Role, Usage
from nubes.store.base import KeyValue
from nubes.store.keys import Kind, resource_key, usage_key
from tests.support.api_lab import ADMIN, ApiLab

PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGnX0uGnQm4E9s1bc4Y0T6r1vOeUO3nT1jUU4b4bY6tE t"


def caller_in(project: str) -> Caller:
    return Caller(user=ADMIN, role=Role.ADMIN, project=project, token_id="0" * 16)


def keypair(project: str, name: str) -> KeypairRecord:
    return KeypairRecord(name=name, project=project, public_key=PUBLIC_KEY, created_at=now())


async def take(lab: ApiLab, project: str, name: str, usage: Usage) -> None:
    """Makes a record in `project` that counts `usage` against its quota."""
    await Records(lab.store).create(
        caller_in(project),
        Kind.KEYPAIR,
        f"{project}-{name}",
        keypair(project, name),
        Guards(usage=usage, names=name_guard(Kind.KEYPAIR, project, name, f"{project}-{name}")),
    )


async def test_admins_make_change_list_and_delete_projects(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        made = await admin.post(
            "/v1/projects", json={"name": "alpha", "description": "team A", "quota": {"vms": 3}}
        )
        assert made.status_code == 201, made.text
        assert made.json()["quota"]["vms"] == 3
        assert made.json()["quota"]["vcpus"] == 40
        assert (await admin.post("/v1/projects", json={"name": "alpha"})).status_code == 409
        changed = await admin.patch(
            "/v1/projects/alpha", json={"quota": {"vcpus": 8, "floating_ips": -1}}
        )
        assert changed.status_code == 200, changed.text
        quota = changed.json()["quota"]
        assert (quota["vms"], quota["vcpus"], quota["floating_ips"]) == (3, 8, -1)
        assert changed.json()["description"] == "team A"
        names = [item["name"] for item in (await admin.get("/v1/projects")).json()["items"]]
        assert names == ["alpha", "default"]
        assert (await admin.get("/v1/projects/alpha")).json()["quota"]["vcpus"] == 8
        assert (await admin.delete("/v1/projects/alpha")).status_code == 204
        assert (await admin.get("/v1/projects/alpha")).status_code == 404
        assert await lab.store.get(resource_key(Kind.PROJECT, "alpha")) is None


async def test_bad_project_input_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        before = (await lab.store.range("/nubes/projects/")).kvs
        for body in [
            {"name": "-dash"},
            {"name": "a/b"},
            {"name": "alpha", "quota": {"vms": -2}},
            {"name": "alpha", "quota": {"cores": 2}},
            {"name": "alpha", "id": "x"},
        ]:
            answer = await admin.post("/v1/projects", json=body)
            assert answer.status_code == 422, body
            assert answer.json()["code"] == "invalid_input"
        assert (await lab.store.range("/nubes/projects/")).kvs == before
        assert (await admin.patch("/v1/projects/nope", json={})).status_code == 404


async def test_usage_shows_quota_and_what_the_project_holds(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        await admin.post("/v1/projects", json={"name": "alpha", "quota": {"vms": 2}})
        empty = (await admin.get("/v1/projects/alpha/usage")).json()
        assert empty["usage"] == Usage().model_dump()
        assert empty["quota"]["vms"] == 2
        await take(lab, "alpha", "one", Usage(vms=1, vcpus=2, memory_mb=512))
        held = (await admin.get("/v1/projects/alpha/usage")).json()
        assert (held["usage"]["vms"], held["usage"]["vcpus"]) == (1, 2)


async def test_a_quota_lowered_below_usage_refuses_new_creates(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        await admin.post("/v1/projects", json={"name": "alpha", "quota": {"vms": 5}})
        await take(lab, "alpha", "one", Usage(vms=1))
        await take(lab, "alpha", "two", Usage(vms=1))
        lowered = await admin.patch("/v1/projects/alpha", json={"quota": {"vms": 1}})
        assert lowered.status_code == 200
        with pytest.raises(QuotaExceeded) as refused:
            await take(lab, "alpha", "three", Usage(vms=1))
        assert "vms 3/1" in refused.value.message
        # What does not grow the over-quota count still goes through.
        await take(lab, "alpha", "volume", Usage(volumes=1))
        usage = (await admin.get("/v1/projects/alpha/usage")).json()["usage"]
        assert (usage["vms"], usage["volumes"]) == (2, 1)
        assert await lab.store.get(resource_key(Kind.KEYPAIR, "alpha-three")) is None


async def test_two_creates_cannot_both_take_the_last_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        await admin.post("/v1/projects", json={"name": "alpha", "quota": {"vms": 1}})
        contenders = 4
        # Hold every create after it read the usage, so all of them saw the last slot free.
        everyone_read = asyncio.Barrier(contenders)
        read = lab.store.get
        first_reads: set[asyncio.Task[Any] | None] = set()

        async def get_in_step(key: str) -> KeyValue | None:
            found = await read(key)
            task = asyncio.current_task()
            if key == usage_key("alpha") and task not in first_reads:
                first_reads.add(task)
                await everyone_read.wait()
            return found

        monkeypatch.setattr(lab.store, "get", get_in_step)
        outcomes = await asyncio.gather(
            *(take(lab, "alpha", f"vm{index}", Usage(vms=1)) for index in range(contenders)),
            return_exceptions=True,
        )
        monkeypatch.undo()
        assert len(first_reads) == contenders
        winners = [outcome for outcome in outcomes if outcome is None]
        losers = [outcome for outcome in outcomes if isinstance(outcome, QuotaExceeded)]
        assert (len(winners), len(losers)) == (1, contenders - 1), outcomes
        assert all(loser.code == "quota_exceeded" for loser in losers)
        assert all(loser.http_status == 409 for loser in losers)
        usage = (await admin.get("/v1/projects/alpha/usage")).json()["usage"]
        assert usage["vms"] == 1
        made = (await lab.store.range("/nubes/keypairs/")).kvs
        assert len(made) == 1


async def test_a_project_with_resources_is_not_deleted(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        await admin.post("/v1/projects", json={"name": "alpha"})
        await take(lab, "alpha", "web", Usage(vms=1))
        held = await admin.delete("/v1/projects/alpha")
        assert held.status_code == 409
        assert held.json()["code"] == "conflict"
        assert "vms 1" in held.json()["message"]
        assert "keypairs" in held.json()["message"]
        assert "hint" in held.json()
        await Records(lab.store).remove(
            caller_in("alpha"),
            await _must_get(lab, resource_key(Kind.KEYPAIR, "alpha-web")),
            Guards(
                freed=Usage(vms=1),
                released_names=list(name_guard(Kind.KEYPAIR, "alpha", "web", "alpha-web")),
            ),
        )
        assert (await admin.delete("/v1/projects/alpha")).status_code == 204
        assert (await lab.store.range("/nubes/projects/alpha")).kvs == []


async def test_a_name_guard_alone_keeps_a_project(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        await admin.post("/v1/projects", json={"name": "alpha"})
        await take(lab, "alpha", "key", Usage())
        refused = await admin.delete("/v1/projects/alpha")
        assert refused.status_code == 409
        assert "keypairs" in refused.json()["message"]
        assert await lab.store.get(resource_key(Kind.PROJECT, "alpha")) is not None


async def test_deleting_a_project_drops_its_members_and_tokens(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        await admin.post("/v1/projects", json={"name": "alpha"})
        await admin.post("/v1/projects", json={"name": "beta"})
        body = {"name": "alice", "password": "long enough", "projects": ["alpha", "beta"]}
        await admin.post("/v1/users", json=body)
        login = {"user": "alice", "password": "long enough", "project": "alpha"}
        token = (await lab.client().post("/v1/auth/login", json=login)).json()["token"]
        alice = lab.client(token)
        assert (await alice.get("/v1/auth/whoami")).status_code == 200
        assert (await admin.delete("/v1/projects/alpha")).status_code == 204
        assert (await alice.get("/v1/auth/whoami")).status_code == 401
        assert (await admin.get("/v1/users/alice")).json()["projects"] == ["beta"]
        # A new project with the old name does not let the old members back in.
        await admin.post("/v1/projects", json={"name": "alpha"})
        again = await lab.client().post("/v1/auth/login", json=login)
        assert again.status_code == 401


async def test_a_key_pair_keeps_a_project(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        await admin.post("/v1/projects", json={"name": "alpha"})
        await admin.post("/v1/projects", json={"name": "alpha2"})
        # Key pairs live at <project>:<name> without a name guard.
        key = resource_key(Kind.KEYPAIR, keypair_key_name("alpha", "mine"))
        await lab.store.put(key, keypair("alpha", "mine").to_json())
        refused = await admin.delete("/v1/projects/alpha")
        assert refused.status_code == 409
        assert "keypairs" in refused.json()["message"]
        assert (await admin.delete("/v1/projects/alpha2")).status_code == 204


async def test_an_admin_cannot_delete_the_project_its_token_works_in(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        refused = await admin.delete("/v1/projects/default")
        assert refused.status_code == 409
        assert await lab.store.get(resource_key(Kind.PROJECT, "default")) is not None


async def _must_get(lab: ApiLab, key: str) -> KeyValue:
    kv = await lab.store.get(key)
    assert kv is not None
    return kv


async def test_a_quota_beyond_what_the_store_can_keep_is_refused(tmp_path: Path) -> None:
    # Schemathesis found these answered 500: the store's JSON encoder stops at 64 bits.
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        made = await admin.post("/v1/projects", json={"name": "big", "quota": {"vms": 2**64}})
        assert made.status_code == 422
        assert made.json()["code"] == "invalid_input"
        assert (await admin.post("/v1/projects", json={"name": "big"})).status_code == 201
        patched = await admin.patch("/v1/projects/big", json={"quota": {"vcpus": 2**63}})
        assert patched.status_code == 422
        assert patched.json()["code"] == "invalid_input"
