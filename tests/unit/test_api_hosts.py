"""The host routes: admins see hosts with heartbeat and allocations and set their labels;
members are refused."""

from __future__ import annotations

from pathlib import Path

from nubes.model.common import now
from nubes.model.host import HostCapacity, HostRecord
from nubes.scheduler.binding import Allocation, HostAllocations
from nubes.store.keys import Kind, host_alive_key, host_allocations_key, resource_key
from tests.support.api_lab import ApiLab


async def add_host(lab: ApiLab, name: str, *, alive: bool, vms: int = 0) -> None:
    record = HostRecord(
        name=name,
        capacity=HostCapacity(vcpus=8, memory_mb=16384, disk_gb=100),
        accel="tcg",
        labels={"zone": "a"},
        agent_version="test",
        boot_id="boot",
        started_at=now(),
    )
    await lab.store.put(resource_key(Kind.HOST, name), record.to_json())
    if alive:
        lease = await lab.store.lease_grant(60)
        await lab.store.put(host_alive_key(name), {"since": "now"}, lease=lease.id)
    if vms:
        allocations = HostAllocations(
            vms={
                f"i-{index:010d}": Allocation(vcpus=2, memory_mb=1024, disk_gb=10)
                for index in range(vms)
            }
        )
        await lab.store.put(host_allocations_key(name), allocations.to_json())


async def test_admins_see_hosts_with_heartbeat_and_allocations(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        await add_host(lab, "node1", alive=True, vms=3)
        await add_host(lab, "node2", alive=False)
        admin = await lab.admin()
        listed = await admin.get("/v1/hosts")
        assert listed.status_code == 200, listed.text
        items = {host["name"]: host for host in listed.json()["items"]}
        assert set(items) == {"node1", "node2"}
        assert items["node1"]["alive"] is True
        assert items["node1"]["vms"] == 3
        assert items["node1"]["allocated"] == {"vcpus": 6, "memory_mb": 3072, "disk_gb": 30}
        assert items["node1"]["capacity"]["vcpus"] == 8
        assert items["node2"]["alive"] is False
        assert items["node2"]["allocated"] == {"vcpus": 0, "memory_mb": 0, "disk_gb": 0}
        page = (await admin.get("/v1/hosts", params={"limit": 1})).json()
        assert [host["name"] for host in page["items"]] == ["node1"]
        following = (await admin.get("/v1/hosts", params={"cursor": page["next"]})).json()
        assert [host["name"] for host in following["items"]] == ["node2"]
        one = await admin.get("/v1/hosts/node1")
        assert one.json()["labels"] == {"zone": "a"}
        assert (await admin.get("/v1/hosts/nope")).status_code == 404


async def test_admins_set_labels_and_members_are_refused(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        await add_host(lab, "node1", alive=True)
        admin = await lab.admin()
        member = await lab.member("alpha")
        attempts: list[tuple[str, dict[str, object] | None]] = [
            ("GET", None),
            ("PATCH", {"labels": {}}),
        ]
        for method, body in attempts:
            refused = await member.request(method, "/v1/hosts/node1", json=body)
            assert refused.status_code == 403
            assert refused.json()["code"] == "forbidden"
        assert (await member.get("/v1/hosts")).status_code == 403
        changed = await admin.patch("/v1/hosts/node1", json={"labels": {"gpu": "yes"}})
        assert changed.status_code == 200, changed.text
        assert changed.json()["labels"] == {"gpu": "yes"}
        kv = await lab.store.get(resource_key(Kind.HOST, "node1"))
        assert kv is not None
        assert HostRecord.from_json(kv.value).labels == {"gpu": "yes"}
        bad = await admin.patch("/v1/hosts/node1", json={"labels": {"bad key": "x"}})
        assert bad.status_code == 422
        missing = await admin.patch("/v1/hosts/nope", json={"labels": {}})
        assert missing.status_code == 404
