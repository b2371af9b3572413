"""What a VM's next QEMU looks like on this host: its root disk (made if needed, on the
VM's storage pool), its volumes' disks, its network and the command line.
"""

from __future__ import annotations

from nubes.agent.compute.qemu_cmdline import DiskFormat, KernelBoot, QemuPlan, build_qemu_argv
from nubes.agent.context import AgentContext
from nubes.agent.runtime import LaunchedDisk, LaunchRecord
from nubes.agent.storage.pools import StoragePool, StoragePools, shared_base
from nubes.agent.storage.volumes import ensure_root_disk
from nubes.errors import InvalidInput, NotFound, NubesError
from nubes.model.image import ImageRecord
from nubes.model.vm import VmRecord
from nubes.model.volume import VolumeState, VolumeStatus
from nubes.store.keys import Kind, resource_key, status_key


class WaitingFor(NubesError):
    """Something the VM needs is on its way (a volume being made): build when it is ready."""

    code = "waiting"


class LaunchPlanner:
    """Plans the starts of one VM on this host."""

    def __init__(self, ctx: AgentContext, vm_id: str) -> None:
        self.ctx = ctx
        self.vm_id = vm_id
        self.pools = StoragePools(ctx.paths.state_dir, ctx.config.storage_pools)

    async def plan(
        self, record: VmRecord, pool: StoragePool | None = None
    ) -> tuple[LaunchRecord, QemuPlan]:
        """The disks and command line of the VM's next start (makes the root disk if needed).

        Raises:
            NubesError: the image or a volume is missing or unusable, or the VM asks for
                something this host cannot give; the message says which.
        """
        spec = record.spec
        if pool is None:
            pool = self.pools.get(spec.storage_pool, host=self.ctx.host)
        if spec.image is None:
            raise InvalidInput("the VM has no image; give it one to boot from")
        capacity = self.ctx.capacity
        if spec.flavor.memory_mb > capacity.memory_mb:
            raise InvalidInput(
                f"flavor {spec.flavor.name} asks for {spec.flavor.memory_mb} MiB of memory; "
                f"host {self.ctx.host} has {capacity.memory_mb} MiB",
                hint="choose a smaller flavor",
            )
        image_kv = await self.ctx.store.get(resource_key(Kind.IMAGE, spec.image))
        if image_kv is None:
            raise NotFound(
                f"image {spec.image} does not exist",
                hint="register the image, or give the VM an existing one",
            )
        image = ImageRecord.from_json(image_kv.value)
        cached = await self.ctx.images.ensure(image)
        root = pool.root_disk(self.vm_id)
        root.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The launch record and serial log stay local, whatever the pool.
        self.ctx.paths.vm_state_dir(self.vm_id).mkdir(parents=True, exist_ok=True, mode=0o700)
        # On a shared pool the overlay rests on the pool's copy: every host reads it.
        base = await shared_base(pool, cached) if pool.shared else cached
        await ensure_root_disk(root, base, spec.flavor.disk_gb)
        disks = [LaunchedDisk(node="root", path=str(root), format=DiskFormat.QCOW2, serial="root")]
        for volume_id in spec.volumes:
            disks.append(await self.volume_disk(volume_id, port=None))
        network = await self.ctx.network.prepare(record)
        kernel_boot = None
        if cached.kernel is not None:
            kernel_boot = KernelBoot(
                kernel=cached.kernel, initrd=cached.initrd, cmdline=cached.cmdline or ""
            )
        plan = QemuPlan(
            vm_id=self.vm_id,
            prefix=self.ctx.config.prefix,
            accel=self.ctx.accel,
            machine=self.ctx.config.machine,
            vcpus=spec.flavor.vcpus,
            memory_mb=spec.flavor.memory_mb,
            paths=self.ctx.paths.runtime(self.vm_id, vnc=spec.vnc),
            disks=tuple(disk.plan() for disk in disks),
            kernel_boot=kernel_boot,
            nics=network.nics if network is not None else (),
            hotplug_slots=self.ctx.config.hotplug_slots,
            qemu=self.ctx.config.qemu,
        )
        argv = build_qemu_argv(plan)
        launch = LaunchRecord(
            vm_id=self.vm_id,
            flavor=spec.flavor,
            disks=disks,
            vnc=spec.vnc,
            network=network.vpc_id if network is not None else None,
            netns=network.netns if network is not None else None,
            ports=list(network.ports) if network is not None else [],
            argv=argv,
        )
        return launch, plan

    async def volume_disk(self, volume_id: str, *, port: str | None) -> LaunchedDisk:
        """The disk of a volume that is ready on this host and used by no other VM.

        Raises:
            NubesError: the volume is missing, elsewhere, not ready, or in use.
        """
        volume = self.ctx.volumes.get(volume_id)
        if volume is None:
            raise NotFound(f"volume {volume_id} does not exist", hint="create it first")
        if volume.spec.host != self.ctx.host:
            raise InvalidInput(
                f"volume {volume_id} is on host {volume.spec.host}, not on {self.ctx.host}",
                hint="attach volumes that live on the VM's host",
            )
        for other_id, other in self.ctx.vms.items():
            if other_id != self.vm_id and volume_id in other.spec.volumes:
                raise InvalidInput(
                    f"volume {volume_id} is attached to VM {other_id}",
                    hint="detach it there first",
                )
        path = self.pools.get(volume.spec.pool, host=self.ctx.host).volume(volume_id)
        status_kv = await self.ctx.store.get(status_key(Kind.VOLUME, volume_id))
        volume_status = None if status_kv is None else VolumeStatus.from_json(status_kv.value)
        if volume_status is not None and volume_status.state is VolumeState.ERROR:
            raise InvalidInput(
                f"volume {volume_id} is in error: {volume_status.reason}",
                hint="fix or detach the volume",
            )
        ready = volume_status is not None and volume_status.state in (
            VolumeState.AVAILABLE,
            VolumeState.IN_USE,
        )
        if not ready or not path.exists():
            raise WaitingFor(f"waiting for volume {volume_id} to be available")
        return LaunchedDisk(
            node=volume_id,
            volume=volume_id,
            path=str(path),
            format=DiskFormat.QCOW2,
            serial=volume_id,
            port=port,
        )
