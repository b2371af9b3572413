"""The host agent: registers this host, adopts the QEMU processes it left running, and
drives one controller per VM and per volume from store watches plus a periodic resync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from nubes import __version__
from nubes.agent.compute.cgroup import CgroupError, CpuWeights
from nubes.agent.compute.process import find_vm_process
from nubes.agent.context import AgentContext
from nubes.agent.fence import ensure_fencer, remove_agent_pidfile, write_agent_pidfile
from nubes.agent.host import (
    HostRegistration,
    choose_accelerator,
    host_boot_id,
    measure_capacity,
)
from nubes.agent.migration import incoming_here
from nubes.agent.network.manager import NetworkManager
from nubes.agent.paths import AgentPaths
from nubes.agent.runtime import LaunchRecord, VmRuntime
from nubes.agent.storage.images import ImageCache
from nubes.agent.vm_controller import VmController
from nubes.agent.volume_controller import VolumeController
from nubes.config import NubesConfig
from nubes.errors import CompactedError, InvalidInput, StoreError
from nubes.ids import IdKind, is_id
from nubes.metrics.agent import AgentMetrics
from nubes.model.common import now
from nubes.model.host import HostRecord
from nubes.model.vm import VmRecord
from nubes.model.volume import VolumeRecord
from nubes.store.base import EventType, JsonValue, Store
from nubes.store.keys import ROOT, Kind, kind_prefix

log = logging.getLogger(__name__)

_NETWORK_KINDS = (
    Kind.NETWORK,
    Kind.SUBNET,
    Kind.PORT,
    Kind.SECURITY_GROUP,
    Kind.FLOATING_IP,
    Kind.KEYPAIR,
)
_NETWORK_KIND_NAMES = frozenset(kind.value for kind in _NETWORK_KINDS)
WATCH_RETRY_SECONDS = 1.0
FIRST_PASS_WAIT_SECONDS = 30.0


class Agent:
    """One per host. `start()` returns once every known VM has had its first pass."""

    def __init__(self, config: NubesConfig, store: Store) -> None:
        agent_config = config.agent
        self.config = config
        self.store = store
        self.paths = AgentPaths(state_dir=config.agent_state_dir, run_dir=agent_config.run_dir)
        self.ctx = AgentContext(
            store=store,
            config=agent_config,
            paths=self.paths,
            accel=choose_accelerator(
                agent_config.accel,
                qemu=agent_config.qemu,
                state_dir=config.agent_state_dir,
                image_dir=config.image_dir,
            ),
            images=ImageCache(config.image_dir, self.paths.image_cache),
            cpu_weights=CpuWeights(agent_config.prefix),
            capacity=measure_capacity(self.paths.state_dir),
        )
        self.ctx.kick_vm = self._kick_vm
        self.ctx.kick_volume = self._kick_volume
        self.ctx.runtimes = self._runtimes
        self.network = NetworkManager(self.ctx, self._spawn)
        self.ctx.network_manager = self.network
        self.metrics = AgentMetrics(self.ctx)
        self.vm_controllers: dict[str, VmController] = {}
        self.volume_controllers: dict[str, VolumeController] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._registration: HostRegistration | None = None

    @property
    def host(self) -> str:
        return self.ctx.host

    async def start(self) -> None:
        """Registers the host, takes over what runs, and starts following the store.

        Raises:
            StoreError: the store cannot be reached.
        """
        self.paths.make_dirs()
        write_agent_pidfile(self.paths)
        try:
            ensure_fencer(self.config, self.paths)
        except OSError as error:
            log.error("cannot start the fencer (a cut-off host will not end its VMs): %s", error)
        boot_id = host_boot_id()
        previous = _read_text(self.paths.boot_id_file)
        self.ctx.host_rebooted = previous is not None and previous != boot_id
        record = HostRecord(
            name=self.host,
            capacity=self.ctx.capacity,
            accel=self.ctx.accel.value,
            underlay_address=str(self.config.agent.underlay_address),
            storage_pools=sorted(self.config.agent.storage_pools),
            agent_version=__version__,
            boot_id=boot_id,
            started_at=now(),
        )
        self._registration = HostRegistration(self.store, record, self.config.agent.heartbeat_ttl)
        await self._registration.start()
        await self.network.start()
        self._preclaim_ports()
        revision = await self._list_everything()
        first_passes = list(self.vm_controllers.values())
        self._spawn(self._follow(revision), "watch")
        self._spawn(self._resync_forever(), "resync")
        await self._wait_first_passes(first_passes)
        self.network.sweep_leftovers()
        self.paths.boot_id_file.write_text(boot_id + "\n")
        await self.metrics.start()
        log.info(
            "agent %s up (%s, %d VMs, %d volumes)",
            self.host,
            self.ctx.accel.value,
            len(self.vm_controllers),
            len(self.volume_controllers),
        )

    async def stop(self) -> None:
        """Stops following the store; VMs keep running, to be adopted by the next agent."""
        await self.metrics.stop()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for controller in self.vm_controllers.values():
            if controller.runtime is not None:
                await controller.runtime.close()
        await self.network.stop()
        if self._registration is not None:
            await self._registration.stop()
        remove_agent_pidfile(self.paths)  # the fencer keeps the host's `stopped` key alive
        self.ctx.cpu_weights.remove_root()  # only when no VM group is left in it

    # -- following the store ---------------------------------------------------------------

    def _preclaim_ports(self) -> None:
        """Claims the ports of every QEMU still running here, before any controller runs."""
        for vm_id in self._local_vm_ids():
            pidfile = self.paths.runtime(vm_id).pidfile
            if find_vm_process(pidfile, self.config.agent.prefix, vm_id) is None:
                continue
            launch = LaunchRecord.load(self.paths.launch_record(vm_id))
            if launch is not None and launch.network is not None:
                self.network.preclaim(vm_id, launch.network, tuple(launch.ports))

    async def _list_everything(self) -> int:
        revision = 0
        for kind in _NETWORK_KINDS:
            listed = await self.store.range(kind_prefix(kind))
            revision = listed.revision if revision == 0 else min(revision, listed.revision)
            for kv in listed.kvs:
                self._on_change(kv.key, kv.value)
        volumes = await self.store.range(kind_prefix(Kind.VOLUME))
        for kv in volumes.kvs:
            self._on_change(kv.key, kv.value)
        # Where ports are and how to reach hosts: the overlay across hosts (l2pop).
        hosts = await self.store.range(kind_prefix(Kind.HOST))
        for kv in hosts.kvs:
            self._on_change(kv.key, kv.value)
        vms = await self.store.range(kind_prefix(Kind.VM))
        for kv in vms.kvs:
            self._on_change(kv.key, kv.value)
        for vm_id in self._local_vm_ids():
            self._vm_controller(vm_id).kick()
        # From the earliest listing on: a record written while the later kinds were being
        # listed is seen again (handlers are idempotent) rather than missed for good.
        return min(revision, volumes.revision, hosts.revision, vms.revision)

    async def _follow(self, revision: int) -> None:
        next_revision = revision + 1
        while True:
            try:
                async with self.store.watch(ROOT, from_revision=next_revision) as watch:
                    async for event in watch:
                        next_revision = event.revision + 1
                        deleted = event.type is EventType.DELETE
                        self._on_change(event.key, None if deleted else event.value)
            except CompactedError:
                log.warning("watch fell behind compaction; listing everything again")
                next_revision = await self._list_everything() + 1
            except StoreError as error:
                log.warning("watch broke (%s); retrying", error)
                await asyncio.sleep(WATCH_RETRY_SECONDS)

    def _on_change(self, key: str, value: JsonValue | None) -> None:
        parts = key[len(ROOT) :].split("/")
        if len(parts) < 2:
            return
        kind, name, rest = parts[0], parts[1], parts[2:]
        if kind == Kind.VM.value and is_id(name, IdKind.VM):
            if rest == ["migration"] and name in self.vm_controllers:
                self.vm_controllers[name].kick()  # a move's progress, from the other end
            if rest:
                return  # our own status writes
            self._on_vm(name, value)
        elif kind == Kind.VOLUME.value and is_id(name, IdKind.VOLUME):
            if rest == ["status"]:
                user = self.ctx.vm_using_volume(name)
                if user is not None:
                    self._kick_vm(user)
            elif not rest:
                self._on_volume(name, value)
        elif kind in _NETWORK_KIND_NAMES and not rest:
            self.network.on_record(Kind(kind), name, value)
        elif kind == Kind.PORT.value and rest == ["status"]:
            self.network.on_port_status(name, value)
        elif kind == Kind.HOST.value and not rest:
            self.network.on_host(name, value)
        elif kind == Kind.IMAGE.value and not rest:
            # A VM in error for want of this image tries again now.
            for vm_id, record in self.ctx.vms.items():
                controller = self.vm_controllers.get(vm_id)
                if record.spec.image == name and controller is not None:
                    controller.kick(resync=True)

    def _on_vm(self, vm_id: str, value: JsonValue | None) -> None:
        record = None
        if value is not None:
            with contextlib.suppress(InvalidInput):
                record = VmRecord.from_json(value)
        if record is None:
            self.ctx.vms.pop(vm_id, None)
        else:
            self.ctx.vms[vm_id] = record
        # An invalid record is still ours to report on when it names this host.
        bound_here = _host_of(value) == self.host
        # The target of a live move runs the incoming QEMU before the VM is bound to it.
        bound_here = bound_here or (record is not None and incoming_here(record, self.host))
        if bound_here or vm_id in self.vm_controllers:
            self._vm_controller(vm_id).kick()
        if record is not None:
            for volume_id in record.spec.volumes:
                self._kick_volume(volume_id)

    def _on_volume(self, volume_id: str, value: JsonValue | None) -> None:
        record = None
        if value is not None:
            with contextlib.suppress(InvalidInput):
                record = VolumeRecord.from_json(value)
        if record is not None and record.spec.host == self.host:
            self.ctx.volumes[volume_id] = record
        else:
            self.ctx.volumes.pop(volume_id, None)
        if (record is not None and record.spec.host == self.host) or (
            volume_id in self.volume_controllers
        ):
            self._volume_controller(volume_id).kick()
        user = self.ctx.vm_using_volume(volume_id)
        if user is not None:
            self._kick_vm(user)

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.agent.resync_interval)
            for vm_id in self._local_vm_ids():
                self._vm_controller(vm_id)
            for controller in list(self.vm_controllers.values()):
                controller.kick(resync=True)
            running = {vm for vm, c in self.vm_controllers.items() if c.runtime is not None}
            for vm_id in self.ctx.cpu_weights.orphans(running):
                with contextlib.suppress(CgroupError):
                    self.ctx.cpu_weights.remove(vm_id)
            for volume_controller in list(self.volume_controllers.values()):
                volume_controller.kick(resync=True)
            self.network.kick_all(resync=True)

    # -- controllers -----------------------------------------------------------------------

    def _vm_controller(self, vm_id: str) -> VmController:
        controller = self.vm_controllers.get(vm_id)
        if controller is None:
            controller = self.vm_controllers[vm_id] = VmController(self.ctx, vm_id)
            self._spawn(self._run_controller(self.vm_controllers, vm_id, controller), vm_id)
        return controller

    def _volume_controller(self, volume_id: str) -> VolumeController:
        controller = self.volume_controllers.get(volume_id)
        if controller is None:
            controller = self.volume_controllers[volume_id] = VolumeController(self.ctx, volume_id)
            self._spawn(
                self._run_controller(self.volume_controllers, volume_id, controller), volume_id
            )
        return controller

    async def _run_controller(
        self, registry: dict[str, Any], name: str, controller: VmController | VolumeController
    ) -> None:
        try:
            await controller.run()
        finally:
            if registry.get(name) is controller:
                del registry[name]

    def _kick_vm(self, vm_id: str) -> None:
        controller = self.vm_controllers.get(vm_id)
        if controller is not None:
            controller.kick()
        elif vm_id in self.ctx.vms and self.ctx.vms[vm_id].spec.host == self.host:
            self._vm_controller(vm_id).kick()

    def _kick_volume(self, volume_id: str) -> None:
        controller = self.volume_controllers.get(volume_id)
        if controller is not None:
            controller.kick()

    def _runtimes(self) -> dict[str, VmRuntime]:
        return {
            vm_id: controller.runtime
            for vm_id, controller in self.vm_controllers.items()
            if controller.runtime is not None
        }

    def _local_vm_ids(self) -> set[str]:
        """VMs this host has files or processes for, known to the store or not."""
        found = set()
        for directory in (self.paths.vms_state, self.paths.vms_run):
            with contextlib.suppress(FileNotFoundError):
                for entry in directory.iterdir():
                    if is_id(entry.name, IdKind.VM):
                        found.add(entry.name)
        return found

    async def _wait_first_passes(self, controllers: list[VmController]) -> None:
        # A first pass is done once the controller has tried adoption and gone idle.
        deadline = asyncio.get_running_loop().time() + FIRST_PASS_WAIT_SECONDS
        while any(c.busy() for c in controllers if not c.finished):
            if asyncio.get_running_loop().time() > deadline:
                log.warning("some VMs are still converging; going on without waiting")
                return
            await asyncio.sleep(0.01)

    def _spawn(self, coroutine: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _host_of(document: JsonValue | None) -> object:
    """The spec.host of a record, read without validating the rest of it."""
    if isinstance(document, dict):
        spec = document.get("spec")
        if isinstance(spec, dict):
            return spec.get("host")
    return None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None
