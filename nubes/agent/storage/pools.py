"""Storage pools: where a VM's root disk and a volume's file live. `local` is the agent's
state dir; a shared pool is a directory every host mounts at the same path (NFS, CephFS).

On a shared pool a disk's backing image is copied into the pool once (`images/`), so the
overlay's absolute backing path reads the same on every host. Paths come from validated
ids only.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from nubes.agent.storage.images import CachedImage
from nubes.errors import InvalidInput
from nubes.ids import IdKind, validate_id

LOCAL_POOL = "local"


class UnknownPool(InvalidInput):
    """A VM or a volume names a storage pool this host does not have."""

    code = "unknown_storage_pool"


@dataclass(frozen=True)
class StoragePool:
    """One pool as this host mounts it; `shared` pools are seen by every host."""

    name: str
    root: Path
    shared: bool

    def vm_dir(self, vm_id: str) -> Path:
        """`<root>/vms/<vm id>`: the VM's files in this pool.

        Raises:
            InvalidId: `vm_id` is not a VM id.
        """
        return self.root / "vms" / validate_id(vm_id, IdKind.VM)

    def root_disk(self, vm_id: str) -> Path:
        """`<root>/vms/<vm id>/root.qcow2`.

        Raises:
            InvalidId: `vm_id` is not a VM id.
        """
        return self.vm_dir(vm_id) / "root.qcow2"

    def volume(self, volume_id: str) -> Path:
        """`<root>/volumes/<volume id>.qcow2`.

        Raises:
            InvalidId: `volume_id` is not a volume id.
        """
        return self.root / "volumes" / f"{validate_id(volume_id, IdKind.VOLUME)}.qcow2"

    def base_image(self, image_id: str, disk_format: str) -> Path:
        """`<root>/images/<image id>.<format>`: the backing file of the pool's overlays.

        Raises:
            InvalidId: `image_id` is not an image id.
        """
        if disk_format not in ("qcow2", "raw"):
            raise InvalidInput(f"an image format is qcow2 or raw, got {disk_format!r}")
        return self.root / "images" / f"{validate_id(image_id, IdKind.IMAGE)}.{disk_format}"


class StoragePools:
    """The pools of one host: `local` (the agent's state dir) and the configured shared ones."""

    def __init__(self, state_dir: Path, shared: Mapping[str, Path]) -> None:
        self._pools = {LOCAL_POOL: StoragePool(LOCAL_POOL, state_dir, shared=False)}
        for name, root in shared.items():
            self._pools[name] = StoragePool(name, root, shared=True)

    def get(self, name: str, *, host: str) -> StoragePool:
        """The pool called `name`.

        Raises:
            UnknownPool: this host has no such pool.
        """
        pool = self._pools.get(name)
        if pool is None:
            raise UnknownPool(
                f"storage pool {name!r} is not configured on host {host} "
                f"(it has: {', '.join(sorted(self._pools))})",
                hint="add it to storage_pools in the [agent] config of every host, or "
                "choose a pool the host has",
            )
        return pool

    @property
    def shared_names(self) -> list[str]:
        """The shared pools, sorted: what the host record advertises to the scheduler."""
        return sorted(name for name, pool in self._pools.items() if pool.shared)


async def shared_base(pool: StoragePool, cached: CachedImage) -> CachedImage:
    """`cached` with its disk copied into the shared `pool` (once, by whichever host comes
    first), so that overlays in the pool rest on a file every host reads at one path.

    Raises:
        OSError: the pool cannot be written.
    """
    target = pool.base_image(cached.id, cached.format.value)
    if not target.exists():
        await asyncio.to_thread(_publish_copy, cached.disk, target)
    return replace(cached, disk=target)


def _publish_copy(source: Path, target: Path) -> None:
    """Copies `source` to `target` through a temporary file and a rename, under a lock
    file in the pool, so concurrent makers (on any host) never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    with _locked(target.parent / f".{target.name}.lock"):
        if target.exists():
            return
        staging = target.parent / f".{target.name}.{os.getpid()}.tmp"
        try:
            shutil.copyfile(source, staging)
            staging.chmod(0o444)
            with open(staging, "rb") as stream:
                os.fsync(stream.fileno())
            staging.rename(target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                staging.unlink()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # flock is honoured across hosts by NFSv4 and CephFS, and between processes here.
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def remove_vm_files(pool: StoragePool, vm_id: str) -> None:
    """Removes a VM's files from `pool` (nothing when absent).

    Raises:
        InvalidId: `vm_id` is not a VM id.
    """
    shutil.rmtree(pool.vm_dir(vm_id), ignore_errors=True)
