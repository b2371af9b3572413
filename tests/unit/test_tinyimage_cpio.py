"""The initramfs writer: sorted, parent-complete, reproducible newc archives."""

from __future__ import annotations

import gzip
import stat

import pytest

from nubes.tinyimage.cpio import CpioEntry, build_initramfs, build_newc


def parse_newc(archive: bytes) -> list[tuple[str, int, int, bytes, int]]:
    """(path, mode, mtime, data, rdev_minor) of each entry, trailer excluded."""
    entries = []
    offset = 0
    while True:
        assert archive[offset : offset + 6] == b"070701"
        fields = [int(archive[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        name_size, file_size = fields[11], fields[6]
        name_start = offset + 110
        name = archive[name_start : name_start + name_size - 1].decode()
        data_start = name_start + name_size + (-(110 + name_size) % 4)
        data = archive[data_start : data_start + file_size]
        offset = data_start + file_size + (-file_size % 4)
        if name == "TRAILER!!!":
            return entries
        entries.append((name, fields[1], fields[5], data, fields[10]))


def test_entries_come_out_sorted_with_their_parent_directories() -> None:
    archive = build_newc(
        [CpioEntry.file("usr/lib/x", b"abc"), CpioEntry.file("init", b"#!/bin/sh\n", 0o755)],
        mtime=1234,
    )
    entries = parse_newc(archive)
    assert [entry[0] for entry in entries] == ["init", "usr", "usr/lib", "usr/lib/x"]
    assert entries[0][1] == stat.S_IFREG | 0o755
    assert stat.S_ISDIR(entries[1][1])
    assert entries[3][3] == b"abc"
    assert {entry[2] for entry in entries} == {1234}
    assert len(archive) % 4 == 0


def test_symlinks_and_device_nodes_are_kept() -> None:
    entries = parse_newc(
        build_newc(
            [CpioEntry.symlink("bin/sh", "busybox"), CpioEntry.char_device("dev/console", 5, 1)],
            mtime=0,
        )
    )
    by_path = {entry[0]: entry for entry in entries}
    assert stat.S_ISLNK(by_path["bin/sh"][1])
    assert by_path["bin/sh"][3] == b"busybox"
    assert stat.S_ISCHR(by_path["dev/console"][1])
    assert by_path["dev/console"][4] == 1


def test_the_same_entries_in_any_order_give_the_same_bytes() -> None:
    entries = [CpioEntry.file(f"f{i}", bytes([i]) * i) for i in range(10)]
    assert build_initramfs(entries, 7) == build_initramfs(list(reversed(entries)), 7)
    assert gzip.decompress(build_initramfs(entries, 7)) == build_newc(entries, 7)


def test_duplicate_or_absolute_paths_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        build_newc([CpioEntry.file("a", b""), CpioEntry.file("a", b"x")], 0)
    with pytest.raises(ValueError, match="relative"):
        build_newc([CpioEntry.file("/etc/passwd", b"")], 0)
