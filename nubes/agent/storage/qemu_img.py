"""Typed async wrappers over `qemu-img`: inspect, create overlays and blanks, resize, snapshot.

Every call runs through `nubes.process.run_tool_async`. Files are created under a temporary
name in the target's directory and linked into place only when complete, so a failure
never leaves a partial disk where a real one is expected.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from nubes.errors import CommandFailed, Conflict, InvalidInput, NotFound
from nubes.process import run_tool_async

# `qemu-img info` parses untrusted files: a crafted qcow2 can make it allocate or spin
# without end (CVE-2015-5162), so it runs with its address space and CPU time capped.
_INFO_LIMITS = ("prlimit", f"--as={1 << 30}", "--cpu=30", "--")
# `qemu-img check` exit codes (qemu-img(1)).
_CHECK_CORRUPT = 2
_CHECK_LEAKS_ONLY = 3


class DiskSnapshot(NamedTuple):
    """One internal snapshot of a qcow2 disk."""

    name: str
    date: datetime
    vm_state_size: int
    id: str = ""


@dataclass(frozen=True)
class DiskInfo:
    """What `qemu-img info` says about a disk file."""

    format: str
    virtual_size: int
    actual_size: int
    backing_filename: str | None = None
    backing_format: str | None = None
    encrypted: bool = False
    data_file: str | None = None
    snapshots: list[DiskSnapshot] = field(default_factory=list)


def parse_info(document: Mapping[str, Any]) -> DiskInfo:
    """A DiskInfo from the JSON `qemu-img info --output=json` prints.

    Raises:
        ValueError: the document lacks a field every disk has, or a field has the wrong
            type (a qemu-img we do not know).
    """
    try:
        return _parse_info(document)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"unexpected qemu-img info output: {error!r}") from None


def _parse_info(document: Mapping[str, Any]) -> DiskInfo:
    disk_format = str(document["format"])
    virtual_size = int(document["virtual-size"])
    specific = document.get("format-specific")
    data = specific.get("data") if isinstance(specific, Mapping) else None
    backing = document.get("full-backing-filename") or document.get("backing-filename")
    return DiskInfo(
        format=disk_format,
        virtual_size=virtual_size,
        actual_size=int(document.get("actual-size", 0)),
        backing_filename=None if backing is None else str(backing),
        backing_format=document.get("backing-filename-format"),
        encrypted=bool(document.get("encrypted", False)),
        data_file=data.get("data-file") if isinstance(data, Mapping) else None,
        snapshots=[
            DiskSnapshot(
                name=str(entry["name"]),
                date=datetime.fromtimestamp(
                    int(entry.get("date-sec", 0)) + int(entry.get("date-nsec", 0)) / 1e9, UTC
                ),
                vm_state_size=int(entry.get("vm-state-size", 0)),
                id=str(entry.get("id", "")),
            )
            for entry in document.get("snapshots") or []
        ],
    )


async def inspect(path: Path, *, fmt: str | None = None, force_share: bool = False) -> DiskInfo:
    """`qemu-img info` of `path`, read as `fmt` (probed when None: only for untrusted files,
    whose probed format the caller must then validate).

    `force_share` (-U) reads a disk that a running QEMU holds locked; the answer may then
    be slightly stale.

    Raises:
        NotFound: there is no such file.
        Conflict: another process holds the disk and `force_share` is off.
        CommandFailed: qemu-img cannot read it (a damaged or truncated image).
    """
    argv = [*_INFO_LIMITS, "qemu-img", "info", "--output=json"]
    if fmt is not None:
        argv += ["-f", fmt]
    if force_share:
        argv.append("-U")
    argv.append(_file_argument(path))
    output = await _run(argv, path)
    try:
        return parse_info(json.loads(output))
    except ValueError as error:
        raise CommandFailed(argv, 0, str(error)) from None


async def check(path: Path, *, fmt: str = "qcow2") -> bool:
    """`qemu-img check`: False when the image's metadata is corrupt (leaked clusters only
    waste space and pass). `qemu-img info` reads a truncated qcow2 without complaint; this
    does not.

    Only for a disk already known to have no backing or data file: check opens those too.

    Raises:
        NotFound: there is no such file.
        Conflict: another process holds the disk.
        CommandFailed: the check could not run to the end.
    """
    try:
        await _run(
            [*_INFO_LIMITS, "qemu-img", "check", "-q", "-f", fmt, _file_argument(path)], path
        )
    except CommandFailed as error:
        if error.returncode == _CHECK_LEAKS_ONLY:
            return True
        if error.returncode == _CHECK_CORRUPT:
            return False
        raise
    return True


async def create_overlay(
    path: Path, base: Path, base_format: str, size_bytes: int | None = None
) -> None:
    """A new qcow2 at `path` whose backing file is `base` (read as `base_format`), of
    `size_bytes` (None: the base's virtual size).

    Raises:
        Conflict: `path` already exists.
        NotFound: `base` does not exist.
        CommandFailed: qemu-img refused (the message carries its reason).
    """
    backing = _file_argument(base)
    if not _exists(base):
        raise NotFound(f"backing disk {base} does not exist")
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", base_format]
    async with _publishing(path) as partial:
        size = [] if size_bytes is None else [str(size_bytes)]
        await _run([*argv, _file_argument(partial), *size], path)


async def create_blank(path: Path, size_bytes: int) -> None:
    """A new empty qcow2 of `size_bytes` at `path`.

    Raises:
        InvalidInput: `size_bytes` is not positive.
        Conflict: `path` already exists.
        CommandFailed: qemu-img refused.
    """
    if size_bytes <= 0:
        raise InvalidInput(f"a disk needs a positive size, got {size_bytes} bytes")
    async with _publishing(path) as partial:
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", _file_argument(partial), str(size_bytes)]
        await _run(argv, path)


async def resize(path: Path, size_bytes: int, *, fmt: str = "qcow2") -> DiskInfo:
    """Grow the disk at `path` to `size_bytes` (no change when it has that size already).

    Raises:
        InvalidInput: `size_bytes` is smaller than the disk: disks never shrink.
        NotFound: there is no such file.
        Conflict: a running QEMU holds the disk (grow it over QMP `block_resize` instead).
        CommandFailed: qemu-img refused.
    """
    info = await inspect(path, fmt=fmt)
    if size_bytes < info.virtual_size:
        raise InvalidInput(
            f"cannot shrink {path.name} from {info.virtual_size} to {size_bytes} bytes",
            hint="disks only grow: ask for a size at least as large as the current one",
        )
    if size_bytes == info.virtual_size:
        return info
    await _run(["qemu-img", "resize", "-q", "-f", fmt, _file_argument(path), str(size_bytes)], path)
    return await inspect(path, fmt=fmt)


async def snapshot_create(path: Path, name: str) -> None:
    """Take an internal snapshot `name` of the qcow2 at `path`.

    Raises:
        NotFound: no such file.
        Conflict: a snapshot has that name already (qcow2 would allow a second one), or a
            running QEMU holds the disk.
        CommandFailed: qemu-img refused.
    """
    if any(entry.name == name for entry in await snapshot_list(path)):
        raise Conflict(f"disk {path} has a snapshot named {name!r} already")
    await _snapshot("-c", path, name)


async def snapshot_list(path: Path, *, force_share: bool = False) -> list[DiskSnapshot]:
    """The internal snapshots of the qcow2 at `path`, oldest first.

    Raises:
        NotFound: no such file.
        Conflict: a running QEMU holds it and `force_share` is off.
        CommandFailed: qemu-img cannot read it.
    """
    return (await inspect(path, fmt="qcow2", force_share=force_share)).snapshots


async def snapshot_apply(path: Path, name: str) -> None:
    """Revert the qcow2 at `path` to its snapshot `name`.

    Raises:
        NotFound: no such file, or no snapshot has that name.
        Conflict: a running QEMU holds it.
        CommandFailed: qemu-img refused.
    """
    await _snapshot("-a", path, await _snapshot_id(path, name))


async def snapshot_delete(path: Path, name: str) -> None:
    """Delete the snapshot `name` of the qcow2 at `path`.

    Raises:
        NotFound: no such file, or no snapshot has that name.
        Conflict: a running QEMU holds it.
        CommandFailed: qemu-img refused.
    """
    # Unlike -a, -d looks its argument up by name only: the name is the right argument.
    await _snapshot_id(path, name)
    await _snapshot("-d", path, name)


async def _snapshot_id(path: Path, name: str) -> str:
    """The id of the snapshot named `name`.

    `-a` looks its argument up as an id first and as a name only after: given the name
    "2", qemu-img would revert to the snapshot whose id is 2, whatever its name. Passing
    the id itself is the only unambiguous way.

    Raises:
        NotFound: no snapshot has that name.
    """
    for entry in reversed(await snapshot_list(path)):
        if entry.name == name and entry.id:
            return entry.id
    raise NotFound(f"disk {path} has no snapshot named {name!r}")


async def _snapshot(verb: str, path: Path, name: str) -> None:
    if not name or name.startswith("-"):
        raise InvalidInput(f"{name!r} is not a snapshot name")
    # `qemu-img snapshot` has no -f: the format is stated through --image-opts instead,
    # where a comma in the file name is written twice.
    filename = _file_argument(path).replace(",", ",,")
    options = f"driver=qcow2,file.driver=file,file.filename={filename}"
    await _run(["qemu-img", "snapshot", "-q", verb, name, "--image-opts", options], path)


def _file_argument(path: Path) -> str:
    """An absolute path: qemu-img reads `name:rest` as a protocol, but never `/name:rest`."""
    return os.path.abspath(path)


def _exists(path: Path) -> bool:
    """One stat, too quick to be worth a thread."""
    return os.path.lexists(path)


async def _run(argv: Sequence[str], path: Path) -> str:
    """Run qemu-img, turning the failures a caller can act on into their own errors."""
    try:
        return await run_tool_async(argv)
    except CommandFailed as error:
        if "Failed to get" in error.stderr and "lock" in error.stderr:
            raise Conflict(
                f"disk {path} is in use by another process (a running VM?)",
                hint="stop the VM first, or act on the disk through the VM's QEMU",
            ) from error
        if "No such file or directory" in error.stderr and not _exists(path):
            raise NotFound(f"disk {path} does not exist") from error
        raise


@contextlib.asynccontextmanager
async def _publishing(path: Path) -> AsyncIterator[Path]:
    """A temporary name next to `path` to build a file at; linked to `path` on success,
    removed on any failure.

    Raises:
        Conflict: `path` exists already (checked first, and again when linking).
    """
    if _exists(path):
        raise Conflict(f"disk {path} exists already")
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    try:
        yield partial
        try:
            # A link, not a rename: it never replaces a file that appeared meanwhile.
            os.link(partial, path)
        except FileExistsError:
            raise Conflict(f"disk {path} exists already") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
