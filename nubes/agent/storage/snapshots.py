"""Internal qcow2 snapshots of volumes that no QEMU holds: create, list, revert, delete.

A volume in use by a running VM is snapshotted through its QEMU instead; these refuse it
with Conflict, because qemu-img cannot take the disk's lock.
"""

from __future__ import annotations

import re
from pathlib import Path

from nubes.agent.storage import qemu_img
from nubes.errors import InvalidInput, NotFound
from nubes.model.common import NAME_PATTERN
from nubes.model.volume import SnapshotInfo


def check_snapshot_name(name: str) -> str:
    """Return `name` when it is a valid snapshot name.

    Raises:
        InvalidInput: it is not 1 to 63 letters, digits, '.', '_' or '-' starting with a
            letter or digit.
    """
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise InvalidInput(
            f"{name!r} is not a valid snapshot name",
            hint="1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


async def list_snapshots(path: Path, *, force_share: bool = False) -> list[SnapshotInfo]:
    """The snapshots of the volume at `path`, oldest first; `force_share` reads it while a
    running QEMU holds it.

    Raises:
        NotFound: there is no such volume.
        Conflict: a running QEMU holds it and `force_share` is off.
        CommandFailed: qemu-img cannot read it.
    """
    return [
        SnapshotInfo(name=entry.name, created_at=entry.date, vm_state=entry.vm_state_size > 0)
        for entry in await qemu_img.snapshot_list(path, force_share=force_share)
    ]


async def create_snapshot(path: Path, name: str) -> None:
    """Snapshot the volume at `path` as `name`; nothing when that snapshot exists already.

    Raises:
        InvalidInput: a bad name.
        NotFound: there is no such volume.
        Conflict: a running QEMU holds it.
        CommandFailed: qemu-img refused.
    """
    check_snapshot_name(name)
    if name not in await _names(path):
        await qemu_img.snapshot_create(path, name)


async def revert_snapshot(path: Path, name: str) -> None:
    """Roll the volume at `path` back to its snapshot `name`.

    Raises:
        InvalidInput: a bad name.
        NotFound: there is no such volume, or it has no snapshot `name`.
        Conflict: a running QEMU holds it.
        CommandFailed: qemu-img refused.
    """
    check_snapshot_name(name)
    names = await _names(path)
    if name not in names:
        known = ", ".join(names) or "none"
        raise NotFound(
            f"volume {path.stem} has no snapshot {name!r}", hint=f"its snapshots: {known}"
        )
    await qemu_img.snapshot_apply(path, name)


async def delete_snapshot(path: Path, name: str) -> None:
    """Delete the snapshot `name` of the volume at `path`; nothing when it is gone already.

    Raises:
        InvalidInput: a bad name.
        NotFound: there is no such volume.
        Conflict: a running QEMU holds it.
        CommandFailed: qemu-img refused.
    """
    check_snapshot_name(name)
    if name in await _names(path):
        await qemu_img.snapshot_delete(path, name)


async def _names(path: Path) -> list[str]:
    return [entry.name for entry in await qemu_img.snapshot_list(path)]
