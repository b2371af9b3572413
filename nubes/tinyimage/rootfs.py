"""The root filesystem's content: busybox, dropbear, the libraries they need, guest files.

`rootfs_entries` is pure (bytes in, entries out); `write_tree` puts the entries into a
staging directory with fixed modes and timestamps for `mkfs.ext4 -d`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from nubes.tinyimage.cpio import CpioEntry
from nubes.tinyimage.elf import is_elf, needed_libraries
from nubes.tinyimage.errors import ImageBuildError

LIBRARY_DIRECTORY = "lib/x86_64-linux-gnu"

# Files of the guest tree that are not plain 0644 files.
GUEST_FILE_MODES = {
    "usr/lib/nubes/boot": 0o755,
    "usr/lib/nubes/udhcpc-event": 0o755,
    "usr/lib/nubes/shutdown": 0o755,
    "usr/lib/nubes/disk-event": 0o755,
    "etc/acpi/power-button": 0o755,
    "etc/shadow": 0o600,
}

_DIRECTORIES = {
    "bin": 0o755,
    "dev": 0o755,
    "etc": 0o755,
    "etc/acpi": 0o755,
    "etc/dropbear": 0o700,
    "lib": 0o755,
    LIBRARY_DIRECTORY: 0o755,
    "mnt": 0o755,
    "proc": 0o555,
    "root": 0o700,
    "root/.ssh": 0o700,
    "run": 0o755,
    "sys": 0o555,
    "tmp": 0o1777,
    "usr": 0o755,
    "usr/lib": 0o755,
    "usr/lib/nubes": 0o755,
    "var": 0o755,
    "var/lib": 0o755,
    "var/lib/nubes": 0o700,
    "var/log": 0o755,
}

_SYMLINKS = {
    "sbin": "bin",
    "usr/bin": "../bin",
    "usr/sbin": "../bin",
    "lib64": LIBRARY_DIRECTORY,
}


def library_closure(
    binaries: Iterable[bytes], find_library: Callable[[str], bytes | None]
) -> dict[str, bytes]:
    """Soname -> content of every shared library the binaries need, transitively.

    Raises ImageBuildError when a needed library is in none of the library packages.
    """
    found: dict[str, bytes] = {}
    pending = [name for binary in binaries if is_elf(binary) for name in needed_libraries(binary)]
    while pending:
        soname = pending.pop()
        if soname in found:
            continue
        content = find_library(soname)
        if content is None:
            raise ImageBuildError(
                f"shared library {soname} is in none of the image's library packages",
                hint="add its Debian package to LIBRARY_PACKAGES in nubes/tinyimage/recipe.py",
            )
        found[soname] = content
        pending.extend(needed_libraries(content))
    return found


def rootfs_entries(
    programs: Mapping[str, bytes],
    libraries: Mapping[str, bytes],
    applets: Iterable[str],
    guest_files: Mapping[str, bytes],
) -> list[CpioEntry]:
    """Everything in the root filesystem.

    `programs` maps target paths (bin/busybox) to content; busybox `applets` become
    symlinks in bin/ unless a program has that name; `guest_files` are the package's
    guest/rootfs tree.
    """
    entries = [CpioEntry.directory(path, mode) for path, mode in _DIRECTORIES.items()]
    entries += [CpioEntry.symlink(path, target) for path, target in _SYMLINKS.items()]
    entries += [CpioEntry.file(path, data, 0o755) for path, data in programs.items()]
    entries += [
        CpioEntry.file(f"{LIBRARY_DIRECTORY}/{soname}", data, 0o755)
        for soname, data in libraries.items()
    ]
    taken = set(programs)
    entries += [
        CpioEntry.symlink(f"bin/{applet}", "busybox")
        for applet in sorted(set(applets))
        if f"bin/{applet}" not in taken and applet != "busybox"
    ]
    entries += [
        CpioEntry.file(path, data, GUEST_FILE_MODES.get(path, 0o644))
        for path, data in guest_files.items()
        if path not in _DIRECTORIES
    ]
    return entries


def write_tree(entries: Iterable[CpioEntry], root: Path, mtime: int) -> None:
    """Creates the entries under ROOT with their modes, every timestamp set to MTIME.

    Device nodes are not supported (the guest mounts devtmpfs).
    """
    ordered = sorted(entries, key=lambda entry: entry.path)
    for entry in ordered:
        path = root / entry.path
        path.parent.mkdir(parents=True, exist_ok=True)
        kind = stat.S_IFMT(entry.mode)
        if kind == stat.S_IFDIR:
            path.mkdir(exist_ok=True)
        elif kind == stat.S_IFLNK:
            path.symlink_to(entry.data.decode())
        elif kind == stat.S_IFREG:
            path.write_bytes(entry.data)
        else:
            raise ImageBuildError(f"cannot put {entry.path} (mode {entry.mode:o}) in the root fs")
        if kind != stat.S_IFLNK:
            path.chmod(stat.S_IMODE(entry.mode))
    # Children first, so setting a directory's time is not undone by writing into it.
    for current, directories, files in os.walk(root, topdown=False):
        for name in [*files, *directories]:
            os.utime(Path(current) / name, (mtime, mtime), follow_symlinks=False)
    os.utime(root, (mtime, mtime))
