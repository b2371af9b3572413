"""Importing images with the real qemu-img: what is accepted, what is refused, what remains."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from nubes.agent.storage.images import delete_image, import_image, list_images
from nubes.errors import ImageInvalid, InvalidInput, NotFound
from nubes.model.image import ImageFormat, ImageRecord
from nubes.store.keys import Kind, resource_key
from nubes.store.sqlite import SqliteStore
from tests.integration.storage.conftest import (
    MIB,
    HttpServer,
    entries,
    image_records,
    make_bzimage,
    make_qcow2,
    qemu_img,
)

pytestmark = pytest.mark.integration


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_a_qcow2_from_a_file_is_stored_read_only_and_recorded(
    store: SqliteStore, image_dir: Path, sources: Path
) -> None:
    source = make_qcow2(sources / "good.qcow2", 64 * MIB)
    record = await import_image(store, image_dir, str(source), name="good")

    assert record.format is ImageFormat.QCOW2
    assert record.virtual_size == 64 * MIB
    assert record.disk.sha256 == sha256(source)
    assert record.source == str(source)
    stored = image_dir / record.id / "disk"
    assert sha256(stored) == record.disk.sha256
    assert stat.S_IMODE(stored.stat().st_mode) == 0o444
    assert entries(image_dir) == [record.id]
    kv = await store.get(resource_key(Kind.IMAGE, record.id))
    assert kv is not None
    assert ImageRecord.from_json(kv.value) == record
    assert await list_images(store) == [record]


async def test_a_raw_disk_downloads_over_http_with_progress(
    store: SqliteStore, image_dir: Path, http_server: HttpServer
) -> None:
    content = os.urandom(3 * MIB + 17)
    (http_server.root / "disk.raw").write_bytes(content)
    reports: list[tuple[int, int | None]] = []

    record = await import_image(
        store,
        image_dir,
        http_server.url("disk.raw"),
        name="raw-over-http",
        progress=lambda done, total: reports.append((done, total)),
    )

    assert record.format is ImageFormat.RAW
    # QEMU rounds a raw file up to whole 512-byte sectors.
    assert record.virtual_size == -(-len(content) // 512) * 512
    assert record.disk.sha256 == hashlib.sha256(content).hexdigest()
    assert (image_dir / record.id / "disk").read_bytes() == content
    assert len(reports) > 1
    assert reports[-1] == (len(content), len(content))
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)


async def test_a_qcow2_over_http_with_kernel_and_initrd_keeps_all_three(
    store: SqliteStore, image_dir: Path, http_server: HttpServer
) -> None:
    make_qcow2(http_server.root / "disk.qcow2")
    make_bzimage(http_server.root / "vmlinuz")
    (http_server.root / "initrd").write_bytes(b"070701" + bytes(500))

    record = await import_image(
        store,
        image_dir,
        http_server.url("disk.qcow2"),
        name="direct-boot",
        kernel=http_server.url("vmlinuz"),
        initrd=http_server.url("initrd"),
        cmdline="console=ttyS0",
    )

    assert record.kernel is not None
    assert record.initrd is not None
    assert record.cmdline == "console=ttyS0"
    assert entries(image_dir / record.id) == [
        "disk",
        "initrd",
        "kernel",
    ]
    assert record.kernel.sha256 == sha256(image_dir / record.id / "kernel")


async def assert_nothing_left(store: SqliteStore, image_dir: Path) -> None:
    assert entries(image_dir) == []
    assert await image_records(store) == []


async def test_a_qcow2_backed_by_a_host_file_is_refused_and_leaves_nothing(
    store: SqliteStore, image_dir: Path, sources: Path
) -> None:
    attack = sources / "attack.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(attack))
    with pytest.raises(ImageInvalid, match="backing file"):
        await import_image(store, image_dir, str(attack), name="attack")
    await assert_nothing_left(store, image_dir)


async def test_a_vmdk_is_refused_and_leaves_nothing(
    store: SqliteStore, image_dir: Path, sources: Path
) -> None:
    vmdk = sources / "disk.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(vmdk), "1M")
    with pytest.raises(ImageInvalid, match="format 'vmdk' is not accepted"):
        await import_image(store, image_dir, str(vmdk), name="vmdk")
    await assert_nothing_left(store, image_dir)


async def test_a_qcow2_with_an_external_data_file_is_refused_and_leaves_nothing(
    store: SqliteStore, image_dir: Path, sources: Path
) -> None:
    # qemu-img create truncates the data file it is given: only ever one under tmp_path.
    with_data = sources / "with-data.qcow2"
    data_file = sources / "data.raw"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data_file}", str(with_data), "1M")
    with pytest.raises(ImageInvalid, match="external file"):
        await import_image(store, image_dir, str(with_data), name="with-data")
    await assert_nothing_left(store, image_dir)


async def test_a_virtual_size_over_the_maximum_is_refused_and_leaves_nothing(
    store: SqliteStore, image_dir: Path, sources: Path
) -> None:
    big = make_qcow2(sources / "big.qcow2", 2 * MIB)
    with pytest.raises(ImageInvalid, match="over the maximum"):
        await import_image(store, image_dir, str(big), name="big", max_virtual_size=MIB)
    await assert_nothing_left(store, image_dir)


async def test_a_download_over_the_byte_limit_is_refused_and_leaves_nothing(
    store: SqliteStore, image_dir: Path, http_server: HttpServer
) -> None:
    (http_server.root / "disk.raw").write_bytes(bytes(2 * MIB))
    with pytest.raises(ImageInvalid, match="larger than the limit"):
        await import_image(store, image_dir, http_server.url("disk.raw"), name="big", max_bytes=MIB)
    await assert_nothing_left(store, image_dir)


async def test_a_missing_url_is_refused_with_the_http_status_and_leaves_nothing(
    store: SqliteStore, image_dir: Path, http_server: HttpServer
) -> None:
    with pytest.raises(InvalidInput, match="answered HTTP 404"):
        await import_image(store, image_dir, http_server.url("nope.qcow2"), name="nope")
    await assert_nothing_left(store, image_dir)


async def test_a_kernel_that_is_not_a_bzimage_is_refused_and_leaves_nothing(
    store: SqliteStore, image_dir: Path, sources: Path
) -> None:
    disk = make_qcow2(sources / "disk.qcow2")
    (sources / "vmlinux").write_bytes(b"\x7fELF" + bytes(4096))
    with pytest.raises(ImageInvalid, match="not an x86 bzImage"):
        await import_image(
            store, image_dir, str(disk), name="elf-kernel", kernel=str(sources / "vmlinux")
        )
    await assert_nothing_left(store, image_dir)


async def test_a_truncated_qcow2_is_refused_as_damaged(
    store: SqliteStore, image_dir: Path, sources: Path
) -> None:
    whole = make_qcow2(sources / "whole.qcow2").read_bytes()
    cut = sources / "cut.qcow2"
    cut.write_bytes(whole[:200])
    with pytest.raises(ImageInvalid, match="damaged or truncated"):
        await import_image(store, image_dir, str(cut), name="cut")
    await assert_nothing_left(store, image_dir)


async def test_deleting_an_image_removes_record_and_files_and_then_it_is_not_found(
    store: SqliteStore, image_dir: Path, sources: Path
) -> None:
    record = await import_image(store, image_dir, str(make_qcow2(sources / "d.qcow2")), name="d")
    assert await delete_image(store, image_dir, record.id) == record
    await assert_nothing_left(store, image_dir)
    with pytest.raises(NotFound):
        await delete_image(store, image_dir, record.id)
