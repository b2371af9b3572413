"""What every controller of one agent shares: the store, this host's identity and paths,
the image cache, the cgroup door, and the in-memory view of the records it follows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from nubes.agent.compute.cgroup import CpuWeights
from nubes.agent.compute.qemu_cmdline import Accelerator
from nubes.agent.paths import AgentPaths
from nubes.agent.runtime import VmRuntime
from nubes.agent.storage.images import ImageCache
from nubes.config import AgentConfig
from nubes.model.host import HostCapacity
from nubes.model.vm import VmRecord
from nubes.model.volume import VolumeRecord
from nubes.store.base import Store


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
    # Set by the agent: wake the controller of a VM or a volume.
    kick_vm: Callable[[str], None] = lambda _vm_id: None
    kick_volume: Callable[[str], None] = lambda _volume_id: None
    # Set by the agent: the live QEMU of a VM on this host, if it has one.
    runtime_of: Callable[[str], VmRuntime | None] = lambda _vm_id: None

    @property
    def host(self) -> str:
        return self.config.host

    def volume_lock(self, volume_id: str) -> asyncio.Lock:
        """Serializes everything done to one volume file (hotplug, snapshots, resize)."""
        return self.volume_locks.setdefault(volume_id, asyncio.Lock())

    def vm_using_volume(self, volume_id: str) -> str | None:
        """The VM on this host whose spec lists the volume, if any."""
        for vm_id, record in self.vms.items():
            if volume_id in record.spec.volumes and record.spec.host == self.host:
                return vm_id
        return None
