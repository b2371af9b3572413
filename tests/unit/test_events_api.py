"""The event log through the API: request events say who asked and how it ended, members
read only their project's events, and the watch streams new ones — in-process, on SQLite,
with the real recorder writing the state events."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from nubes.api.app import create_app
from nubes.api.audit import REFUSED_PER_MINUTE
from nubes.api.auth import mint_token
from nubes.events.recorder import EventRecorder
from nubes.store.keys import EVENTS_BY_TIME_PREFIX, EVENTS_PREFIX
from tests.support.api_lab import ApiLab, add_image


@contextlib.asynccontextmanager
async def recorder(lab: ApiLab) -> AsyncIterator[None]:
    stop = asyncio.Event()
    running = EventRecorder(lab.store)
    task = asyncio.create_task(running.run(stop))
    try:
        await asyncio.wait_for(running.ready.wait(), 10)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def events(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    answer = await client.get("/v1/events", params=params)
    assert answer.status_code == 200, answer.text
    items: list[dict[str, Any]] = answer.json()["items"]
    return items


async def until(client: httpx.AsyncClient, count: int, **params: Any) -> list[dict[str, Any]]:
    for _ in range(100):
        found = await events(client, **params)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {count} events: {found}")


async def test_a_vms_history_holds_who_asked_and_what_followed(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab, recorder(lab):
        member = await lab.member("alpha", user="ann")
        await add_image(lab, "alpha")
        made = await member.post("/v1/vms", json={"name": "web", "flavor": "tiny", "image": "tiny"})
        assert made.status_code == 201, made.text
        vm_id = made.json()["id"]
        stopped = await member.post(f"/v1/vms/{vm_id}/stop")
        assert stopped.status_code in (200, 202), stopped.text
        history = await until(member, 5, resource=vm_id)
        summary = [(e["type"], e["actor"], e["action"] or e["state"]) for e in history]
        assert summary == [
            ("request", "ann", "POST /v1/vms"),
            ("created", None, None),
            ("state", None, "pending"),
            ("request", "ann", "POST /v1/vms/{vm}/stop"),
            ("updated", None, None),
        ]
        assert all(e["project"] == "alpha" and e["kind"] == "vms" for e in history)
        assert "spec.power_state running -> stopped" in history[-1]["message"]
        assert history[0]["outcome"] == "ok"


async def test_a_refused_create_is_an_event_with_the_error_code(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        member = await lab.member("alpha", user="ann")
        refused = await member.post("/v1/vms", json={"name": "w", "flavor": "nope", "image": "x"})
        assert refused.status_code == 404
        (event,) = await events(member)
        assert event["outcome"] == "not_found"
        assert event["resource"] == "-"
        assert event["action"] == "POST /v1/vms"
        assert "no flavor 'nope'" in event["message"]


async def test_members_read_only_their_projects_events(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab, recorder(lab):
        alpha = await lab.member("alpha")
        beta = await lab.member("beta")
        made = await alpha.post("/v1/security-groups", json={"name": "web"})
        assert made.status_code == 201, made.text
        group = made.json()["id"]
        admin = await lab.admin()
        mine = await until(alpha, 2, resource=group)  # the request and the record created
        assert {e["type"] for e in mine} == {"request", "created"}
        assert await events(beta) == []
        assert await events(beta, resource=group) == []
        assert (await beta.get("/v1/events", params={"project": "alpha"})).status_code == 403
        assert {e["id"] for e in mine} <= {e["id"] for e in await events(admin)}
        assert len(await events(admin, project="alpha", resource=group)) == len(mine)
        assert await events(admin, project="beta") == []


async def test_no_event_for_unauthenticated_requests_nor_any_password(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        anonymous = lab.client()
        assert (await anonymous.post("/v1/vms", json={})).status_code == 401
        login = {"user": "admin", "password": "wrong-password-1"}
        assert (await anonymous.post("/v1/auth/login", json=login)).status_code in (401, 403)
        admin = await lab.admin()
        assert await events(admin) == []
        user = {"name": "bob", "password": "Secret-Password-42", "role": "member"}
        made = await admin.post("/v1/users", json={**user, "projects": ["default"]})
        assert made.status_code == 201, made.text
        (event,) = await events(admin)
        assert event["action"] == "POST /v1/users"
        assert "Secret-Password-42" not in json.dumps(event)


async def test_listings_page_and_tail(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        for index in range(5):
            made = await admin.post("/v1/security-groups", json={"name": f"g{index}"})
            assert made.status_code == 201
        seen: list[str] = []
        params: dict[str, Any] = {"limit": 2}
        while True:
            page = (await admin.get("/v1/events", params=params)).json()
            seen += [e["message"] for e in page["items"]]
            if page["next"] is None:
                break
            params["cursor"] = page["next"]
        assert len(seen) == 5
        assert seen == [e["message"] for e in await events(admin)]
        newest = await events(admin, limit=2, tail=True)
        assert [e["message"] for e in newest] == seen[-2:]
        bad = await admin.get("/v1/events", params={"cursor": "nope"})
        assert bad.status_code == 422


async def test_the_watch_streams_new_events_of_the_callers_project(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alpha = await lab.member("alpha")
        beta = await lab.member("beta")
        watching = asyncio.create_task(alpha.get("/v1/events/watch", params={"timeout": 2.0}))
        # Changes until the stream ends: some come after it started, whenever that was.
        index = 0
        while not watching.done():
            for client, name in ((beta, f"theirs{index}"), (alpha, f"mine{index}")):
                made = await client.post("/v1/security-groups", json={"name": name})
                assert made.status_code == 201
            index += 1
            await asyncio.sleep(0.2)
        answer = await watching
        assert answer.headers["content-type"].startswith("text/event-stream")
        data = [
            json.loads(line.removeprefix("data: "))
            for line in answer.text.splitlines()
            if line.startswith("data: ")
        ]
        assert data, "no event streamed"
        assert {e["action"] for e in data} == {"POST /v1/security-groups"}
        assert {e["project"] for e in data} == {"alpha"}


async def test_members_see_no_user_management_nor_other_users_logins(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        ann = await lab.member("alpha", user="ann")
        bob = await lab.member("alpha", user="bob")
        admin = await lab.admin("alpha")  # an admin working in alpha, as members do
        user = {"name": "cid", "password": "Secret-Password-42", "role": "member"}
        made = await admin.post("/v1/users", json={**user, "projects": ["alpha"]})
        assert made.status_code == 201, made.text
        assert (await admin.post("/v1/flavors", json={})).status_code == 422
        token = await ann.post("/v1/auth/tokens", json={"description": "ci"})
        assert token.status_code == 201, token.text
        assert (await ann.post("/v1/auth/totp")).status_code < 500
        everything = await until(admin, 3)
        assert {e["kind"] for e in everything} >= {"users", "auth"}
        assert all(e["project"] is None for e in everything)
        assert await events(bob) == []
        assert await events(bob, tail=True) == []
        assert await events(ann, resource="ann") == []


async def test_a_delete_by_name_is_in_the_resources_history(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        member = await lab.member("alpha")
        await add_image(lab, "alpha")
        image_id = (await member.get("/v1/images/tiny")).json()["id"]
        deleted = await member.delete("/v1/images/tiny")  # 204: the answer names nothing
        assert deleted.status_code == 204, deleted.text
        (event,) = await until(member, 1, resource=image_id)
        assert event["action"] == "DELETE /v1/images/{image}"
        assert image_id in event["message"]
        assert await events(member, resource="tiny") == []


async def test_refused_requests_are_recorded_up_to_a_cap_a_minute(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        member = await lab.member("alpha")
        for _ in range(REFUSED_PER_MINUTE + 10):
            refused = await member.delete("/v1/security-groups/nothing-here")
            assert refused.status_code == 404
        recorded = await until(member, REFUSED_PER_MINUTE, limit=1000)
        await asyncio.sleep(0.2)  # none more comes
        recorded = await events(member, limit=1000)
        assert len(recorded) == REFUSED_PER_MINUTE
        assert "last of" in recorded[-1]["message"]
        assert "last of" not in recorded[0]["message"]


async def test_the_answer_goes_before_its_event_is_written(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        token, _ = await mint_token(lab.store, "admin", "default")
        app = create_app(lab.ctx)
        body = json.dumps({"name": "web"}).encode()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/security-groups",
            "raw_path": b"/v1/security-groups",
            "root_path": "",
            "query_string": b"",
            "headers": [
                (b"host", b"test"),
                (b"authorization", f"Bearer {token}".encode()),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
            "client": ("127.0.0.1", 1),
            "server": ("test", 80),
        }
        logged_at_last_byte: list[int] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                logged_at_last_byte.append(len((await lab.store.range(EVENTS_PREFIX)).kvs))

        await app(scope, receive, send)
        assert logged_at_last_byte == [0]
        assert len((await lab.store.range(EVENTS_BY_TIME_PREFIX)).kvs) == 1


async def test_a_watch_after_a_cursor_misses_nothing_and_repeats_nothing(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        for index in range(3):
            made = await admin.post("/v1/security-groups", json={"name": f"g{index}"})
            assert made.status_code == 201
        await until(admin, 3)
        cursor = (await admin.get("/v1/events", params={"limit": 2})).json()["next"]
        # Written after the listing, before the watch: the watch sends them first.
        for index in range(3, 5):
            made = await admin.post("/v1/security-groups", json={"name": f"g{index}"})
            assert made.status_code == 201
        await until(admin, 5)
        answer = await admin.get("/v1/events/watch", params={"timeout": 1.0, "after": cursor})
        data = [
            json.loads(line.removeprefix("data: "))
            for line in answer.text.splitlines()
            if line.startswith("data: ")
        ]
        assert [e["message"] for e in data] == [e["message"] for e in (await events(admin))[2:]]
        bad = await admin.get("/v1/events/watch", params={"after": "nope", "timeout": 0.1})
        assert bad.status_code == 422
