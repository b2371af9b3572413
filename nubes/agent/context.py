"""What every controller of one agent shares: the store, this host's identity and paths,
the image cache, the cgroup door, and the in-memory view of the records it follows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nubes.agent.compute.cgroup import CpuWeights
from nubes.agent.compute.qemu_cmdline import Accelerator
from nubes.agent.paths import AgentPaths
from nubes.agent.runtime import VmRuntime
from nubes.agent.storage.images import ImageCache
from nubes.config import AgentConfig
from nubes.metrics.reconcile import ReconcileMetrics
from nubes.model.host import HostCapacity
from nubes.model.vm import VmRecord
from nubes.model.volume import VolumeRecord
from nubes.store.base import Store

if TYPE_CHECKING:
    from nubes.agent.network.manager import NetworkManager


class LaunchGate:
    """Lets VMs that are prepared together spawn their QEMUs together.

    Preparing a start (store writes, disks) takes the agent a few milliseconds of CPU;
    a QEMU, once spawned, takes whole CPUs to initialize and boot. Spawning each QEMU
    as soon as it is ready would starve the preparation of the others on a small host,
    so a prepared start waits (briefly) until no other start is still being prepared.
    """

    def __init__(self, longest_wait: float = 0.5) -> None:
        self.longest_wait = longest_wait
        self._preparing = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def preparing(self) -> Iterator[Callable[[], Awaitable[None]]]:
        """Marks one start as being prepared; the function it gives says "prepared" and
        waits for the others. Leaving the block without calling it is fine too."""
        done = False

        async def prepared() -> None:
            nonlocal done
            if not done:
                done = True
                self._leave()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.longest_wait)

        self._preparing += 1
        self._idle.clear()
        try:
            yield prepared
        finally:
            if not done:
                self._leave()

    def _leave(self) -> None:
        self._preparing -= 1
        if self._preparing == 0:
            self._idle.set()


@dataclass
class AgentContext:
    store: Store
    config: AgentConfig
    paths: AgentPaths
    accel: Accelerator
    images: ImageCache
    cpu_weights: CpuWeights
    capacity: HostCapacity
    host_rebooted: bool = False
    vms: dict[str, VmRecord] = field(default_factory=dict)
    volumes: dict[str, VolumeRecord] = field(default_factory=dict)
    volume_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    launch_gate: LaunchGate = field(default_factory=LaunchGate)
    reconcile_metrics: ReconcileMetrics = field(default_factory=ReconcileMetrics)
    # Set by the agent: wake the controller of a VM or a volume.
    kick_vm: Callable[[str], None] = lambda _vm_id: None
    kick_volume: Callable[[str], None] = lambda _volume_id: None
    # Set by the agent: every live QEMU on this host, by VM id.
    runtimes: Callable[[], dict[str, VmRuntime]] = dict
    # Set by the agent: tenant networking (ports, namespaces, metadata).
    network_manager: NetworkManager | None = None

    @property
    def network(self) -> NetworkManager:
        assert self.network_manager is not None, "the agent sets up networking first"
        return self.network_manager

    @property
    def host(self) -> str:
        return self.config.host

    def volume_lock(self, volume_id: str) -> asyncio.Lock:
        """Serializes everything done to one volume file (hotplug, snapshots, resize)."""
        return self.volume_locks.setdefault(volume_id, asyncio.Lock())

    def holder_of(self, volume_id: str) -> tuple[str, VmRuntime] | None:
        """The VM whose QEMU has the volume plugged in right now, whatever its spec says."""
        for vm_id, runtime in self.runtimes().items():
            if volume_id in runtime.launch.attached_volumes():
                return vm_id, runtime
        return None

    def vm_using_volume(self, volume_id: str) -> str | None:
        """The VM on this host whose spec lists the volume, if any."""
        for vm_id, record in self.vms.items():
            if volume_id in record.spec.volumes and record.spec.host == self.host:
                return vm_id
        return None
