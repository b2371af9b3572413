"""Login, tokens, TOTP and users through the API: who may do what, and what never leaks."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from nubes.api.auth import TOTP_STEP, mint_token, totp_code
from nubes.store.keys import Kind, kind_prefix, resource_key
from tests.support.api_lab import ADMIN, ApiLab

PASSWORD = "correct horse"  # noqa: S105 - the test users' password


async def make_user(
    admin: httpx.AsyncClient,
    name: str,
    password: str = PASSWORD,
    *,
    projects: list[str] | None = None,
    role: str = "member",
) -> None:
    for project in projects or []:
        await admin.post("/v1/projects", json={"name": project})
    body = {"name": name, "password": password, "role": role, "projects": projects or []}
    made = await admin.post("/v1/users", json=body)
    assert made.status_code == 201, made.text


async def log_in(lab: ApiLab, user: str, password: str, **body: Any) -> httpx.Response:
    body.update(user=user, password=password)
    return await lab.client().post("/v1/auth/login", json=body)


async def token_of(lab: ApiLab, user: str, password: str = PASSWORD) -> httpx.AsyncClient:
    answer = await log_in(lab, user, password)
    assert answer.status_code == 201, answer.text
    return lab.client(answer.json()["token"])


async def test_login_gives_a_token_for_the_users_first_project(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        await make_user(admin, "alice", projects=["alpha", "beta"])
        answer = await log_in(lab, "alice", PASSWORD)
        assert answer.status_code == 201, answer.text
        body = answer.json()
        assert (body["user"], body["role"], body["project"]) == ("alice", "member", "alpha")
        assert body["token"].startswith("nbt_")
        expires = datetime.fromisoformat(body["expires_at"])
        assert timedelta(hours=11) < expires - datetime.now(UTC) <= timedelta(hours=12)
        me = (await lab.client(body["token"]).get("/v1/auth/whoami")).json()
        assert me == {
            "user": "alice",
            "role": "member",
            "project": "alpha",
            "token_id": body["token_id"],
            "expires_at": body["expires_at"],
        }
        other = await log_in(lab, "alice", PASSWORD, project="beta")
        assert other.json()["project"] == "beta"


async def test_unknown_user_and_wrong_password_get_the_same_answer(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        await make_user(await lab.admin(), "alice", projects=["alpha"])
        wrong_password = await log_in(lab, "alice", "incorrect horse")
        unknown_user = await log_in(lab, "mallory", PASSWORD)
        odd_name = await log_in(lab, "../etc", PASSWORD)
        assert wrong_password.status_code == unknown_user.status_code == 401
        assert wrong_password.json() == unknown_user.json() == odd_name.json()
        assert wrong_password.json()["code"] == "unauthorized"
        assert "alice" not in wrong_password.text


async def test_login_ttl_is_bounded_and_honoured(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        await make_user(await lab.admin(), "alice", projects=["alpha"])
        for bad in (0, -1, 24 * 366):
            refused = await log_in(lab, "alice", PASSWORD, ttl_hours=bad)
            assert refused.status_code == 422, bad
            assert refused.json()["code"] == "invalid_input"
        short = await log_in(lab, "alice", PASSWORD, ttl_hours=2)
        expires = datetime.fromisoformat(short.json()["expires_at"])
        assert timedelta(minutes=119) < expires - datetime.now(UTC) <= timedelta(hours=2)


async def test_an_expired_token_is_refused_and_forgotten(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        token, record = await mint_token(lab.store, ADMIN, "default", ttl=timedelta(0))
        refused = await lab.client(token).get("/v1/auth/whoami")
        assert refused.status_code == 401
        assert refused.json()["code"] == "unauthorized"
        assert await lab.store.get(resource_key(Kind.TOKEN, record.id)) is None
        live, live_record = await mint_token(lab.store, ADMIN, "default")
        assert (await lab.client(live).get("/v1/auth/whoami")).status_code == 200
        past = datetime.now(UTC) - timedelta(minutes=1)
        expired = live_record.model_copy(update={"expires_at": past})
        await lab.store.put(resource_key(Kind.TOKEN, live_record.id), expired.to_json())
        assert (await lab.client(live).get("/v1/auth/whoami")).status_code == 401


async def test_a_revoked_token_is_refused_on_the_next_call(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        await make_user(await lab.admin(), "alice", projects=["alpha"])
        session = await token_of(lab, "alice")
        minted = await session.post(
            "/v1/auth/tokens", json={"description": "backup script", "ttl_hours": 48}
        )
        assert minted.status_code == 201, minted.text
        script = lab.client(minted.json()["token"])
        assert (await script.get("/v1/auth/whoami")).json()["project"] == "alpha"

        listed = (await session.get("/v1/auth/tokens")).json()["items"]
        assert {item["description"] for item in listed} == {"login", "backup script"}
        assert [item["current"] for item in listed if item["description"] == "login"] == [True]
        assert all(set(item) == set(listed[0]) for item in listed)
        assert not any("secret" in key or "hash" in key for key in listed[0])
        assert minted.json()["token"] not in (await session.get("/v1/auth/tokens")).text

        revoked = await session.delete(f"/v1/auth/tokens/{minted.json()['id']}")
        assert revoked.status_code == 204
        after = await script.get("/v1/auth/whoami")
        assert after.status_code == 401
        assert after.json()["code"] == "unauthorized"
        assert (await session.get("/v1/auth/whoami")).status_code == 200

        assert (await session.delete("/v1/auth/token")).status_code == 204
        assert (await session.get("/v1/auth/whoami")).status_code == 401
        left = (await lab.store.range(kind_prefix(Kind.TOKEN))).kvs
        assert [kv.value["user"] for kv in left] == [ADMIN]


async def test_only_admins_revoke_or_list_other_users_tokens(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        await make_user(admin, "alice", projects=["alpha"])
        await make_user(admin, "bob", projects=["alpha"])
        alice = await token_of(lab, "alice")
        bob_login = await log_in(lab, "bob", PASSWORD)
        bob = lab.client(bob_login.json()["token"])
        bob_token = bob_login.json()["token_id"]
        assert (await alice.delete(f"/v1/auth/tokens/{bob_token}")).status_code == 404
        assert (await alice.delete("/v1/auth/tokens/not-a-token-id")).status_code == 404
        assert (await alice.get("/v1/auth/tokens", params={"user": "bob"})).status_code == 403
        mine = (await alice.get("/v1/auth/tokens")).json()["items"]
        assert bob_token not in [item["id"] for item in mine]
        assert (await bob.get("/v1/auth/whoami")).status_code == 200
        seen = (await admin.get("/v1/auth/tokens", params={"user": "bob"})).json()["items"]
        assert [item["id"] for item in seen] == [bob_token]
        assert (await admin.delete(f"/v1/auth/tokens/{bob_token}")).status_code == 204
        assert (await bob.get("/v1/auth/whoami")).status_code == 401


async def test_totp_is_enabled_confirmed_required_and_disabled(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        await make_user(await lab.admin(), "alice", projects=["alpha"])
        session = await token_of(lab, "alice")
        setup = await session.post("/v1/auth/totp")
        assert setup.status_code == 201, setup.text
        secret = setup.json()["secret"]
        assert setup.json()["uri"] == (f"otpauth://totp/nubes:alice?secret={secret}&issuer=nubes")
        # Not active until confirmed: a lost setup does not lock the user out.
        assert (await log_in(lab, "alice", PASSWORD)).status_code == 201
        wrong = "000000" if totp_code(secret) != "000000" else "111111"
        rejected = await session.post("/v1/auth/totp/confirm", json={"code": wrong})
        assert rejected.status_code == 403
        assert rejected.json()["code"] == "totp_rejected"
        confirmed = await session.post("/v1/auth/totp/confirm", json={"code": totp_code(secret)})
        assert confirmed.status_code == 200, confirmed.text
        assert confirmed.json()["totp"] is True
        assert (await session.post("/v1/auth/totp")).status_code == 409

        missing = await log_in(lab, "alice", PASSWORD)
        assert missing.status_code == 401
        assert missing.json()["code"] == "totp_required"
        # The second factor is asked for only once the password was right.
        bad_password = await log_in(lab, "alice", "incorrect horse")
        assert bad_password.json()["code"] == "unauthorized"
        bad_code = await log_in(lab, "alice", PASSWORD, totp=wrong)
        assert bad_code.status_code == 401
        assert bad_code.json()["code"] == "totp_invalid"
        earlier = totp_code(secret, time.time() - TOTP_STEP)
        assert (await log_in(lab, "alice", PASSWORD, totp=earlier)).status_code == 201
        assert (await log_in(lab, "alice", PASSWORD, totp=totp_code(secret))).status_code == 201

        refused = await session.request("DELETE", "/v1/auth/totp", json={"code": wrong})
        assert refused.status_code == 403
        turned_off = await session.request(
            "DELETE", "/v1/auth/totp", json={"code": totp_code(secret)}
        )
        assert turned_off.status_code == 200
        assert turned_off.json()["totp"] is False
        assert (await log_in(lab, "alice", PASSWORD)).status_code == 201


async def test_an_admin_resets_a_users_totp(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        await make_user(admin, "alice", projects=["alpha"])
        session = await token_of(lab, "alice")
        secret = (await session.post("/v1/auth/totp")).json()["secret"]
        await session.post("/v1/auth/totp/confirm", json={"code": totp_code(secret)})
        assert (await log_in(lab, "alice", PASSWORD)).status_code == 401
        assert (await session.delete("/v1/users/alice/totp")).status_code == 403
        reset = await admin.delete("/v1/users/alice/totp")
        assert reset.status_code == 200
        assert reset.json()["totp"] is False
        assert (await log_in(lab, "alice", PASSWORD)).status_code == 201


async def test_members_cannot_make_users_or_projects(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        member = await lab.member("alpha", "alice")
        user = {"name": "eve", "password": "long enough", "projects": ["alpha"]}
        for method, path, body in [
            ("POST", "/v1/users", user),
            ("GET", "/v1/users", None),
            ("PATCH", "/v1/users/alice", {"role": "admin"}),
            ("DELETE", "/v1/users/alice", None),
            ("POST", "/v1/projects", {"name": "gamma"}),
            ("PATCH", "/v1/projects/alpha", {"description": "mine"}),
            ("DELETE", "/v1/projects/alpha", None),
        ]:
            answer = await member.request(method, path, json=body)
            assert answer.status_code == 403, (method, path, answer.text)
            assert answer.json()["code"] == "forbidden"
        assert (await lab.store.get(resource_key(Kind.USER, "eve"))) is None
        assert (await lab.store.get(resource_key(Kind.PROJECT, "gamma"))) is None
        alice = (await member.get("/v1/users/alice")).json()
        assert (alice["role"], alice["projects"]) == ("member", ["alpha"])


async def test_admins_manage_users_with_checked_input(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        await admin.post("/v1/projects", json={"name": "alpha"})
        short = await admin.post("/v1/users", json={"name": "bob", "password": "short"})
        assert short.status_code == 422
        unknown = await admin.post(
            "/v1/users", json={"name": "bob", "password": "long enough", "projects": ["nope"]}
        )
        assert unknown.status_code == 400
        assert unknown.json()["code"] == "invalid_input"
        assert "nope" in unknown.json()["message"]
        assert await lab.store.get(resource_key(Kind.USER, "bob")) is None
        body = {"name": "bob", "password": "long enough", "projects": ["alpha", "alpha"]}
        made = await admin.post("/v1/users", json=body)
        assert made.status_code == 201
        assert made.json()["projects"] == ["alpha"]
        assert "password_hash" not in made.json()
        assert (await admin.post("/v1/users", json=body)).status_code == 409

        names = [user["name"] for user in (await admin.get("/v1/users")).json()["items"]]
        assert names == ["admin", "bob"]
        members = (await admin.get("/v1/users", params={"project": "alpha"})).json()["items"]
        assert [user["name"] for user in members] == ["bob"]

        changed = await admin.patch(
            "/v1/users/bob", json={"role": "admin", "password": "a new password"}
        )
        assert changed.json()["role"] == "admin"
        assert (await log_in(lab, "bob", "long enough")).status_code == 401
        assert (await log_in(lab, "bob", "a new password")).status_code == 201
        own = await admin.patch(f"/v1/users/{ADMIN}", json={"role": "member"})
        assert own.status_code == 409
        assert (await admin.delete(f"/v1/users/{ADMIN}")).status_code == 409
        assert (await admin.get("/v1/users/nobody")).status_code == 404


async def test_a_member_changes_its_own_password_with_the_old_one(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        await make_user(admin, "alice", projects=["alpha"])
        await make_user(admin, "bob", projects=["alpha"])
        alice = await token_of(lab, "alice")
        path = "/v1/users/alice/password"
        wrong = await alice.post(path, json={"old_password": "nope", "new_password": "battery!"})
        assert wrong.status_code == 403
        assert wrong.json()["code"] == "wrong_password"
        missing = await alice.post(path, json={"new_password": "battery staple"})
        assert missing.status_code == 403
        other = await alice.post(
            "/v1/users/bob/password",
            json={"old_password": "correct horse", "new_password": "battery staple"},
        )
        assert other.status_code == 404
        changed = await alice.post(
            path, json={"old_password": "correct horse", "new_password": "battery staple"}
        )
        assert changed.status_code == 204
        assert (await log_in(lab, "alice", PASSWORD)).status_code == 401
        assert (await log_in(lab, "alice", "battery staple")).status_code == 201
        assert (await log_in(lab, "bob", PASSWORD)).status_code == 201
        by_admin = await admin.post("/v1/users/bob/password", json={"new_password": "set by admin"})
        assert by_admin.status_code == 204
        assert (await log_in(lab, "bob", "set by admin")).status_code == 201


async def test_deleting_a_user_stops_its_tokens_and_forgets_them(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        await make_user(admin, "alice", projects=["alpha"])
        alice = await token_of(lab, "alice")
        await alice.post("/v1/auth/tokens", json={"description": "cron"})
        assert (await alice.get("/v1/auth/whoami")).status_code == 200
        assert (await admin.delete("/v1/users/alice")).status_code == 204
        assert (await alice.get("/v1/auth/whoami")).status_code == 401
        tokens = (await lab.store.range(kind_prefix(Kind.TOKEN))).kvs
        assert all(kv.value["user"] != "alice" for kv in tokens)
        assert (await admin.delete("/v1/users/alice")).status_code == 404
        assert (await log_in(lab, "alice", PASSWORD)).status_code == 401
