"""Images through the API: streamed uploads checked by the real qemu-img, URL imports from an
allowed host with progress to poll, public and private visibility, deletes that strand nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from nubes.api.routes import images as images_routes
from nubes.ids import IdKind, new_id
from nubes.model.common import now
from nubes.model.vm import Flavor, VmRecord, VmSpec
from nubes.store.keys import Kind, resource_key
from tests.support.api_lab import ApiLab

MIB = 1 << 20


def make_qcow2(path: Path, size: str = "64M", *options: str) -> Path:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", *options, str(path), size], check=True
    )
    return path


def make_bzimage(size: int = 4096) -> bytes:
    kernel = bytearray(size)
    kernel[0x202:0x206] = b"HdrS"
    return bytes(kernel)


async def image_keys(lab: ApiLab) -> list[str]:
    listing = await lab.store.range("/nubes/")
    return [kv.key for kv in listing.kvs if "/images/" in kv.key or "image-names" in kv.key]


async def upload(
    client: httpx.AsyncClient, name: str, content: bytes, **params: Any
) -> httpx.Response:
    return await client.post(
        "/v1/images",
        params={"name": name, **params},
        content=content,
        headers={"content-type": "application/octet-stream"},
    )


class Server:
    """A plain HTTP server on 127.0.0.1 serving a directory, in a thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        handler = partial(_Handler, directory=str(root))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/{name}"


class _Handler(SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/redirect/"))
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[Server]:
    root = tmp_path / "served"
    root.mkdir()
    server = Server(root)
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join(timeout=5)


async def wait_import(client: httpx.AsyncClient, image_id: str) -> dict[str, Any]:
    for _ in range(200):
        response = await client.get(f"/v1/images/imports/{image_id}")
        assert response.status_code == 200, response.text
        document: dict[str, Any] = response.json()
        if document["state"] != "importing":
            return document
        await asyncio.sleep(0.05)
    raise AssertionError(f"import {image_id} did not finish")


async def test_a_qcow2_upload_is_validated_stored_and_findable_by_id_and_name(
    tmp_path: Path,
) -> None:
    content = make_qcow2(tmp_path / "disk.qcow2").read_bytes()
    async with ApiLab.open(tmp_path) as lab:
        member = await lab.member("alpha")
        made = await upload(member, "disk1", content)
        assert made.status_code == 201, made.text
        image = made.json()
        assert image["format"] == "qcow2"
        assert image["virtual_size"] == 64 * MIB
        assert image["project"] == "alpha"
        assert image["public"] is False
        assert image["disk"]["sha256"] == hashlib.sha256(content).hexdigest()
        assert image["status"]["state"] == "active"
        stored = lab.ctx.image_dir / image["id"] / "disk"
        assert stored.read_bytes() == content
        assert [entry.name for entry in lab.ctx.image_dir.iterdir()] == [image["id"]]
        by_name = await member.get("/v1/images/disk1")
        assert by_name.json()["id"] == image["id"]
        assert by_name.json()["status"]["bytes_done"] == len(content)
        listed = (await member.get("/v1/images")).json()["items"]
        assert [item["id"] for item in listed] == [image["id"]]
        again = await upload(member, "disk1", content)
        assert again.status_code == 409
        assert again.json()["code"] == "conflict"


async def test_a_raw_upload_and_a_direct_boot_upload_with_kernel_and_initrd(
    tmp_path: Path,
) -> None:
    raw = b"\x55" * (2 * MIB)
    kernel, initrd = make_bzimage(), b"070701" + bytes(500)
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        made = await upload(admin, "raw1", raw, format="raw")
        assert made.status_code == 201, made.text
        assert made.json()["format"] == "raw"
        assert made.json()["virtual_size"] == 2 * MIB
        booted = await upload(
            admin,
            "boot1",
            kernel + initrd + raw,
            kernel_size=len(kernel),
            initrd_size=len(initrd),
            cmdline="console=ttyS0",
        )
        assert booted.status_code == 201, booted.text
        record = booted.json()
        assert record["kernel"]["size"] == len(kernel)
        assert record["initrd"]["sha256"] == hashlib.sha256(initrd).hexdigest()
        assert record["disk"]["size"] == len(raw)
        assert record["cmdline"] == "console=ttyS0"
        directory = lab.ctx.image_dir / record["id"]
        assert (directory / "kernel").read_bytes() == kernel
        assert (directory / "disk").read_bytes() == raw


async def test_a_corrupt_or_mislabelled_disk_is_422_and_leaves_nothing(tmp_path: Path) -> None:
    good = make_qcow2(tmp_path / "disk.qcow2").read_bytes()
    truncated = good[:300]  # the qcow2 header promises tables that are not there
    backed = make_qcow2(tmp_path / "backed.qcow2", "1M", "-b", "/etc/hostname", "-F", "raw")
    async with ApiLab.open(tmp_path) as lab:
        member = await lab.member("alpha")
        for name, content, params in [
            ("cut", truncated, {}),
            ("backed", backed.read_bytes(), {}),
            ("labelled", good, {"format": "raw"}),
            ("empty", b"", {}),
        ]:
            refused = await upload(member, name, content, **params)
            assert refused.status_code in (400, 422), (name, refused.text)
            if name != "empty":
                assert refused.json()["code"] == "image_invalid", (name, refused.text)
            assert refused.json()["message"]
        assert list(lab.ctx.image_dir.iterdir()) == []
        assert await image_keys(lab) == []
        # The name was released: a good disk under it goes through.
        assert (await upload(member, "cut", good)).status_code == 201


async def test_an_oversized_upload_is_413_whether_announced_or_streamed(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path, extras={"image_max_bytes": MIB}) as lab:
        member = await lab.member("alpha")
        announced = await upload(member, "big", b"\0" * (MIB + 1), format="raw")
        assert announced.status_code == 413
        assert announced.json()["code"] == "too_large"

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b"\0" * (MIB // 2 + 1)

        streamed = await member.post(
            "/v1/images", params={"name": "big", "format": "raw"}, content=chunks()
        )
        assert streamed.status_code == 413, streamed.text
        assert streamed.json()["code"] == "too_large"
        assert list(lab.ctx.image_dir.iterdir()) == []
        assert await image_keys(lab) == []


async def test_upload_parameters_are_checked_before_any_byte_is_kept(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        member = await lab.member("alpha")
        cases = [
            ({"name": "../etc"}, 422, "invalid_input"),
            ({"name": "x", "initrd_size": 10}, 400, "invalid_input"),
            ({"name": "x", "public": "true"}, 403, "forbidden"),
            ({"name": "x", "kernel_size": 64}, 400, "invalid_input"),  # body shorter
        ]
        for params, status, code in cases:
            response = await member.post("/v1/images", params=params, content=b"\0" * 32)
            assert response.status_code == status, (params, response.text)
            assert response.json()["code"] == code
        assert await image_keys(lab) == []


async def test_url_import_is_refused_unless_the_host_is_allowed(
    tmp_path: Path, http_server: Server
) -> None:
    make_qcow2(http_server.root / "disk.qcow2")
    async with ApiLab.open(tmp_path) as lab:
        member = await lab.member("alpha")
        body = {"name": "web", "url": http_server.url("disk.qcow2")}
        refused = await member.post("/v1/images/import", json=body)
        assert refused.status_code == 403
        assert refused.json()["code"] == "import_not_allowed"
        assert "import_allow" in refused.json()["hint"]
        local = await member.post("/v1/images/import", json={"name": "web", "url": "/etc/passwd"})
        assert local.status_code in (400, 403)
        assert await image_keys(lab) == []
    async with ApiLab.open(tmp_path / "other", import_allow=("images.example.org",)) as lab:
        member = await lab.member("alpha")
        refused = await member.post("/v1/images/import", json=body)
        assert refused.status_code == 403
        assert "127.0.0.1" in refused.json()["message"]


async def test_url_import_from_an_allowed_host_reports_progress_until_active(
    tmp_path: Path, http_server: Server
) -> None:
    disk = make_qcow2(http_server.root / "disk.qcow2")
    (http_server.root / "vmlinuz").write_bytes(make_bzimage())
    async with ApiLab.open(tmp_path, import_allow=("127.0.0.1",)) as lab:
        member = await lab.member("alpha")
        body = {
            "name": "web",
            "url": http_server.url("disk.qcow2") + "?token=secret",
            "kernel_url": http_server.url("vmlinuz"),
            "cmdline": "console=ttyS0",
        }
        started = await member.post("/v1/images/import", json=body)
        assert started.status_code == 202, started.text
        assert started.json()["state"] == "importing"
        assert "secret" not in started.json()["source"]
        image_id = started.json()["id"]
        other = await lab.member("beta")
        assert (await other.get(f"/v1/images/imports/{image_id}")).status_code == 404
        done = await wait_import(member, image_id)
        assert done["state"] == "active", done
        assert done["file"] == "disk"
        assert done["bytes_done"] == done["bytes_total"] == disk.stat().st_size
        assert done["image"]["kernel"]["size"] == 4096
        got = await member.get(f"/v1/images/{image_id}")
        assert got.json()["disk"]["sha256"] == hashlib.sha256(disk.read_bytes()).hexdigest()
        assert (lab.ctx.image_dir / image_id / "disk").exists()


async def test_a_failed_url_import_says_why_and_frees_the_name(
    tmp_path: Path, http_server: Server
) -> None:
    disk = make_qcow2(http_server.root / "disk.qcow2")
    (http_server.root / "junk.qcow2").write_bytes(disk.read_bytes()[:300])
    async with ApiLab.open(tmp_path, import_allow=("127.0.0.1",)) as lab:
        member = await lab.member("alpha")
        attempts = [
            (http_server.url("junk.qcow2"), "image_invalid"),
            (http_server.url("missing.qcow2"), "invalid_input"),
            # An allowed host may not bounce the download to another one.
            (
                http_server.url("redirect/" + http_server.url("disk.qcow2", host="localhost")),
                "import_not_allowed",
            ),
        ]
        for url, code in attempts:
            started = await member.post("/v1/images/import", json={"name": "web", "url": url})
            assert started.status_code == 202, started.text
            failed = await wait_import(member, started.json()["id"])
            assert (failed["state"], failed["code"]) == ("failed", code), failed
            assert failed["reason"]
            assert (await member.get(f"/v1/images/{started.json()['id']}")).status_code == 404
            forgotten = await member.delete(f"/v1/images/{started.json()['id']}")
            assert forgotten.status_code == 204
        assert list(lab.ctx.image_dir.iterdir()) == []
        assert await image_keys(lab) == []


async def test_public_images_are_seen_by_every_project_and_private_ones_by_theirs(
    tmp_path: Path,
) -> None:
    content = make_qcow2(tmp_path / "disk.qcow2", "1M").read_bytes()
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        alpha = await lab.member("alpha")
        beta = await lab.member("beta")
        tiny = (await upload(admin, "tiny", content, public="true")).json()
        assert tiny["public"] is True
        private = (await upload(alpha, "secret", content)).json()

        assert (await beta.get("/v1/images/tiny")).json()["id"] == tiny["id"]
        assert (await beta.get(f"/v1/images/{tiny['id']}")).status_code == 200
        assert [item["id"] for item in (await beta.get("/v1/images")).json()["items"]] == [
            tiny["id"]
        ]
        own_only = (await alpha.get("/v1/images", params={"public": "false"})).json()
        assert [item["id"] for item in own_only["items"]] == [private["id"]]
        for ref in (private["id"], "secret"):
            assert (await beta.get(f"/v1/images/{ref}")).status_code == 404
            assert (await beta.delete(f"/v1/images/{ref}")).status_code == 404
        # A second public image may not take a public name; a private one may.
        assert (await upload(admin, "tiny", content, public="true")).status_code == 409
        mine = (await upload(beta, "tiny", content)).json()
        assert (await beta.get("/v1/images/tiny")).json()["id"] == mine["id"]

        refused = await alpha.delete(f"/v1/images/{tiny['id']}")
        assert refused.status_code == 403
        assert (await admin.delete(f"/v1/images/{tiny['id']}")).status_code == 204
        assert not (lab.ctx.image_dir / tiny["id"]).exists()
        assert (await beta.get(f"/v1/images/{tiny['id']}")).status_code == 404


async def test_an_image_in_use_cannot_be_deleted(tmp_path: Path) -> None:
    content = make_qcow2(tmp_path / "disk.qcow2", "1M").read_bytes()
    async with ApiLab.open(tmp_path) as lab:
        member = await lab.member("alpha")
        image = (await upload(member, "base", content)).json()
        volume = await member.post("/v1/volumes", json={"name": "v1", "image": "base"})
        assert volume.status_code == 201, volume.text
        vm_id = new_id(IdKind.VM)
        flavor = Flavor(name="f", vcpus=1, memory_mb=64, disk_gb=0)
        vm = VmRecord(
            id=vm_id,
            project="alpha",
            spec=VmSpec(name="vm1", flavor=flavor, image=image["id"]),
            created_at=now(),
        )
        await lab.store.put(resource_key(Kind.VM, vm_id), vm.to_json())

        refused = await member.delete("/v1/images/base")
        assert refused.status_code == 409
        assert volume.json()["id"] in refused.json()["message"]
        assert vm_id in refused.json()["message"]
        assert (lab.ctx.image_dir / image["id"] / "disk").exists()

        await lab.store.delete(resource_key(Kind.VM, vm_id))
        assert (await member.delete(f"/v1/volumes/{volume.json()['id']}")).status_code == 202
        assert (await member.delete("/v1/images/base")).status_code == 204
        assert list(lab.ctx.image_dir.iterdir()) == []
        assert await image_keys(lab) == []
        assert (await member.post("/v1/images/import", json={})).status_code == 422


async def test_a_user_made_while_an_image_is_deleted_stops_the_delete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A VM or volume create that commits between the delete's look for users and its own
    # commit touches the image's reference key; the delete must then fail, not leave the
    # new user on an image without files.
    content = make_qcow2(tmp_path / "disk.qcow2", "1M").read_bytes()
    async with ApiLab.open(tmp_path) as lab:
        member = await lab.member("alpha")
        image = (await upload(member, "base", content)).json()
        real_users = images_routes.image_users

        async def users_then_a_create(store: Any, image_id: str) -> list[str]:
            found = await real_users(store, image_id)
            created = await member.post("/v1/volumes", json={"name": "late", "image": image_id})
            assert created.status_code == 201, created.text
            return found

        monkeypatch.setattr(images_routes, "image_users", users_then_a_create)
        refused = await member.delete("/v1/images/base")
        assert refused.status_code == 409, refused.text
        assert (lab.ctx.image_dir / image["id"] / "disk").exists()
        assert (await member.get(f"/v1/images/{image['id']}")).status_code == 200
