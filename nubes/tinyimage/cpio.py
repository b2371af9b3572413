"""A reproducible writer of the cpio `newc` archives the Linux kernel unpacks as an initramfs.

Entries are sorted by path, owned by root, stamped with one fixed mtime and numbered
in order, so the same inputs always give the same bytes (GNU cpio would not).
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass
from pathlib import PurePosixPath

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    """One file in the archive: `path` is relative (no leading slash)."""

    path: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0

    @staticmethod
    def directory(path: str, permissions: int = 0o755) -> CpioEntry:
        return CpioEntry(path, stat.S_IFDIR | permissions)

    @staticmethod
    def file(path: str, data: bytes, permissions: int = 0o644) -> CpioEntry:
        return CpioEntry(path, stat.S_IFREG | permissions, data)

    @staticmethod
    def symlink(path: str, target: str) -> CpioEntry:
        return CpioEntry(path, stat.S_IFLNK | 0o777, target.encode())

    @staticmethod
    def char_device(path: str, major: int, minor: int, permissions: int = 0o600) -> CpioEntry:
        return CpioEntry(path, stat.S_IFCHR | permissions, b"", major, minor)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(entry: CpioEntry, inode: int, mtime: int) -> bytes:
    name = entry.path.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        inode,
        entry.mode,
        0,  # uid
        0,  # gid
        nlink,
        mtime,
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev_major,
        entry.rdev_minor,
        len(name),
        0,  # check
    )
    header = _MAGIC + b"".join(b"%08X" % value for value in fields)
    return header + name + _pad4(len(header) + len(name))


def _with_parents(entries: list[CpioEntry]) -> list[CpioEntry]:
    """Adds a directory entry for every parent that the list does not name itself."""
    named = {entry.path for entry in entries}
    missing = set()
    for entry in entries:
        for parent in PurePosixPath(entry.path).parents:
            text = str(parent)
            if text != "." and text not in named:
                missing.add(text)
    return entries + [CpioEntry.directory(path) for path in missing]


def build_newc(entries: list[CpioEntry], mtime: int) -> bytes:
    """The uncompressed archive: parents added, entries sorted by path, then the trailer.

    Raises ValueError when two entries have the same path or a path is absolute.
    """
    paths = [entry.path for entry in entries]
    if len(set(paths)) != len(paths):
        raise ValueError("duplicate paths in cpio archive")
    if any(path.startswith("/") or not path for path in paths):
        raise ValueError("cpio paths must be relative and non-empty")
    chunks = []
    ordered = sorted(_with_parents(entries), key=lambda entry: entry.path)
    for inode, entry in enumerate(ordered, start=1):
        chunks.append(_header(entry, inode, mtime))
        chunks.append(entry.data + _pad4(len(entry.data)))
    chunks.append(_header(CpioEntry(_TRAILER, 0), 0, 0))
    archive = b"".join(chunks)
    return archive + _pad4(len(archive))


def build_initramfs(entries: list[CpioEntry], mtime: int) -> bytes:
    """The archive gzip-compressed with a zero timestamp, as the kernel loads it."""
    return gzip.compress(build_newc(entries, mtime), compresslevel=9, mtime=0)
