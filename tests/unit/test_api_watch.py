"""The watch endpoint: server-sent events of the caller's resources only, resumable from a
revision, with keep-alives, a clean end on disconnect, and an error event when compacted."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from nubes.api.app import create_app
from nubes.api.routes.watch import KEEPALIVE_SETTING
from nubes.model.common import now
from nubes.model.host import HostCapacity, HostRecord
from nubes.model.vm import VmState, VmStatus
from nubes.store.keys import Kind, resource_key, status_key
from tests.support.api_lab import ApiLab, add_image


async def member_with_image(lab: ApiLab, project: str) -> httpx.AsyncClient:
    client = await lab.member(project)
    await add_image(lab, project)
    return client


async def create_vm(client: httpx.AsyncClient, name: str) -> str:
    made = await client.post("/v1/vms", json={"name": name, "flavor": "tiny", "image": "tiny"})
    assert made.status_code == 201, made.text
    vm_id: str = made.json()["id"]
    return vm_id


async def report(lab: ApiLab, vm_id: str, state: VmState) -> None:
    status = VmStatus(state=state, updated_at=now())
    await lab.store.put(status_key(Kind.VM, vm_id), status.to_json())


def parse(text: str) -> list[dict[str, Any]]:
    """The events of an SSE body: each a dict of its fields (data parsed as JSON)."""
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            if line.startswith(":") or ":" not in line:
                continue
            name, _, value = line.partition(":")
            fields[name] = json.loads(value) if name == "data" else value.strip()
        if fields:
            events.append(fields)
    return events


async def test_a_resumed_watch_replays_the_callers_changes_only(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alpha = await member_with_image(lab, "alpha")
        beta = await member_with_image(lab, "beta")
        since = await lab.store.current_revision()
        mine = await create_vm(alpha, "web")
        theirs = await create_vm(beta, "web")
        await report(lab, mine, VmState.RUNNING)
        await report(lab, theirs, VmState.RUNNING)

        answer = await alpha.get("/v1/watch", params={"since": since, "timeout": 0.3})
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = parse(answer.text)
        seen = [(e["event"], e["data"]["kind"], e["data"]["id"], e["data"]["part"]) for e in events]
        assert seen == [("put", "vms", mine, "record"), ("put", "vms", mine, "status")]
        assert events[0]["data"]["record"]["spec"]["name"] == "web"
        assert events[1]["data"]["status"]["state"] == "running"
        assert since < int(events[0]["id"]) < int(events[1]["id"])

        # Resumed after the first event: the status again, then the deletes made meanwhile
        # (a delete carries no record; the watch knows whose it was).
        resumed = asyncio.create_task(
            alpha.get(
                "/v1/watch", params={"timeout": 1.0}, headers={"Last-Event-ID": events[0]["id"]}
            )
        )
        await asyncio.sleep(0.3)
        assert (await alpha.delete(f"/v1/vms/{mine}")).status_code == 202
        assert (await beta.delete(f"/v1/vms/{theirs}")).status_code == 202
        replayed = parse((await resumed).text)
        assert [(e["event"], e["data"]["id"], e["data"]["part"]) for e in replayed] == [
            ("put", mine, "status"),
            ("delete", mine, "record"),
            ("delete", mine, "status"),
        ]
        only_ports = await alpha.get(
            "/v1/watch", params={"since": since, "timeout": 0.3, "kinds": "ports"}
        )
        assert parse(only_ports.text) == []


async def test_bad_watch_requests_are_refused(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        member = await lab.member("alpha")
        hosts = await member.get("/v1/watch", params={"kinds": "hosts"})
        assert hosts.status_code == 403
        unknown = await member.get("/v1/watch", params={"kinds": "vms,tokens"})
        assert unknown.status_code == 400
        assert "tokens" in unknown.json()["message"]
        future = await member.get("/v1/watch", params={"since": 10**9})
        assert future.status_code == 400
        assert (await member.get("/v1/watch", params={"since": -1})).status_code == 422
        bad_header = await member.get("/v1/watch", headers={"Last-Event-ID": "x"})
        assert bad_header.status_code == 400
        # "²" passes str.isdigit() but not int(): it answered 500 before.
        superscript = await member.get("/v1/watch", headers={"Last-Event-ID": b"\xb2"})
        assert superscript.status_code == 400
        assert (await lab.client().get("/v1/watch")).status_code == 401


async def test_a_compacted_revision_ends_the_stream_with_an_error_event(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alpha = await member_with_image(lab, "alpha")
        await create_vm(alpha, "web")
        await lab.store.compact(await lab.store.current_revision())
        answer = await alpha.get("/v1/watch", params={"since": 1, "timeout": 5})
        [error] = parse(answer.text)
        assert error["event"] == "error"
        assert error["data"]["code"] == "store_compacted"
        assert error["data"]["hint"]


async def test_admins_also_see_hosts_come_and_go(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        since = await lab.store.current_revision()
        record = HostRecord(
            name="node1",
            capacity=HostCapacity(vcpus=2, memory_mb=1024, disk_gb=10),
            accel="tcg",
            agent_version="test",
            boot_id="boot",
            started_at=now(),
        )
        await lab.store.put(resource_key(Kind.HOST, "node1"), record.to_json())
        lease = await lab.store.lease_grant(60)
        await lab.store.put(f"{resource_key(Kind.HOST, 'node1')}/alive", {}, lease=lease.id)
        await lab.store.lease_revoke(lease.id)
        answer = await admin.get("/v1/watch", params={"since": since, "timeout": 0.3})
        seen = [(e["event"], e["data"]["part"], e["data"].get("alive")) for e in parse(answer.text)]
        assert seen == [("put", "record", None), ("put", "alive", True), ("delete", "alive", False)]


@asynccontextmanager
async def serving(lab: ApiLab) -> AsyncIterator[str]:
    """The lab's app behind a real uvicorn on 127.0.0.1 (ASGI transport does not stream)."""
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(lab.ctx), host="127.0.0.1", port=0, log_level="warning", lifespan="off"
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def pumps() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "watch pump" and not t.done()]


async def test_a_live_watch_streams_changes_and_keepalives_and_ends_on_disconnect(
    tmp_path: Path,
) -> None:
    async with ApiLab.open(tmp_path) as lab:
        lab.ctx.extras[KEEPALIVE_SETTING] = 0.2
        alpha = await member_with_image(lab, "alpha")
        beta = await member_with_image(lab, "beta")
        token = alpha.headers["authorization"]
        async with serving(lab) as url, httpx.AsyncClient(base_url=url) as http:
            async with http.stream(
                "GET", "/v1/watch", params={"kinds": "vms"}, headers={"authorization": token}
            ) as stream:
                assert stream.status_code == 200
                lines = stream.aiter_lines()
                assert await anext(lines) == ": watching"
                await create_vm(beta, "theirs")
                mine = await create_vm(alpha, "mine")
                await report(lab, mine, VmState.BUILDING)
                received: list[str] = []
                keepalives = 0
                async with asyncio.timeout(10):
                    while sum(line.startswith("data:") for line in received) < 2 or not keepalives:
                        line = await anext(lines)
                        keepalives += line == ": keep-alive"
                        received.append(line)
                events = parse("\n".join(received) + "\n\n")
                datas = [e["data"] for e in events if "data" in e]
                assert [(d["id"], d["part"]) for d in datas] == [
                    (mine, "record"),
                    (mine, "status"),
                ]
                following = pumps()
                assert following  # the server is following the store for this client
            # The client left: the server stops following.
            _, still = await asyncio.wait(following, timeout=10)
            assert not still


async def test_a_watch_from_a_reads_revision_misses_nothing_after_it(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alpha = await member_with_image(lab, "alpha")
        vm = await create_vm(alpha, "web")
        shown = await alpha.get(f"/v1/vms/{vm}")
        revision = shown.headers["x-nubes-revision"]
        listed = await alpha.get("/v1/vms")
        assert int(listed.headers["x-nubes-revision"]) >= int(revision)
        await report(lab, vm, VmState.BUILDING)
        answer = await alpha.get("/v1/watch", params={"since": revision, "timeout": 0.3})
        events = parse(answer.text)
        assert [(e["data"]["id"], e["data"]["part"]) for e in events] == [(vm, "status")]
