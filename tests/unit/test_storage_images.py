"""The pure rules of the storage layer: which disks, kernels, sources, names and paths pass."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from nubes.agent.storage.fetch import check_source, describe_source, fetch
from nubes.agent.storage.images import (
    BZIMAGE_MAGIC_OFFSET,
    MAX_INITRD_BYTES,
    MAX_KERNEL_BYTES,
    check_import_request,
    validate_disk,
    validate_initrd,
    validate_kernel,
)
from nubes.agent.storage.qemu_img import DiskInfo, DiskSnapshot, parse_info
from nubes.agent.storage.snapshots import check_snapshot_name
from nubes.agent.storage.volumes import root_disk_path, size_in_bytes, volume_path
from nubes.errors import ImageInvalid, InvalidId, InvalidInput

MIB = 1 << 20


def disk(fmt: str = "qcow2", virtual_size: int = 64 * MIB, **changes: object) -> DiskInfo:
    fields: dict[str, object] = {
        "format": fmt,
        "virtual_size": virtual_size,
        "actual_size": 200_704,
    }
    fields.update(changes)
    return DiskInfo(**fields)  # type: ignore[arg-type]


def test_a_plain_qcow2_and_a_raw_disk_pass() -> None:
    validate_disk(disk("qcow2"), 200_704, max_virtual_size=1 << 30)
    validate_disk(disk("raw", 4096), 4096, max_virtual_size=1 << 30)


@pytest.mark.parametrize("fmt", ["vmdk", "vhdx", "luks", "vdi", "qed", "parallels", "dmg"])
def test_formats_other_than_qcow2_and_raw_are_refused_with_a_convert_hint(fmt: str) -> None:
    with pytest.raises(ImageInvalid, match=f"format '{fmt}' is not accepted") as caught:
        validate_disk(disk(fmt), 4096, max_virtual_size=1 << 30)
    assert caught.value.hint is not None
    assert "qemu-img convert" in caught.value.hint
    assert caught.value.code == "image_invalid"


def test_a_probe_that_disagrees_with_the_declared_format_is_refused() -> None:
    with pytest.raises(ImageInvalid, match="declared raw but qemu-img reads it as qcow2"):
        validate_disk(disk("qcow2"), 4096, max_virtual_size=1 << 30, expected_format="raw")


def test_a_qcow2_pointing_at_a_host_file_as_backing_is_refused() -> None:
    info = disk(backing_filename="/etc/shadow", backing_format="raw")
    with pytest.raises(ImageInvalid, match=r"backing file \('/etc/shadow'\)"):
        validate_disk(info, 200_704, max_virtual_size=1 << 30)


def test_an_external_data_file_is_refused() -> None:
    with pytest.raises(ImageInvalid, match="external file"):
        validate_disk(disk(data_file="/dev/sda"), 200_704, max_virtual_size=1 << 30)


def test_an_encrypted_disk_is_refused() -> None:
    with pytest.raises(ImageInvalid, match="encrypted"):
        validate_disk(disk(encrypted=True), 200_704, max_virtual_size=1 << 30)


def test_a_virtual_size_of_zero_is_refused() -> None:
    with pytest.raises(ImageInvalid, match="virtual size of 0"):
        validate_disk(disk(virtual_size=0), 200_704, max_virtual_size=1 << 30)


def test_a_virtual_size_over_the_maximum_is_refused() -> None:
    validate_disk(disk(virtual_size=1 << 30), 200_704, max_virtual_size=1 << 30)
    with pytest.raises(ImageInvalid, match="over the maximum"):
        validate_disk(disk(virtual_size=(1 << 30) + 1), 200_704, max_virtual_size=1 << 30)


def test_an_empty_raw_file_is_refused() -> None:
    with pytest.raises(ImageInvalid, match="raw disk file is empty"):
        validate_disk(disk("raw", 0), 0, max_virtual_size=1 << 30)


def test_qemu_img_info_json_with_backing_data_file_and_snapshots_parses() -> None:
    info = parse_info(
        {
            "format": "qcow2",
            "virtual-size": 1536,
            "actual-size": 200704,
            "backing-filename": "passwd",
            "full-backing-filename": "/etc/passwd",
            "backing-filename-format": "raw",
            "encrypted": True,
            "format-specific": {"type": "qcow2", "data": {"data-file": "d.raw"}},
            "snapshots": [{"id": "1", "name": "s1", "date-sec": 1_700_000_000, "vm-state-size": 5}],
        }
    )
    assert info.backing_filename == "/etc/passwd"
    assert info.backing_format == "raw"
    assert info.encrypted
    assert info.data_file == "d.raw"
    assert info.snapshots == [
        DiskSnapshot("s1", datetime.fromtimestamp(1_700_000_000, UTC), 5, id="1")
    ]


def test_qemu_img_info_of_a_plain_raw_disk_parses_without_optional_fields() -> None:
    info = parse_info({"format": "raw", "virtual-size": 1024, "actual-size": 4096})
    assert info == DiskInfo("raw", 1024, 4096)


def bzimage_header() -> bytes:
    header = bytearray(0x300)
    header[BZIMAGE_MAGIC_OFFSET : BZIMAGE_MAGIC_OFFSET + 4] = b"HdrS"
    return bytes(header)


def test_a_bzimage_header_passes_as_a_kernel() -> None:
    validate_kernel(bzimage_header(), 10 * MIB)


@pytest.mark.parametrize(
    "header",
    [b"\x7fELF" + bytes(0x300), bytes(0x300), b"\x1f\x8b\x08" + bytes(0x300), b"HdrS"],
    ids=["vmlinux-elf", "zeros", "gzip", "too-short"],
)
def test_files_that_are_not_a_bzimage_are_refused_as_kernels(header: bytes) -> None:
    with pytest.raises(ImageInvalid, match="not an x86 bzImage"):
        validate_kernel(header, len(header))


def test_an_oversized_kernel_is_refused() -> None:
    with pytest.raises(ImageInvalid, match="over the limit"):
        validate_kernel(bzimage_header(), MAX_KERNEL_BYTES + 1)


def test_an_initrd_must_be_non_empty_and_under_the_limit() -> None:
    validate_initrd(1)
    with pytest.raises(ImageInvalid, match="empty"):
        validate_initrd(0)
    with pytest.raises(ImageInvalid, match="over the limit"):
        validate_initrd(MAX_INITRD_BYTES + 1)


@pytest.mark.parametrize(
    "source", ["file:///etc/shadow", "ftp://example.com/disk.img", "FILE:///x", "gopher://h/x", ""]
)
def test_sources_other_than_paths_and_http_urls_are_refused(source: str) -> None:
    with pytest.raises(InvalidInput):
        check_source(source)


@pytest.mark.parametrize(
    "source", ["http://h/disk.qcow2", "HTTPS://h/d", "/srv/disk.qcow2", "disk:1.img", "d.raw"]
)
def test_local_paths_and_http_urls_are_accepted_sources(source: str) -> None:
    check_source(source)


def names_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


async def test_fetching_an_ftp_url_fails_before_creating_any_file(tmp_path: Path) -> None:
    target = tmp_path / "disk"
    with pytest.raises(InvalidInput, match="'ftp' is not supported"):
        await fetch("ftp://example.com/disk.img", target, max_bytes=1 << 20)
    assert names_in(tmp_path) == []


async def test_fetching_a_missing_local_file_leaves_no_target(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        await fetch(str(tmp_path / "missing"), tmp_path / "disk", max_bytes=1 << 20)
    assert names_in(tmp_path) == []


async def test_a_local_file_over_the_limit_is_refused_and_not_kept(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(bytes(2048))
    with pytest.raises(ImageInvalid, match="larger than the limit of 1024 bytes"):
        await fetch(str(tmp_path / "big"), tmp_path / "disk", max_bytes=1024)
    assert names_in(tmp_path) == ["big"]


def test_a_recorded_url_loses_its_credentials_and_query() -> None:
    shown = describe_source("https://user:secret@example.com:8443/img.qcow2?X-Amz-Signature=abc#f")
    assert shown == "https://example.com:8443/img.qcow2"


def test_a_recorded_local_source_is_an_absolute_path() -> None:
    assert describe_source("disk.qcow2") == str(Path.cwd() / "disk.qcow2")


@pytest.mark.parametrize("name", ["", "-rf", "../x", "a/b", "x" * 64, "é"])
def test_bad_image_names_are_refused_before_any_fetch(name: str) -> None:
    with pytest.raises(InvalidInput, match="not a valid image name"):
        check_import_request("/srv/disk", name, None, None, None)


def test_an_initrd_or_cmdline_without_a_kernel_is_refused() -> None:
    with pytest.raises(InvalidInput, match="needs a kernel"):
        check_import_request("/srv/disk", "ok", None, "/srv/initrd", None)
    with pytest.raises(InvalidInput, match="needs a kernel"):
        check_import_request("/srv/disk", "ok", None, None, "console=ttyS0")


def test_a_kernel_url_of_another_scheme_is_refused() -> None:
    with pytest.raises(InvalidInput, match="'file' is not supported"):
        check_import_request("/srv/disk", "ok", "file:///boot/vmlinuz", None, None)


@pytest.mark.parametrize("name", ["", "-d", "a b", "../x", "x" * 64])
def test_bad_snapshot_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput, match="not a valid snapshot name"):
        check_snapshot_name(name)


def test_good_snapshot_names_pass() -> None:
    assert check_snapshot_name("before-upgrade.1") == "before-upgrade.1"


def test_volume_and_root_disk_paths_come_only_from_valid_ids(tmp_path: Path) -> None:
    assert volume_path(tmp_path, "vol-abcdefghij") == tmp_path / "volumes/vol-abcdefghij.qcow2"
    assert root_disk_path(tmp_path, "i-abcdefghij") == tmp_path / "vms/i-abcdefghij/root.qcow2"
    for bad in ("../../etc/passwd", "vol-ABCDEFGHIJ", "i-abcdefghij"):
        with pytest.raises(InvalidId):
            volume_path(tmp_path, bad)
    with pytest.raises(InvalidId):
        root_disk_path(tmp_path, "vol-abcdefghij")


def test_disk_sizes_are_whole_gib_within_the_volume_limit() -> None:
    assert size_in_bytes(1) == 1 << 30
    for bad in (0, -1, 16 * 1024 + 1):
        with pytest.raises(InvalidInput):
            size_in_bytes(bad)
