"""The VM routes: create with ports in one transaction, quotas, actions as spec changes,
volumes, console, delete, and project isolation — on a real SQLite store, in-process."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import httpx

from nubes.api.console import serial_log_path
from nubes.api.routes.volumes import attachment_claim
from nubes.ids import IdKind, new_id
from nubes.model.common import now
from nubes.model.image import ImageRecord
from nubes.model.network import (
    KeypairRecord,
    NetworkRecord,
    NetworkSpec,
    PortRecord,
    SubnetRecord,
    SubnetSpec,
    keypair_key_name,
)
from nubes.model.project import Usage
from nubes.model.vm import Flavor, VmRecord, VmState, VmStatus
from nubes.model.volume import VolumeRecord, VolumeSpec, VolumeState, VolumeStatus
from nubes.scheduler.binding import Allocation, HostAllocations
from nubes.store.keys import (
    Kind,
    host_allocations_key,
    name_key,
    resource_key,
    status_key,
    usage_key,
)
from tests.support.api_lab import ApiLab, add_image

PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me"


async def add_network(
    lab: ApiLab, project: str, name: str = "net", cidr: str = "198.18.10.0/29"
) -> tuple[str, str]:
    network_id = new_id(IdKind.NETWORK)
    subnet_id = new_id(IdKind.SUBNET)
    network = NetworkRecord(
        id=network_id, project=project, spec=NetworkSpec(name=name), created_at=now()
    )
    subnet = SubnetRecord(
        id=subnet_id,
        project=project,
        spec=SubnetSpec(name=f"{name}-v4", network=network_id, cidr=cidr, vni=4000),
        created_at=now(),
    )
    await lab.store.put(resource_key(Kind.NETWORK, network_id), network.to_json())
    await lab.store.put(name_key(Kind.NETWORK, project, name), network_id)
    await lab.store.put(resource_key(Kind.SUBNET, subnet_id), subnet.to_json())
    await lab.store.put(name_key(Kind.SUBNET, project, f"{name}-v4"), subnet_id)
    return network_id, subnet_id


async def add_key(lab: ApiLab, project: str, name: str = "mine") -> None:
    record = KeypairRecord(name=name, project=project, public_key=PUBLIC_KEY, created_at=now())
    await lab.store.put(
        resource_key(Kind.KEYPAIR, keypair_key_name(project, name)), record.to_json()
    )


async def keys(lab: ApiLab) -> set[str]:
    """Every key, less the ones a failed request may leave by design: the project's default
    security group (made for its first port), reference touch keys and request events."""
    found = (await lab.store.range("/nubes/")).kvs
    return {
        kv.key
        for kv in found
        if not kv.key.startswith(
            ("/nubes/security-groups/", "/nubes/claims/refs/", "/nubes/events/")
        )
        and not kv.key.startswith("/nubes/names/security-groups/")
    }


async def usage(lab: ApiLab, project: str) -> Usage:
    kv = await lab.store.get(usage_key(project))
    return Usage() if kv is None else Usage.from_json(kv.value)


async def setup(lab: ApiLab, project: str = "alpha") -> httpx.AsyncClient:
    client = await lab.member(project)
    await add_image(lab, project)
    await add_network(lab, project)
    await add_key(lab, project)
    return client


async def create(client: httpx.AsyncClient, name: str = "web", **fields: Any) -> dict[str, Any]:
    body = {"name": name, "flavor": "small", "image": "tiny", **fields}
    made = await client.post("/v1/vms", json=body)
    assert made.status_code == 201, made.text
    document: dict[str, Any] = made.json()
    return document


async def bind(lab: ApiLab, vm_id: str, host: str) -> None:
    """What the scheduler does: the VM gets a host."""
    kv = await lab.store.get(resource_key(Kind.VM, vm_id))
    assert kv is not None
    record = VmRecord.from_json(kv.value)
    bound = record.model_copy(update={"spec": record.spec.model_copy(update={"host": host})})
    await lab.store.put(kv.key, bound.to_json())


async def report(lab: ApiLab, vm_id: str, state: VmState, **fields: Any) -> None:
    """What the agent does: the VM's status."""
    status = VmStatus(state=state, updated_at=now(), **fields)
    await lab.store.put(status_key(Kind.VM, vm_id), status.to_json())


async def test_create_writes_the_vm_its_port_name_and_usage_together(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        client = await setup(lab)
        vm = await create(
            client,
            networks=[{"network": "net"}],
            key_name="mine",
            user_data="#cloud-config\n",
            host_labels={"zone": "a"},
        )
        assert vm["id"].startswith("i-")
        assert vm["state"] == "pending"
        assert vm["project"] == "alpha"
        assert vm["spec"]["flavor"] == {
            "name": "small",
            "vcpus": 1,
            "memory_mb": 512,
            "disk_gb": 10,
        }
        assert vm["spec"]["key_names"] == ["mine"]
        assert vm["spec"]["host"] is None
        [port_id] = vm["spec"]["ports"]
        [address] = vm["addresses"]
        assert address["port"] == port_id
        assert ipaddress.ip_address(address["ip"]) in ipaddress.ip_network("198.18.10.0/29")
        port = (await lab.store.get(resource_key(Kind.PORT, port_id))).value  # type: ignore[union-attr]
        assert port["spec"]["vm"] == vm["id"]
        assert port["spec"]["auto_delete"] is True
        assert await lab.store.get(name_key(Kind.VM, "alpha", "web")) is not None
        assert await usage(lab, "alpha") == Usage(vms=1, vcpus=1, memory_mb=512)
        claims = [kv.key for kv in (await lab.store.range("/nubes/claims/")).kvs]
        assert any(address["ip"] in key for key in claims)
        shown = await client.get("/v1/vms/web")
        assert shown.status_code == 200
        assert shown.json()["id"] == vm["id"]


async def test_two_vms_on_one_subnet_get_different_addresses(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        client = await setup(lab)
        first = await create(client, "a", networks=[{"network": "net"}])
        second = await create(client, "b", networks=[{"network": "net", "subnet": "net-v4"}])
        assert first["addresses"][0]["ip"] != second["addresses"][0]["ip"]
        taken = first["addresses"][0]["ip"]
        before = await keys(lab)
        clash = await client.post(
            "/v1/vms",
            json={
                "name": "c",
                "flavor": "small",
                "image": "tiny",
                "networks": [{"network": "net", "fixed_ip": taken}],
            },
        )
        assert clash.status_code == 409, clash.text
        assert await keys(lab) == before


async def test_the_21st_vm_is_over_quota_and_writes_nothing(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        client = await setup(lab)
        await add_network(lab, "alpha", "wide", "198.18.12.0/24")
        for index in range(20):
            await create(client, f"vm{index}", flavor="tiny", networks=[{"network": "wide"}])
        before = await keys(lab)
        over = await client.post(
            "/v1/vms",
            json={
                "name": "vm20",
                "flavor": "tiny",
                "image": "tiny",
                "networks": [{"network": "wide"}],
            },
        )
        assert over.status_code == 409
        assert over.json()["code"] == "quota_exceeded"
        assert "vms" in over.json()["message"]
        assert await keys(lab) == before
        assert (await usage(lab, "alpha")).vms == 20


async def test_bad_references_are_refused_with_codes_and_leave_nothing(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        client = await setup(lab)
        before = await keys(lab)
        cases: list[tuple[dict[str, Any], int, str]] = [
            ({"flavor": "nope"}, 404, "not_found"),
            ({"image": "nope"}, 404, "not_found"),
            ({"image": "img-0000000000"}, 404, "not_found"),
            ({"key_name": "nope"}, 404, "not_found"),
            ({"networks": [{"network": "nope"}]}, 404, "not_found"),
            ({"networks": [{"network": "net", "subnet": "nope"}]}, 404, "not_found"),
            ({"networks": [{"network": "net", "fixed_ip": "198.18.99.1"}]}, 400, "invalid_input"),
            ({"ports": ["port-0000000000"]}, 404, "not_found"),
            ({"security_groups": ["nope"], "networks": [{"network": "net"}]}, 404, "not_found"),
            ({"networks": [{"network": "net"}] * 9}, 422, "invalid_input"),
            ({"user_data": "é" * 40_000}, 400, "invalid_input"),
            ({"name": "-bad"}, 422, "invalid_input"),
            ({"host_labels": {"zone": "a b"}}, 422, "invalid_input"),
        ]
        for change, status, code in cases:
            body = {"name": "web", "flavor": "small", "image": "tiny", **change}
            answer = await client.post("/v1/vms", json=body)
            assert (answer.status_code, answer.json()["code"]) == (status, code), (
                change,
                answer.text,
            )
            assert answer.json()["message"]
        assert await keys(lab) == before
        assert await usage(lab, "alpha") == Usage()


async def test_another_projects_image_is_invisible_but_a_public_one_is_usable(
    tmp_path: Path,
) -> None:
    async with ApiLab.open(tmp_path) as lab:
        client = await setup(lab)
        theirs = await add_image(lab, "beta", "secret")
        refused = await client.post(
            "/v1/vms", json={"name": "x", "flavor": "tiny", "image": theirs}
        )
        assert refused.status_code == 404
        kv = await lab.store.get(resource_key(Kind.IMAGE, theirs))
        assert kv is not None
        public = ImageRecord.from_json(kv.value).model_copy(update={"public": True})
        await lab.store.put(kv.key, public.to_json())
        vm = await create(client, "x", flavor="tiny", image=theirs)
        assert vm["spec"]["image"] == theirs


async def test_an_existing_port_is_taken_and_freed_again_on_delete(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        client = await setup(lab)
        holder = await create(client, "holder", networks=[{"network": "net"}])
        [port_id] = holder["spec"]["ports"]
        busy = await client.post(
            "/v1/vms", json={"name": "x", "flavor": "tiny", "image": "tiny", "ports": [port_id]}
        )
        assert busy.status_code == 409
        # A free port: take the holder's away by editing it as the port routes would.
        kv = await lab.store.get(resource_key(Kind.PORT, port_id))
        assert kv is not None
        held = PortRecord.from_json(kv.value)
        spec = held.spec.model_copy(update={"vm": None, "auto_delete": False})
        await lab.store.put(kv.key, held.model_copy(update={"spec": spec}).to_json())
        vm = await create(client, "x", flavor="tiny", ports=[port_id])
        port = (await lab.store.get(kv.key)).value  # type: ignore[union-attr]
        assert port["spec"]["vm"] == vm["id"]
        assert (await client.delete(f"/v1/vms/{vm['id']}")).status_code == 202
        port = (await lab.store.get(kv.key)).value  # type: ignore[union-attr]
        assert port["spec"]["vm"] is None


async def test_actions_change_the_spec_exactly(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        client = await setup(lab)
        vm = await create(client, power_state="stopped")
        url = f"/v1/vms/{vm['id']}"
        started = await client.post(f"{url}/start")
        assert started.status_code == 202, started.text
        assert started.json()["spec"]["power_state"] == "running"
        assert started.json()["spec"]["start_counter"] == 1
        again = await client.post(f"{url}/start")
        assert again.status_code == 409
        assert again.json()["code"] == "vm_state"
        assert "pending" in again.json()["message"]

        refused = await client.post(f"{url}/reboot")
        assert refused.status_code == 409
        assert refused.json()["code"] == "vm_state"
        await bind(lab, vm["id"], "node1")
        await report(lab, vm["id"], VmState.RUNNING, host="node1")
        rebooted = await client.post(f"{url}/reboot")
        assert rebooted.status_code == 202
        assert rebooted.json()["spec"]["reboot_counter"] == 1
        assert rebooted.json()["spec"]["start_counter"] == 1

        stopped = await client.post(f"{url}/stop")
        assert stopped.json()["spec"]["power_state"] == "stopped"
        assert stopped.json()["spec"]["soft_stop_timeout"] is None
        # Still running (the guest has not powered off yet): a forced stop is still welcome.
        forced = await client.post(f"{url}/stop", json={"force": True})
        assert forced.status_code == 202
        assert forced.json()["spec"]["soft_stop_timeout"] == 0
        await report(lab, vm["id"], VmState.STOPPED, host="node1")
        twice = await client.post(f"{url}/stop")
        assert twice.status_code == 409
        assert twice.json()["code"] == "vm_state"

        restarted = await client.post(f"{url}/start")
        assert restarted.json()["spec"]["start_counter"] == 2
        kv = await lab.store.get(resource_key(Kind.VM, vm["id"]))
        stored = VmRecord.from_json(kv.value)  # type: ignore[union-attr]
        assert stored.spec.model_dump(
            include={"power_state", "start_counter", "reboot_counter", "soft_stop_timeout"}
        ) == {
            "power_state": "running",
            "start_counter": 2,
            "reboot_counter": 1,
            "soft_stop_timeout": 0,
        }


async def test_resize_moves_the_quota_and_says_when_it_applies(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        client = await setup(lab)
        vm = await create(client)
        url = f"/v1/vms/{vm['id']}"
        await bind(lab, vm["id"], "node1")
        small = Flavor(name="small", vcpus=1, memory_mb=512, disk_gb=10)
        await report(lab, vm["id"], VmState.RUNNING, host="node1", flavor=small)
        booked = HostAllocations(vms={vm["id"]: Allocation(vcpus=1, memory_mb=512, disk_gb=10)})
        await lab.store.put(host_allocations_key("node1"), booked.to_json())
        resized = await client.post(f"{url}/resize", json={"flavor": "medium"})
        assert resized.status_code == 202, resized.text
        assert resized.json()["spec"]["flavor"]["name"] == "medium"
        assert any("next start" in note for note in resized.json()["notes"])
        assert await usage(lab, "alpha") == Usage(vms=1, vcpus=2, memory_mb=2048)
        books = await lab.store.get(host_allocations_key("node1"))
        assert books is not None
        assert HostAllocations.from_json(books.value).vms[vm["id"]] == Allocation(
            vcpus=2, memory_mb=2048, disk_gb=20
        )
        same = await client.post(f"{url}/resize", json={"flavor": "medium"})
        assert same.status_code == 409
        shrink = await client.post(f"{url}/resize", json={"flavor": "small"})
        assert shrink.status_code == 400  # its disk would shrink
        missing = await client.post(f"{url}/resize", json={"flavor": "nope"})
        assert missing.status_code == 404


async def test_patch_renames_and_changes_policies(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        client = await setup(lab)
        vm = await create(client)
        await create(client, "other")
        changed = await client.patch(
            "/v1/vms/web", json={"name": "www", "restart_policy": "always", "cpu_weight": 50}
        )
        assert changed.status_code == 200, changed.text
        assert changed.json()["spec"]["restart_policy"] == "always"
        assert (await client.get("/v1/vms/www")).json()["id"] == vm["id"]
        assert (await client.get("/v1/vms/web")).status_code == 404
        taken = await client.patch("/v1/vms/www", json={"name": "other"})
        assert taken.status_code == 409
        assert (await client.patch("/v1/vms/www", json={"id": "i-0000000000"})).status_code == 422


async def add_volume(lab: ApiLab, project: str, name: str, host: str | None) -> str:
    volume_id = new_id(IdKind.VOLUME)
    record = VolumeRecord(
        id=volume_id,
        project=project,
        spec=VolumeSpec(name=name, size_gb=1, host=host),
        created_at=now(),
    )
    await lab.store.put(resource_key(Kind.VOLUME, volume_id), record.to_json())
    await lab.store.put(name_key(Kind.VOLUME, project, name), volume_id)
    if host is not None:
        status = VolumeStatus(state=VolumeState.AVAILABLE, host=host, updated_at=now())
        await lab.store.put(status_key(Kind.VOLUME, volume_id), status.to_json())
    return volume_id


async def test_a_volume_is_attached_to_one_vm_at_a_time(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        client = await setup(lab)
        first = await create(client, "first")
        second = await create(client, "second")
        fresh = await add_volume(lab, "alpha", "fresh", None)
        elsewhere = await add_volume(lab, "alpha", "elsewhere", "node2")
        unplaced = await client.post("/v1/vms/first/volumes", json={"volume": "fresh"})
        assert unplaced.status_code == 409
        await bind(lab, first["id"], "node1")
        await bind(lab, second["id"], "node1")

        attached = await client.post("/v1/vms/first/volumes", json={"volume": "fresh"})
        assert attached.status_code == 202, attached.text
        assert attached.json()["spec"]["volumes"] == [fresh]
        volume_kv = await lab.store.get(resource_key(Kind.VOLUME, fresh))
        assert volume_kv is not None
        volume = VolumeRecord.from_json(volume_kv.value)
        assert volume.spec.host == "node1"  # made where its VM runs
        claim = await lab.store.get(attachment_claim(fresh))
        assert claim is not None
        assert claim.value == first["id"]

        taken = await client.post("/v1/vms/second/volumes", json={"volume": fresh})
        assert taken.status_code == 409
        assert taken.json()["code"] == "volume_unavailable"
        far = await client.post("/v1/vms/second/volumes", json={"volume": "elsewhere"})
        assert far.status_code == 409
        assert "node2" in far.json()["message"]
        assert elsewhere not in (await client.get("/v1/vms/second")).json()["spec"]["volumes"]

        detached = await client.delete(f"/v1/vms/first/volumes/{fresh}")
        assert detached.status_code == 202
        assert detached.json()["spec"]["volumes"] == []
        assert await lab.store.get(attachment_claim(fresh)) is None
        not_there = await client.delete("/v1/vms/first/volumes/fresh")
        assert not_there.status_code == 409
        not_made = await client.post("/v1/vms/second/volumes", json={"volume": "fresh"})
        assert not_made.status_code == 409  # bound to node1, but its agent has not made it
        assert "not made yet" in not_made.json()["message"]
        made = VolumeStatus(state=VolumeState.AVAILABLE, host="node1", updated_at=now())
        await lab.store.put(status_key(Kind.VOLUME, fresh), made.to_json())
        moved = await client.post("/v1/vms/second/volumes", json={"volume": "fresh"})
        assert moved.status_code == 202


async def test_deleting_an_unplaced_vm_removes_it_with_its_ports_and_claims(
    tmp_path: Path,
) -> None:
    async with ApiLab.open(tmp_path) as lab:
        client = await setup(lab)
        before = await keys(lab)
        vm = await create(client, networks=[{"network": "net"}, {"network": "net"}])
        assert len(vm["addresses"]) == 2
        await report(lab, vm["id"], VmState.ERROR, reason="no host has room")
        gone = await client.delete("/v1/vms/web")
        assert gone.status_code == 202, gone.text
        assert gone.json()["deleting"] is True
        assert gone.json()["state"] == "deleting"
        assert await keys(lab) - {usage_key("alpha")} == before - {usage_key("alpha")}
        assert await usage(lab, "alpha") == Usage()
        assert (await client.get(f"/v1/vms/{vm['id']}")).status_code == 404
        again = await create(client, networks=[{"network": "net"}])
        assert again["addresses"][0]["ip"] == vm["addresses"][0]["ip"]


async def test_deleting_a_placed_vm_marks_it_for_its_agent_and_frees_quota_once(
    tmp_path: Path,
) -> None:
    async with ApiLab.open(tmp_path) as lab:
        client = await setup(lab)
        vm = await create(client, networks=[{"network": "net"}])
        await bind(lab, vm["id"], "node1")
        first = await client.delete(f"/v1/vms/{vm['id']}")
        assert first.status_code == 202
        assert first.json()["state"] == "deleting"
        kv = await lab.store.get(resource_key(Kind.VM, vm["id"]))
        assert kv is not None
        assert VmRecord.from_json(kv.value).deleting
        assert await usage(lab, "alpha") == Usage()
        await create(client, flavor="tiny")  # the name is free again
        assert (await client.delete(f"/v1/vms/{vm['id']}")).status_code == 202
        assert await usage(lab, "alpha") == Usage(vms=1, vcpus=1, memory_mb=96)
        refused = await client.post(f"/v1/vms/{vm['id']}/start")
        assert refused.status_code == 409
        assert "deleting" in refused.json()["message"]


async def test_another_project_cannot_see_or_touch_a_vm(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alpha = await setup(lab, "alpha")
        beta = await setup(lab, "beta")
        vm = await create(alpha)
        url = f"/v1/vms/{vm['id']}"
        for method, path, body in [
            ("GET", url, None),
            ("PATCH", url, {"autostart": False}),
            ("DELETE", url, None),
            ("POST", f"{url}/start", None),
            ("POST", f"{url}/stop", None),
            ("POST", f"{url}/reboot", None),
            ("POST", f"{url}/resize", {"flavor": "medium"}),
            ("POST", f"{url}/volumes", {"volume": "x"}),
            ("GET", f"{url}/console", None),
        ]:
            answer = await beta.request(method, path, json=body)
            assert answer.status_code == 404, (method, path, answer.text)
        assert (await beta.get("/v1/vms")).json()["items"] == []
        assert (await beta.get("/v1/vms/web")).status_code == 404
        kv = await lab.store.get(resource_key(Kind.VM, vm["id"]))
        assert kv is not None
        assert not VmRecord.from_json(kv.value).deleting


async def test_listing_filters_and_pages(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        client = await setup(lab)
        made = [await create(client, f"vm{index}", flavor="tiny") for index in range(5)]
        await bind(lab, made[0]["id"], "node1")
        await report(lab, made[0]["id"], VmState.RUNNING, host="node1")
        await report(lab, made[1]["id"], VmState.ERROR, reason="no host")
        running = (await client.get("/v1/vms", params={"state": "running"})).json()
        assert [vm["id"] for vm in running["items"]] == [made[0]["id"]]
        assert running["items"][0]["status"]["state"] == "running"
        pending = (await client.get("/v1/vms", params={"state": "pending", "limit": 2})).json()
        assert len(pending["items"]) == 2
        assert pending["next"] is not None
        rest = (
            await client.get(
                "/v1/vms", params={"state": "pending", "limit": 2, "cursor": pending["next"]}
            )
        ).json()
        seen = {vm["id"] for vm in pending["items"] + rest["items"]}
        assert seen == {vm["id"] for vm in made[2:]}
        assert (await client.get("/v1/vms", params={"host": "node1"})).json()["items"][0][
            "id"
        ] == made[0]["id"]
        named = (await client.get("/v1/vms", params={"name": "vm3"})).json()["items"]
        assert [vm["id"] for vm in named] == [made[3]["id"]]
        assert (await client.get("/v1/vms", params={"state": "nope"})).status_code == 422


async def test_console_shows_the_tail_of_the_serial_log_on_this_host(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        client = await setup(lab)
        vm = await create(client)
        url = f"/v1/vms/{vm['id']}/console"
        unplaced = await client.get(url)
        assert unplaced.status_code == 409
        await bind(lab, vm["id"], "elsewhere")
        far = await client.get(url)
        assert far.status_code == 409
        assert "elsewhere" in far.json()["message"]
        await bind(lab, vm["id"], lab.ctx.config.agent.host)
        empty = await client.get(url)
        assert empty.status_code == 200
        assert empty.json()["lines"] == []
        log = serial_log_path(lab.ctx.config, vm["id"])
        log.parent.mkdir(parents=True)
        log.write_bytes(b"".join(f"line {n}\r\n".encode() for n in range(500)) + b"\xff end")
        tail = (await client.get(url, params={"lines": 3})).json()
        assert tail["lines"] == ["line 498", "line 499", "\ufffd end"]
        assert tail["truncated"] is True
        assert (await client.get(url, params={"lines": 0})).status_code == 422
        assert (await client.get(url, params={"lines": 10_001})).status_code == 422


async def test_vms_made_at_once_on_a_small_subnet_all_get_their_own_address(
    tmp_path: Path,
) -> None:
    async with ApiLab.open(tmp_path) as lab:
        client = await setup(lab)  # 198.18.10.0/29: five addresses besides the gateway
        body = {"flavor": "tiny", "image": "tiny", "networks": [{"network": "net"}]}
        answers = await asyncio.gather(
            *(client.post("/v1/vms", json={**body, "name": f"vm{n}"}) for n in range(5))
        )
        assert [answer.status_code for answer in answers] == [201] * 5, [a.text for a in answers]
        addresses = {answer.json()["addresses"][0]["ip"] for answer in answers}
        assert len(addresses) == 5
        full = await client.post("/v1/vms", json={**body, "name": "vm5"})
        assert full.status_code == 409
        assert (await usage(lab, "alpha")).vms == 5


async def test_deleting_an_unplaced_vm_unbinds_the_floating_ip_of_its_port(
    tmp_path: Path,
) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        outside = {"cidr": "198.19.0.0/24", "gateway": "198.19.0.1"}
        made = await admin.post("/v1/networks", json={"name": "public", "external": outside})
        assert made.status_code == 201, made.text
        client = await setup(lab)
        network = (await client.get("/v1/networks/net")).json()
        way_out = await client.patch(
            f"/v1/networks/{network['id']}", json={"external_gateway": "public"}
        )
        assert way_out.status_code == 200, way_out.text
        vm = await create(client, networks=[{"network": "net"}])
        [port] = vm["spec"]["ports"]
        fip = (await client.post("/v1/floating-ips", json={"network": "public"})).json()
        bound = await client.post(f"/v1/floating-ips/{fip['id']}/associate", json={"port": port})
        assert bound.status_code == 200, bound.text

        assert (await client.delete(f"/v1/vms/{vm['id']}")).status_code == 202
        after = (await client.get(f"/v1/floating-ips/{fip['id']}")).json()
        assert (after["spec"]["port"], after["spec"]["fixed_ip"]) == (None, None)
        assert not [key for key in await keys(lab) if port in key]
