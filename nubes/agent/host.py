"""This host in the store: its record (capacity, accelerator, boot id) and the lease-bound
heartbeat that tells the cluster the agent is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
from pathlib import Path

from nubes import __version__
from nubes.agent.compute.qemu_cmdline import Accelerator
from nubes.config import Accel
from nubes.errors import InvalidInput, LeaseNotFound, StoreError
from nubes.model.common import now
from nubes.model.host import HostCapacity, HostRecord
from nubes.store.base import Compare, Put, Store
from nubes.store.keys import Kind, host_alive_key, resource_key

log = logging.getLogger(__name__)

_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def kvm_usable() -> bool:
    """Whether /dev/kvm opens and speaks the KVM API (it may exist yet be unusable)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _KVM_GET_API_VERSION) == _KVM_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


def choose_accelerator(setting: Accel) -> Accelerator:
    """`auto` is KVM when it is usable, else TCG; the others are taken as said."""
    if setting is Accel.AUTO:
        return Accelerator.KVM if kvm_usable() else Accelerator.TCG
    return Accelerator(setting.value)


def host_boot_id() -> str:
    """The kernel's id of this boot: it changes exactly when the host reboots."""
    return BOOT_ID_PATH.read_text().strip()


def measure_capacity(state_dir: Path) -> HostCapacity:
    """What this host offers guests: its CPUs, memory and the disk under the state dir."""
    memory_kb = 0
    with Path("/proc/meminfo").open() as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory_kb = int(line.split()[1])
                break
    existing = state_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # before the agent made its directories
    disk = shutil.disk_usage(existing)
    return HostCapacity(
        vcpus=os.cpu_count() or 1,
        memory_mb=max(1, memory_kb // 1024),
        disk_gb=disk.total // 1024**3,
    )


class HostRegistration:
    """Writes the host record, then keeps a lease alive with the `alive` key bound to it.

    When the agent dies the lease expires and the key vanishes: that is how the
    scheduler and the cluster learn a host is gone.
    """

    def __init__(self, store: Store, record: HostRecord, ttl: int) -> None:
        self._store = store
        self._record = record
        self._ttl = ttl
        self._lease = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Registers the host and starts the heartbeat.

        Raises:
            StoreError: the store cannot be written.
        """
        key = resource_key(Kind.HOST, self._record.name)
        for _ in range(8):
            kv = await self._store.get(key)
            record = self._record
            if kv is not None:
                # Labels belong to the operator (PATCH /v1/hosts): a restart keeps them.
                with contextlib.suppress(InvalidInput):
                    previous = HostRecord.from_json(kv.value)
                    record = record.model_copy(update={"labels": previous.labels})
            guard = Compare.absent(key) if kv is None else Compare.unchanged(kv)
            if (await self._store.txn([guard], [Put(key, record.to_json())])).succeeded:
                self._record = record
                break
        else:
            await self._store.put(key, self._record.to_json())
        await self._grant()
        self._task = asyncio.create_task(self._beat(), name=f"heartbeat {self._record.name}")

    async def _grant(self) -> None:
        lease = await self._store.lease_grant(self._ttl)
        self._lease = lease.id
        await self._store.put(
            host_alive_key(self._record.name),
            {"agent_version": __version__, "since": now().isoformat()},
            lease=self._lease,
        )

    async def _beat(self) -> None:
        interval = max(0.5, self._ttl / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._store.lease_keepalive(self._lease)
            except LeaseNotFound:
                # The store lost our lease (a long pause, a store restart): take a new one.
                log.warning("heartbeat lease of %s expired; registering again", self._record.name)
                with contextlib.suppress(StoreError):
                    await self._grant()
            except StoreError as error:
                log.warning("heartbeat of %s failed: %s", self._record.name, error)

    async def stop(self) -> None:
        """Stops the heartbeat and removes the alive key at once (a clean shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._lease:
            with contextlib.suppress(StoreError):
                await self._store.lease_revoke(self._lease)
