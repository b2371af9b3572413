"""Asking for a move: `POST /v1/vms/{vm}/migrate` books the target and writes the request
and its progress record together, or refuses with a clear code and writes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from nubes.model.host import HostRecord
from nubes.model.migration import MigrationStatus
from nubes.model.vm import VmRecord, VmState
from nubes.scheduler.binding import read_allocations
from nubes.store.keys import Kind, host_allocations_key, migration_key, resource_key
from tests.support.api_lab import ApiLab
from tests.unit.test_api_hosts import add_host as add_plain_host
from tests.unit.test_api_vms import bind, create, report, setup


async def add_host(lab: ApiLab, name: str, *, alive: bool, vms: int = 0) -> None:
    """A host that mounts the shared pool "shared"."""
    await add_plain_host(lab, name, alive=alive, vms=vms)
    kv = await lab.store.get(resource_key(Kind.HOST, name))
    assert kv is not None
    record = HostRecord.from_json(kv.value).model_copy(update={"storage_pools": ["shared"]})
    await lab.store.put(kv.key, record.to_json())


async def running_vm(lab: ApiLab, host: str = "node1") -> tuple[httpx.AsyncClient, str]:
    member = await setup(lab, "default")
    vm = await create(member, storage_pool="shared")
    await bind(lab, vm["id"], host)
    await report(lab, vm["id"], VmState.RUNNING, host=host)
    return await lab.admin(), vm["id"]


async def record(lab: ApiLab, vm_id: str) -> VmRecord:
    kv = await lab.store.get(resource_key(Kind.VM, vm_id))
    assert kv is not None
    return VmRecord.from_json(kv.value)


async def refused(client: httpx.AsyncClient, vm_id: str, **body: Any) -> tuple[int, str]:
    answer = await client.post(f"/v1/vms/{vm_id}/migrate", json=body)
    return answer.status_code, answer.json().get("code", "")


async def test_a_move_books_the_target_and_starts_the_progress_record(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        for name in ("node1", "node2", "node3"):
            await add_host(lab, name, alive=name != "node3", vms=2 if name == "node2" else 0)
        admin, vm_id = await running_vm(lab)
        moved = await admin.post(f"/v1/vms/{vm_id}/migrate", json={})
        assert moved.status_code == 202, moved.text
        request = (await record(lab, vm_id)).spec.migration
        # node3 is down and node1 is its own host: node2 is the one host left.
        assert request is not None
        assert (request.source, request.target, request.live, request.counter) == (
            "node1",
            "node2",
            True,
            1,
        )
        assert vm_id in read_allocations(await lab.store.get(host_allocations_key("node2"))).vms
        kv = await lab.store.get(migration_key(vm_id))
        assert kv is not None
        progress = MigrationStatus.from_json(kv.value)
        assert (progress.state, progress.target, progress.counter) == ("preparing", "node2", 1)
        shown = await admin.get(f"/v1/vms/{vm_id}/migration")
        assert shown.json()["state"] == "preparing"
        # One move at a time.
        assert await refused(admin, vm_id, host="node2") == (409, "migration_in_progress")


async def test_bad_moves_are_refused_and_write_nothing(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        await add_host(lab, "node1", alive=True)
        await add_host(lab, "node2", alive=False)
        admin, vm_id = await running_vm(lab)
        before = await lab.store.get(resource_key(Kind.VM, vm_id))
        assert await refused(admin, vm_id, host="node1") == (400, "invalid_input")
        assert await refused(admin, vm_id, host="nowhere") == (404, "not_found")
        assert await refused(admin, vm_id, host="node2") == (409, "no_target_host")
        assert await refused(admin, vm_id) == (409, "no_target_host")
        assert await refused(admin, vm_id, host="Bad_Name") == (422, "invalid_input")
        await add_plain_host(lab, "node3", alive=True)  # without the VM's pool
        answer = await admin.post(f"/v1/vms/{vm_id}/migrate", json={})
        assert answer.json()["code"] == "no_target_host"
        assert "1 host: does not mount storage pool shared" in answer.json()["message"]
        # A cold move needs a stopped VM.
        assert (await refused(admin, vm_id, live=False))[0] == 409
        member = await lab.member("default")
        assert (await refused(member, vm_id, host="node2"))[1] == "forbidden"
        after = await lab.store.get(resource_key(Kind.VM, vm_id))
        assert after is not None
        assert before is not None
        assert after.mod_revision == before.mod_revision
        assert await lab.store.get(migration_key(vm_id)) is None
        assert await lab.store.get(host_allocations_key("node2")) is None


async def test_a_vm_on_local_disk_moves_cold_only(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        await add_host(lab, "node1", alive=True)
        await add_host(lab, "node2", alive=True)
        member = await setup(lab, "default")
        vm = await create(member)
        await bind(lab, vm["id"], "node1")
        await report(lab, vm["id"], VmState.RUNNING, host="node1")
        admin = await lab.admin()
        status, code = await refused(admin, vm["id"], host="node2")
        assert (status, code) == (400, "invalid_input")


async def test_a_stopped_vm_cannot_move_live(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        await add_host(lab, "node1", alive=True)
        await add_host(lab, "node2", alive=True)
        admin, vm_id = await running_vm(lab)
        await report(lab, vm_id, VmState.STOPPED, host="node1")
        status, code = await refused(admin, vm_id, host="node2")
        assert status == 409
        assert code


async def test_disks_and_size_do_not_change_while_the_vm_moves(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        for name in ("node1", "node2"):
            await add_host(lab, name, alive=True)
        admin, vm_id = await running_vm(lab)
        assert (await admin.post(f"/v1/vms/{vm_id}/migrate", json={})).status_code == 202
        before = await record(lab, vm_id)
        volume = await admin.post("/v1/volumes", json={"name": "data", "size_gb": 1})
        assert volume.status_code == 201, volume.text
        for answer in [
            await admin.post(f"/v1/vms/{vm_id}/volumes", json={"volume": "data"}),
            await admin.delete(f"/v1/vms/{vm_id}/volumes/data"),
            await admin.post(f"/v1/vms/{vm_id}/resize", json={"flavor": "medium"}),
        ]:
            assert answer.status_code == 409, answer.text
            assert answer.json()["code"] == "migration_in_progress"
            assert "nubes vm migrate --wait" in answer.json()["hint"]
        assert await record(lab, vm_id) == before
