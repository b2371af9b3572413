"""This host in the store: its record (capacity, accelerator, boot id) and the lease-bound
heartbeat that tells the cluster the agent is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

from nubes import __version__
from nubes.agent.compute.qemu_cmdline import Accelerator
from nubes.config import Accel
from nubes.errors import InvalidInput, LeaseNotFound, StoreError
from nubes.model.common import now
from nubes.model.host import HostCapacity, HostRecord
from nubes.store.base import Compare, Put, Store
from nubes.store.keys import Kind, host_alive_key, host_stopped_key, resource_key

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


KVM_PROBE_SECONDS = 6.0
KVM_PROBE_FILE = "kvm-probe.json"


def kvm_boots_guests(qemu: str, kernel: Path, timeout: float | None = None) -> bool:
    """Whether KVM runs `kernel`: booted with no root disk it panics and QEMU exits
    (in well under a second under KVM); where KVM answers but guests hang, it does not.
    """
    argv = [
        qemu, "-accel", "kvm", "-machine", "q35", "-m", "128", "-nodefaults",
        "-display", "none", "-serial", "none", "-monitor", "none", "-no-reboot",
        "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 root=/dev/nonexistent",
    ]  # fmt: skip
    try:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    except OSError:
        return False
    try:
        return process.wait(KVM_PROBE_SECONDS if timeout is None else timeout) == 0
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False


def probe_kernel(image_dir: Path) -> Path | None:
    """A stock kernel to probe KVM with: the host's own, one of a registered image, or
    the tiny image's (scripts/setup builds it)."""
    from nubes.tinyimage.builder import default_cache_directory

    candidates = [Path(f"/boot/vmlinuz-{os.uname().release}")]
    with contextlib.suppress(OSError):
        candidates += sorted(image_dir.glob("*/kernel"))
    candidates.append(default_cache_directory() / "latest" / "vmlinuz")
    return next((path for path in candidates if os.access(path, os.R_OK)), None)


def choose_accelerator(
    setting: Accel,
    *,
    qemu: str = "qemu-system-x86_64",
    state_dir: Path | None = None,
    image_dir: Path | None = None,
) -> Accelerator:
    """`auto` is KVM when it runs a guest kernel, else TCG; the others are taken as said.

    /dev/kvm may answer the KVM API yet hang every guest (nested virtualisation gone
    wrong), so `auto` boots a kernel under KVM once per host boot and remembers the
    answer in `state_dir`. With no kernel to try, a KVM that answers is trusted.
    """
    if setting is not Accel.AUTO:
        return Accelerator(setting.value)
    if not kvm_usable():
        return Accelerator.TCG
    kernel = probe_kernel(image_dir) if image_dir is not None else None
    if kernel is None:
        return Accelerator.KVM
    record = state_dir / KVM_PROBE_FILE if state_dir is not None else None
    boot_id = host_boot_id()
    if record is not None:
        with contextlib.suppress(OSError, ValueError):
            known = json.loads(record.read_text())
            if known.get("boot_id") == boot_id and isinstance(known.get("kvm_boots"), bool):
                return Accelerator.KVM if known["kvm_boots"] else Accelerator.TCG
    works = kvm_boots_guests(qemu, kernel)
    if not works:
        log.warning(
            "KVM answers but did not boot %s within %.0f s: VMs run under TCG (slow); "
            'set [agent] accel = "kvm" to insist',
            kernel,
            KVM_PROBE_SECONDS,
        )
    if record is not None:
        with contextlib.suppress(OSError):
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"boot_id": boot_id, "kvm_boots": works}))
    return Accelerator.KVM if works else Accelerator.TCG


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
        await self._store.delete(host_stopped_key(self._record.name))  # alive again
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
        """Stops the heartbeat; writes the `stopped` key, then removes the alive key at once
        (a clean shutdown: the VMs run on, the host's fencer keeps `stopped` alive)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._lease:
            with contextlib.suppress(StoreError):
                lease = await self._store.lease_grant(self._ttl)
                await self._store.put(
                    host_stopped_key(self._record.name),
                    {"since": now().isoformat(), "boot_id": self._record.boot_id},
                    lease=lease.id,
                )
            with contextlib.suppress(StoreError):
                await self._store.lease_revoke(self._lease)
