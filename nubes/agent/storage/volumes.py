"""Volume and VM root disk files on a host: qcow2 overlays on cached images, or blank.

Paths are built only from validated ids, so no request string ever becomes a path. Every
operation is idempotent: it makes the file so, and does nothing when it already is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from nubes.agent.storage import qemu_img
from nubes.agent.storage.images import CachedImage
from nubes.agent.storage.qcow2 import write_overlay
from nubes.agent.storage.qemu_img import DiskInfo
from nubes.errors import Conflict, InvalidInput
from nubes.ids import IdKind, validate_id
from nubes.model.volume import MAX_VOLUME_GB

GIB = 1 << 30


def volume_path(state_dir: Path, volume_id: str) -> Path:
    """`<state_dir>/volumes/<vol-id>.qcow2`.

    Raises:
        InvalidId: `volume_id` is not a volume id.
    """
    return state_dir / "volumes" / f"{validate_id(volume_id, IdKind.VOLUME)}.qcow2"


def root_disk_path(state_dir: Path, vm_id: str) -> Path:
    """`<state_dir>/vms/<vm-id>/root.qcow2`.

    Raises:
        InvalidId: `vm_id` is not a VM id.
    """
    return state_dir / "vms" / validate_id(vm_id, IdKind.VM) / "root.qcow2"


def size_in_bytes(size_gb: int) -> int:
    """The byte size of a disk of `size_gb` GiB, as QMP `block_resize` and qemu-img take it.

    Raises:
        InvalidInput: not between 1 and MAX_VOLUME_GB.
    """
    if not 1 <= size_gb <= MAX_VOLUME_GB:
        raise InvalidInput(f"a disk size is 1 to {MAX_VOLUME_GB} GiB, got {size_gb}")
    return size_gb * GIB


async def ensure_volume(path: Path, size_gb: int, base: CachedImage | None) -> DiskInfo:
    """Make the volume at `path`: an overlay on the cached image `base`, or a blank qcow2,
    of `size_gb` GiB. An existing volume of that size is left as it is; a smaller one grows.

    Raises:
        InvalidInput: the size is out of range, or smaller than the image's virtual size.
        Conflict: the file exists and is larger, or rests on another backing file.
        CommandFailed: qemu-img refused.
    """
    size = size_in_bytes(size_gb)
    if base is not None and size < base.virtual_size:
        needed = -(-base.virtual_size // GIB)
        raise InvalidInput(
            f"a volume of {size_gb} GiB is smaller than image {base.id} "
            f"({base.virtual_size} bytes)",
            hint=f"ask for at least {needed} GiB",
        )
    return await _ensure_disk(path, size, base)


async def ensure_root_disk(path: Path, image: CachedImage, size_gb: int) -> DiskInfo:
    """Make a VM's root disk at `path`: an overlay on the cached `image`, of `size_gb` GiB
    (0: the image's own virtual size). An existing disk of that size is left as it is.

    Raises:
        InvalidInput: the size is out of range or smaller than the image's virtual size.
        Conflict: the file exists and is larger, or rests on another backing file.
        CommandFailed: qemu-img refused.
    """
    size = image.virtual_size if size_gb == 0 else size_in_bytes(size_gb)
    if size < image.virtual_size:
        raise InvalidInput(
            f"a root disk of {size_gb} GiB is smaller than image {image.id} "
            f"({image.virtual_size} bytes)",
            hint=f"choose a flavor with at least {-(-image.virtual_size // GIB)} GiB of disk",
        )
    if _exists(path):
        return await _check_existing(path, size, image)
    # A new VM's disk is on the path of every start: written in-process (qcow2.py), no
    # qemu-img run. The cached image is verified and its size known.
    _make_parent(path)
    backing = Path(_absolute(image.disk))
    try:
        await asyncio.to_thread(write_overlay, path, backing, image.format.value, size)
    except FileExistsError:
        return await _check_existing(path, size, image)
    return qemu_img.DiskInfo(
        format="qcow2",
        virtual_size=size,
        actual_size=0,
        backing_filename=_absolute(image.disk),
        backing_format=image.format.value,
    )


async def grow_volume(path: Path, size_gb: int, *, running: bool) -> int:
    """Grow the volume at `path` to `size_gb` GiB and return the new size in bytes.

    When a running QEMU holds the disk (`running`), the file is not touched: the caller
    grows it through that QEMU with QMP `block_resize` to the returned size.

    Raises:
        InvalidInput: the size is out of range or smaller than the volume: volumes never shrink.
        NotFound: there is no such volume.
        Conflict: `running` is false but a QEMU holds the disk.
        CommandFailed: qemu-img refused.
    """
    size = size_in_bytes(size_gb)
    if not running:
        await qemu_img.resize(path, size, fmt="qcow2")
        return size
    info = await qemu_img.inspect(path, fmt="qcow2", force_share=True)
    if size < info.virtual_size:
        raise InvalidInput(
            f"cannot shrink volume {path.stem} from {info.virtual_size} to {size} bytes",
            hint="volumes only grow",
        )
    return size


async def delete_volume(path: Path) -> None:
    """Remove the volume file at `path`; nothing when it is gone already."""
    _remove(path)


async def _ensure_disk(path: Path, size: int, base: CachedImage | None) -> DiskInfo:
    _make_parent(path)
    try:
        if base is None:
            await qemu_img.create_blank(path, size)
        else:
            await qemu_img.create_overlay(path, base.disk, base.format.value, size)
    except Conflict:
        if not _exists(path):
            raise
        return await _check_existing(path, size, base)
    return await qemu_img.inspect(path, fmt="qcow2")


async def _check_existing(path: Path, size: int, base: CachedImage | None) -> DiskInfo:
    info = await qemu_img.inspect(path, fmt="qcow2", force_share=True)
    wanted_backing = None if base is None else _absolute(base.disk)
    if info.backing_filename != wanted_backing:
        raise Conflict(
            f"disk {path} exists with backing file {info.backing_filename!r}, "
            f"not {wanted_backing!r}",
            hint="delete it first, or ask for the image it was made from",
        )
    if info.virtual_size > size:
        raise Conflict(
            f"disk {path} exists with {info.virtual_size} bytes, more than the {size} asked",
            hint="disks never shrink: ask for its current size or more",
        )
    if info.virtual_size < size:
        return await qemu_img.resize(path, size, fmt="qcow2")
    return info


def _make_parent(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)


def _absolute(path: Path) -> str:
    """A backing file as create_overlay records it: absolute."""
    return os.path.abspath(path)


def _exists(path: Path) -> bool:
    return path.exists()


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
