"""Volumes through the API: made within quota, bound to the only alive host, grown never shrunk,
deleted only when free; snapshots and reverts as spec changes; other projects see nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from nubes.ids import IdKind, new_id
from nubes.model.common import now
from nubes.model.project import ProjectRecord, Quota, Usage
from nubes.model.vm import Flavor, PowerState, VmRecord, VmSpec
from nubes.model.volume import SnapshotInfo, VolumeState, VolumeStatus
from nubes.store.keys import Kind, host_alive_key, resource_key, status_key, usage_key
from tests.support.api_lab import ApiLab
from tests.unit.test_api_images import make_qcow2


async def usage(lab: ApiLab, project: str) -> Usage:
    kv = await lab.store.get(usage_key(project))
    return Usage() if kv is None else Usage.from_json(kv.value)


async def volume_keys(lab: ApiLab) -> list[str]:
    listing = await lab.store.range("/nubes/")
    return [kv.key for kv in listing.kvs if "volumes" in kv.key]


async def create(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await client.post("/v1/volumes", json=body)


async def put_vm(lab: ApiLab, project: str, volumes: list[str], power: PowerState) -> str:
    vm_id = new_id(IdKind.VM)
    spec = VmSpec(
        name=f"vm-{vm_id[-4:]}",
        flavor=Flavor(name="f", vcpus=1, memory_mb=64, disk_gb=0),
        volumes=volumes,
        power_state=power,
    )
    record = VmRecord(id=vm_id, project=project, spec=spec, created_at=now())
    await lab.store.put(resource_key(Kind.VM, vm_id), record.to_json())
    return vm_id


async def report(lab: ApiLab, volume_id: str, snapshots: list[str], counter: int = 0) -> None:
    """What the volume's agent would write once it carried out the spec."""
    status = VolumeStatus(
        state=VolumeState.AVAILABLE,
        host="node1",
        size_gb=1,
        snapshots=[SnapshotInfo(name=name, created_at=now()) for name in snapshots],
        revert_counter=counter,
        updated_at=now(),
    )
    await lab.store.put(status_key(Kind.VOLUME, volume_id), status.to_json())


async def test_a_blank_volume_is_made_unbound_and_counted_against_the_quota(
    tmp_path: Path,
) -> None:
    async with ApiLab.open(tmp_path) as lab:
        member = await lab.member("alpha")
        made = await create(member, name="data", size_gb=3)
        assert made.status_code == 201, made.text
        volume = made.json()
        assert volume["id"].startswith("vol-")
        assert volume["project"] == "alpha"
        assert volume["spec"] == {
            "name": "data",
            "size_gb": 3,
            "image": None,
            "host": None,
            "snapshots": [],
            "revert": None,
            "pool": "local",
        }
        assert volume["status"] is None
        assert await usage(lab, "alpha") == Usage(volumes=1, volume_gb=3)
        assert (await member.get("/v1/volumes/data")).json()["id"] == volume["id"]
        listed = (await member.get("/v1/volumes", params={"name": "data"})).json()
        assert [item["id"] for item in listed["items"]] == [volume["id"]]
        again = await create(member, name="data", size_gb=1)
        assert again.status_code == 409


async def test_with_exactly_one_alive_host_a_volume_is_bound_to_it(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        member = await lab.member("alpha")
        await lab.store.put(resource_key(Kind.HOST, "node1"), {"name": "node1"})
        await lab.store.put(host_alive_key("node1"), {"at": "now"})
        assert (await create(member, name="one", size_gb=1)).json()["spec"]["host"] == "node1"
        await lab.store.put(resource_key(Kind.HOST, "node2"), {"name": "node2"})
        await lab.store.put(host_alive_key("node2"), {"at": "now"})
        assert (await create(member, name="two", size_gb=1)).json()["spec"]["host"] is None


async def test_bad_volume_requests_are_refused_and_leave_nothing(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        member = await lab.member("alpha")
        cases: list[tuple[dict[str, Any], int, str]] = [
            ({"name": "blank"}, 400, "invalid_input"),
            ({"name": "x", "size_gb": 0}, 422, "invalid_input"),
            ({"name": "x", "size_gb": 1, "image": "no-such"}, 404, "not_found"),
            ({"name": "bad/name", "size_gb": 1}, 422, "invalid_input"),
            ({"name": "x", "size_gb": 1, "host": "node1"}, 422, "invalid_input"),
        ]
        for body, status, code in cases:
            refused = await create(member, **body)
            assert refused.status_code == status, (body, refused.text)
            assert refused.json()["code"] == code
        await lab.store.put(
            resource_key(Kind.PROJECT, "alpha"),
            ProjectRecord(
                name="alpha", quota=Quota(volumes=1, volume_gb=5), created_at=now()
            ).to_json(),
        )
        over = await create(member, name="huge", size_gb=6)
        assert over.status_code == 409
        assert over.json()["code"] == "quota_exceeded"
        assert await volume_keys(lab) == []
        assert (await create(member, name="first", size_gb=2)).status_code == 201
        second = await create(member, name="second", size_gb=1)
        assert second.json()["code"] == "quota_exceeded"
        assert len(await volume_keys(lab)) == 2  # the record and its name guard


async def test_volumes_grow_and_never_shrink_within_the_quota(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        member = await lab.member("alpha")
        volume = (await create(member, name="data", size_gb=2)).json()
        grown = await member.patch(f"/v1/volumes/{volume['id']}", json={"size_gb": 5})
        assert grown.status_code == 200, grown.text
        assert grown.json()["spec"]["size_gb"] == 5
        assert await usage(lab, "alpha") == Usage(volumes=1, volume_gb=5)
        shrunk = await member.patch("/v1/volumes/data", json={"size_gb": 4})
        assert shrunk.status_code == 400
        assert "cannot shrink" in shrunk.json()["message"]
        renamed = await member.patch("/v1/volumes/data", json={"name": "logs"})
        assert renamed.json()["spec"]["name"] == "logs"
        assert (await member.get("/v1/volumes/data")).status_code == 404
        assert (await create(member, name="data", size_gb=1)).status_code == 201
        await lab.store.put(
            resource_key(Kind.PROJECT, "alpha"),
            ProjectRecord(name="alpha", quota=Quota(volume_gb=8), created_at=now()).to_json(),
        )
        over = await member.patch("/v1/volumes/logs", json={"size_gb": 9})
        assert over.json()["code"] == "quota_exceeded"
        assert (await member.get("/v1/volumes/logs")).json()["spec"]["size_gb"] == 5


async def test_delete_frees_the_quota_and_is_refused_while_a_vm_lists_the_volume(
    tmp_path: Path,
) -> None:
    async with ApiLab.open(tmp_path) as lab:
        member = await lab.member("alpha")
        unbound = (await create(member, name="loose", size_gb=2)).json()
        gone = await member.delete(f"/v1/volumes/{unbound['id']}")
        assert gone.status_code == 202
        assert gone.json()["deleting"] is True
        assert await lab.store.get(resource_key(Kind.VOLUME, unbound["id"])) is None
        assert await usage(lab, "alpha") == Usage()

        await lab.store.put(resource_key(Kind.HOST, "node1"), {"name": "node1"})
        await lab.store.put(host_alive_key("node1"), {"at": "now"})
        bound = (await create(member, name="kept", size_gb=2)).json()
        vm_id = await put_vm(lab, "alpha", [bound["id"]], PowerState.STOPPED)
        refused = await member.delete("/v1/volumes/kept")
        assert refused.status_code == 409
        assert vm_id in refused.json()["message"]
        await lab.store.delete(resource_key(Kind.VM, vm_id))
        marked = await member.delete("/v1/volumes/kept")
        assert marked.status_code == 202
        kv = await lab.store.get(resource_key(Kind.VOLUME, bound["id"]))
        assert kv is not None
        assert kv.value["deleting"] is True  # the agent removes it
        assert await usage(lab, "alpha") == Usage()
        assert (await member.delete(f"/v1/volumes/{bound['id']}")).status_code == 202
        assert await usage(lab, "alpha") == Usage()  # freed once only
        changed = await member.patch(f"/v1/volumes/{bound['id']}", json={"size_gb": 3})
        assert changed.status_code == 409


async def test_snapshots_are_spec_changes_shown_with_what_the_agent_made(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        member = await lab.member("alpha")
        volume_id = (await create(member, name="data", size_gb=1)).json()["id"]
        base = f"/v1/volumes/{volume_id}"
        taken = await member.post(f"{base}/snapshots", json={"name": "before"})
        assert taken.status_code == 202, taken.text
        assert taken.json() == {
            "name": "before",
            "state": "creating",
            "created_at": None,
            "vm_state": False,
        }
        assert (await member.post(f"{base}/snapshots", json={"name": "before"})).status_code == 409
        assert (await member.post(f"{base}/snapshots", json={"name": "a b"})).status_code == 422
        early = await member.post(f"{base}/revert", json={"snapshot": "before"})
        assert early.status_code == 409  # not made yet

        await report(lab, volume_id, ["before"])
        listed = (await member.get(f"{base}/snapshots")).json()["items"]
        assert [(item["name"], item["state"]) for item in listed] == [("before", "ready")]
        reverted = await member.post(f"{base}/revert", json={"snapshot": "before"})
        assert reverted.status_code == 202
        assert reverted.json()["spec"]["revert"] == {"snapshot": "before", "counter": 1}
        again = await member.post(f"{base}/revert", json={"snapshot": "before"})
        assert again.json()["spec"]["revert"]["counter"] == 2
        busy = await member.delete(f"{base}/snapshots/before")
        assert busy.status_code == 409  # the revert to it is not carried out yet

        await report(lab, volume_id, ["before"], counter=2)
        dropped = await member.delete(f"{base}/snapshots/before")
        assert dropped.status_code == 202
        assert dropped.json()["state"] == "deleting"
        listed = (await member.get(f"{base}/snapshots")).json()["items"]
        assert [(item["name"], item["state"]) for item in listed] == [("before", "deleting")]
        assert (await member.delete(f"{base}/snapshots/before")).status_code == 404
        missing = await member.post(f"{base}/revert", json={"snapshot": "nope"})
        assert missing.status_code == 404


async def test_revert_is_refused_while_a_running_vm_uses_the_volume(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        member = await lab.member("alpha")
        volume_id = (await create(member, name="data", size_gb=1)).json()["id"]
        await member.post(f"/v1/volumes/{volume_id}/snapshots", json={"name": "s1"})
        await report(lab, volume_id, ["s1"])
        vm_id = await put_vm(lab, "alpha", [volume_id], PowerState.RUNNING)
        refused = await member.post(f"/v1/volumes/{volume_id}/revert", json={"snapshot": "s1"})
        assert refused.status_code == 409
        assert vm_id in refused.json()["message"]
        await lab.store.delete(resource_key(Kind.VM, vm_id))
        await put_vm(lab, "alpha", [volume_id], PowerState.STOPPED)
        allowed = await member.post(f"/v1/volumes/{volume_id}/revert", json={"snapshot": "s1"})
        assert allowed.status_code == 202


async def test_another_project_cannot_see_or_touch_a_volume(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alpha = await lab.member("alpha")
        beta = await lab.member("beta")
        volume_id = (await create(alpha, name="data", size_gb=1)).json()["id"]
        await alpha.post(f"/v1/volumes/{volume_id}/snapshots", json={"name": "s1"})
        for ref in (volume_id, "data"):
            base = f"/v1/volumes/{ref}"
            responses = [
                await beta.get(base),
                await beta.patch(base, json={"size_gb": 2}),
                await beta.delete(base),
                await beta.get(f"{base}/snapshots"),
                await beta.post(f"{base}/snapshots", json={"name": "s2"}),
                await beta.delete(f"{base}/snapshots/s1"),
                await beta.post(f"{base}/revert", json={"snapshot": "s1"}),
            ]
            assert [response.status_code for response in responses] == [404] * 7
        assert (await beta.get("/v1/volumes")).json()["items"] == []
        # A private image of alpha cannot seed a volume in beta either.
        assert (await create(beta, name="x", image="data")).status_code == 404
        record = (await alpha.get(f"/v1/volumes/{volume_id}")).json()
        assert record["spec"]["size_gb"] == 1
        assert record["spec"]["snapshots"] == ["s1"]
        assert record["deleting"] is False


async def test_a_volume_from_an_image_is_at_least_the_image_size(tmp_path: Path) -> None:
    disk = make_qcow2(tmp_path / "disk.qcow2", "1536M")
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        member = await lab.member("alpha")
        uploaded = await admin.post(
            "/v1/images", params={"name": "base", "public": "true"}, content=disk.read_bytes()
        )
        assert uploaded.status_code == 201, uploaded.text
        made = await create(member, name="root", image="base")
        assert made.status_code == 201, made.text
        assert made.json()["spec"]["image"] == uploaded.json()["id"]
        assert made.json()["spec"]["size_gb"] == 2  # 1.5 GiB rounded up
        small = await create(member, name="small", image="base", size_gb=1)
        assert small.status_code == 400
        assert "at least 2 GiB" in small.json()["message"]
