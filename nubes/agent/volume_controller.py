"""The reconciler of one volume kept on this host: its qcow2 file, its size, its snapshots.

When the volume is plugged into a running VM, the change goes through that VM's QMP
session (QEMU holds the file); otherwise through qemu-img.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nubes.agent.context import AgentContext
from nubes.agent.controller import Controller
from nubes.agent.runtime import VmRuntime
from nubes.agent.status import differs
from nubes.agent.storage import qemu_img, snapshots
from nubes.agent.storage.images import CachedImage
from nubes.agent.storage.pools import LOCAL_POOL, StoragePools, UnknownPool, shared_base
from nubes.agent.storage.volumes import delete_volume, ensure_volume, grow_volume
from nubes.errors import InvalidInput, NotFound, NubesError
from nubes.model.common import now
from nubes.model.image import ImageRecord
from nubes.model.volume import SnapshotInfo, VolumeRecord, VolumeState, VolumeStatus
from nubes.store.base import Compare, Delete
from nubes.store.keys import Kind, resource_key

log = logging.getLogger(__name__)
GIB = 1024**3


class VolumeController(Controller):
    """Owns one volume id on this host for as long as the volume is kept here."""

    def __init__(self, context: AgentContext, volume_id: str) -> None:
        super().__init__(context, Kind.VOLUME, volume_id)
        self.volume_id = volume_id
        # (spec revision, holding VM) of the last pass that did the file work.
        self._applied: tuple[int, str | None] | None = None
        self._pools = StoragePools(context.paths.state_dir, context.config.storage_pools)

    async def reconcile(self, *, resync: bool = False) -> None:
        kv = await self.ctx.store.get(self.key)
        record = None
        if kv is not None:
            try:
                record = VolumeRecord.from_json(kv.value)
            except InvalidInput as error:
                await self._write(None, state=VolumeState.ERROR, reason=str(error))
                return
        status_kv = await self.status_writer.read()
        status = None if status_kv is None else _status_or_none(status_kv.value)
        kept_here = record is not None and record.spec.host == self.ctx.host
        try:
            pool = self._pools.get(record.spec.pool if record else LOCAL_POOL, host=self.ctx.host)
        except UnknownPool as error:
            if kept_here:
                await self._write(status, state=VolumeState.ERROR, reason=str(error))
                return
            pool = self._pools.get(LOCAL_POOL, host=self.ctx.host)  # not ours: nothing here
        path = pool.volume(self.volume_id)

        if record is None or not kept_here:
            # Gone, or kept elsewhere now: drop what this host holds, unless a VM still uses
            # it. A file on a shared pool is never this host's to drop: its new host uses it.
            if self.ctx.holder_of(self.volume_id) is None:
                if not pool.shared:
                    await delete_volume(path)
                if status is not None and status.host == self.ctx.host:
                    await self.status_writer.delete()
                self.ctx.volumes.pop(self.volume_id, None)
                self.finished = True
            return
        self.ctx.volumes[self.volume_id] = record
        # What QEMU holds decides how to touch the file; the spec decides who it belongs to.
        holder = self.ctx.holder_of(self.volume_id)
        runtime = holder[1] if holder else None
        plugged = runtime is not None
        user = self.ctx.vm_using_volume(self.volume_id) or (holder[0] if holder else None)

        if record.deleting:
            if user is not None or plugged:
                await self._write(
                    status,
                    state=VolumeState.IN_USE,
                    attached_to=user,
                    reason=f"cannot delete: attached to VM {user}; detach it first",
                )
                return
            async with self.ctx.volume_lock(self.volume_id):
                await delete_volume(path)
            result = await self.ctx.store.txn(
                [Compare.mod_revision(self.key, "==", kv.mod_revision if kv else 0)],
                [Delete(self.key), Delete(self.status_writer.key)],
            )
            if result.succeeded:
                self.ctx.volumes.pop(self.volume_id, None)
                self.finished = True
            else:
                self.kick()
            return

        spec = record.spec
        revision = kv.mod_revision if kv else 0
        applied = (revision, holder[0] if holder else None)
        if (
            applied == self._applied
            and status is not None
            and status.state in (VolumeState.AVAILABLE, VolumeState.IN_USE)
            and path.exists()
        ):
            # Nothing changed since the last pass that did the work: only who uses it may.
            await self._write(
                status,
                state=VolumeState.IN_USE if user else VolumeState.AVAILABLE,
                attached_to=user,
            )
            return
        if (
            not path.exists()
            and status is not None
            and status.state in (VolumeState.AVAILABLE, VolumeState.IN_USE)
        ):
            await self._write(
                status,
                state=VolumeState.ERROR,
                reason=f"the file of volume {self.volume_id} is gone from host {self.ctx.host}; "
                "restore it, or delete the volume",
            )
            return
        try:
            async with self.ctx.volume_lock(self.volume_id):
                reason, revert_counter, observed = await self._converge_file(
                    record, status, path, runtime, user
                )
        except NubesError as error:
            self._applied = None
            await self._write(status, state=VolumeState.ERROR, reason=error.message)
            return
        self._applied = applied
        await self._write(
            status,
            state=VolumeState.IN_USE if user else VolumeState.AVAILABLE,
            reason=reason,
            size_gb=spec.size_gb,
            attached_to=user,
            snapshots=observed,
            revert_counter=revert_counter,
        )
        if user is not None:
            self.ctx.kick_vm(user)

    async def _converge_file(
        self,
        record: VolumeRecord,
        status: VolumeStatus | None,
        path: Path,
        runtime: VmRuntime | None,
        user: str | None,
    ) -> tuple[str | None, int, list[SnapshotInfo]]:
        """Makes the file match the spec: (why something waits, the revert counter carried
        out, the snapshots seen). Through QMP when a QEMU holds it, else qemu-img.

        Raises:
            NubesError: qemu-img or QEMU refused; the message says why.
        """
        spec = record.spec
        reason: str | None = None
        revert_counter = status.revert_counter if status else 0
        plugged = runtime is not None
        if not _exists(path):
            status = await self._write(status, state=VolumeState.CREATING, reason=None)
            base = await self._base_image(spec.image)
            pool = self._pools.get(spec.pool, host=self.ctx.host)
            if base is not None and pool.shared:
                base = await shared_base(pool, base)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            await ensure_volume(path, spec.size_gb, base)
        if runtime is not None and runtime.session is not None:
            session = runtime.session
            info = await qemu_img.inspect(path, fmt="qcow2", force_share=True)
            if info.virtual_size < spec.size_gb * GIB:
                await session.block_resize(self.volume_id, spec.size_gb * GIB)
            have = {snapshot.name for snapshot in info.snapshots}
            for name in spec.snapshots:
                if name not in have:
                    await session.snapshot_create(self.volume_id, name)
            for name in have - set(spec.snapshots):
                await session.snapshot_delete(self.volume_id, name)
            if spec.revert is not None and spec.revert.counter != revert_counter:
                reason = (
                    f"cannot revert to {spec.revert.snapshot} while VM {user} runs "
                    "with the volume; stop the VM or detach the volume"
                )
        else:
            await grow_volume(path, spec.size_gb, running=False)
            have = {s.name for s in await snapshots.list_snapshots(path)}
            for name in spec.snapshots:
                if name not in have:
                    await snapshots.create_snapshot(path, name)
            for name in have - set(spec.snapshots):
                await snapshots.delete_snapshot(path, name)
            if spec.revert is not None and spec.revert.counter != revert_counter:
                await snapshots.revert_snapshot(path, spec.revert.snapshot)
                revert_counter = spec.revert.counter
        observed = await snapshots.list_snapshots(path, force_share=plugged)
        return reason, revert_counter, observed

    async def _base_image(self, image_id: str | None) -> CachedImage | None:
        if image_id is None:
            return None
        image_kv = await self.ctx.store.get(resource_key(Kind.IMAGE, image_id))
        if image_kv is None:
            raise NotFound(f"image {image_id} does not exist", hint="give an existing image")
        return await self.ctx.images.ensure(ImageRecord.from_json(image_kv.value))

    async def _write(self, base: VolumeStatus | None, **changes: object) -> VolumeStatus:
        fields: dict[str, object] = (
            base.model_dump() if base is not None else {"state": VolumeState.CREATING}
        )
        fields.update(changes)
        fields["host"] = self.ctx.host
        fields["updated_at"] = now()
        new = VolumeStatus.model_validate(fields)
        if differs(base, new) and not await self.status_writer.write(new):
            self.kick()
        return new


def _exists(path: Path) -> bool:
    return path.exists()


def _status_or_none(document: object) -> VolumeStatus | None:
    try:
        return VolumeStatus.from_json(document)
    except InvalidInput:
        return None
