"""Volumes and their snapshots: records the agent of the volume's host makes real.

A volume is bound to a host when it is made if exactly one host is alive (the all-in-one
node); otherwise it waits unbound (no file, no status) until it is attached to a VM, which
binds it to the VM's host (the VM routes do). Sizes grow only; snapshots and reverts
are spec changes the agent carries out and reports in the status.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from enum import StrEnum
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import ConfigDict, Field

from nubes.api.context import Caller, CallerDep, ContextDep
from nubes.api.imageops import find_image
from nubes.api.netops import takes_reference
from nubes.api.openapi_links import link, links
from nubes.api.params import CursorQuery, LimitQuery
from nubes.api.records import DEFAULT_PAGE, Guards, Records, name_guard
from nubes.errors import Conflict, InvalidInput, NotFound
from nubes.ids import IdKind, new_id
from nubes.model.common import NAME_PATTERN, Model, now
from nubes.model.project import Usage
from nubes.model.vm import PowerState, VmRecord
from nubes.model.volume import (
    MAX_VOLUME_GB,
    VolumeRecord,
    VolumeRevert,
    VolumeSpec,
    VolumeStatus,
)
from nubes.store.base import Compare, Store
from nubes.store.keys import Kind, attachment_claim, kind_prefix, name_key, resource_key

router = APIRouter(tags=["volumes"])

GIB = 1 << 30
MAX_SNAPSHOTS = 32


class VolumeView(VolumeRecord):
    status: VolumeStatus | None = None


class VolumePage(Model):
    items: list[VolumeView]
    next: str | None = None


class VolumeCreate(Model):
    name: str = Field(pattern=NAME_PATTERN)
    size_gb: int | None = Field(
        default=None, ge=1, le=MAX_VOLUME_GB, description="default: the image's size"
    )
    image: str | None = Field(default=None, max_length=128, description="id or name")
    pool: str = Field(
        default="local", pattern=NAME_PATTERN, description="storage pool (agent config)"
    )

    # `example-image` is uploaded by whoever runs the examples (an upload has no JSON body).
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"name": "example-vol", "size_gb": 1},
                {"name": "example-vol-2", "image": "example-image"},
                {"name": "example-vol-3", "image": "example-image", "size_gb": 2},
            ]
        }
    )


class VolumeUpdate(Model):
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    size_gb: int | None = Field(default=None, ge=1, le=MAX_VOLUME_GB, description="grows only")

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"size_gb": 4}, {"name": "example-vol-renamed"}]}
    )


class SnapshotCreate(Model):
    name: str = Field(pattern=NAME_PATTERN)

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"name": "example-snap"}, {"name": "example-snap-2"}]}
    )


class RevertRequest(Model):
    snapshot: str = Field(pattern=NAME_PATTERN)

    model_config = ConfigDict(json_schema_extra={"examples": [{"snapshot": "example-snap"}]})


class SnapshotState(StrEnum):
    CREATING = "creating"  # wanted, not yet seen on the disk
    READY = "ready"
    DELETING = "deleting"  # on the disk, no longer wanted


class SnapshotView(Model):
    name: str
    state: SnapshotState
    created_at: datetime | None = None
    vm_state: bool = False


class SnapshotList(Model):
    items: list[SnapshotView]


@router.post(
    "/volumes",
    status_code=201,
    responses=links(
        201,
        snapshot=link(
            "POST /volumes/{volume}/snapshots",
            "snapshot the volume",
            parameters={"volume": "$response.body#/id"},
        ),
        delete=link(
            "DELETE /volumes/{volume}",
            "delete the volume",
            parameters={"volume": "$response.body#/id"},
        ),
    ),
)
async def create_volume(body: VolumeCreate, ctx: ContextDep, caller: CallerDep) -> VolumeView:
    """Make a volume, blank or from an image."""
    image_id = None
    size_gb = body.size_gb
    volume_id = new_id(IdKind.VOLUME)
    uses_image = Guards()
    if body.image is not None:
        image_kv, image = await find_image(ctx.store, caller, body.image)
        image_id = image.id
        # The image must still exist at commit, and a delete racing this create fails.
        uses_image = takes_reference(image_kv, image.id, volume_id)
        needed = -(-image.virtual_size // GIB)
        if size_gb is None:
            size_gb = needed
        elif size_gb < needed:
            raise InvalidInput(
                f"image {image.name} needs a volume of at least {needed} GiB, got {size_gb}",
                hint=f"ask for size_gb >= {needed}, or leave it out",
            )
    if size_gb is None:
        raise InvalidInput("a blank volume needs a size", hint="give size_gb (GiB)")
    record = VolumeRecord(
        id=volume_id,
        project=caller.project,
        spec=VolumeSpec(
            name=body.name,
            size_gb=size_gb,
            image=image_id,
            host=await _only_alive_host(ctx.store),
            pool=body.pool,
        ),
        created_at=now(),
    )
    guards = Guards(
        names=name_guard(Kind.VOLUME, caller.project, body.name, volume_id),
        usage=Usage(volumes=1, volume_gb=size_gb),
        compares=uses_image.compares,
        operations=uses_image.operations,
    )
    await Records(ctx.store).create(caller, Kind.VOLUME, volume_id, record, guards)
    return VolumeView(**record.model_dump())


@router.get("/volumes")
async def list_volumes(
    ctx: ContextDep,
    caller: CallerDep,
    limit: LimitQuery = DEFAULT_PAGE,
    cursor: CursorQuery = None,
    name: Annotated[str | None, Query(max_length=64)] = None,
) -> VolumePage:
    """The project's volumes, by id, with what their agents see."""
    items, following = await Records(ctx.store).page(
        Kind.VOLUME,
        VolumeRecord,
        caller,
        limit=limit,
        cursor=cursor,
        keep=None if name is None else (lambda record: record.spec.name == name),
        status_model=VolumeStatus,
    )
    return VolumePage(
        items=[VolumeView(**record.model_dump(), status=status) for record, status in items],
        next=following,
    )


@router.get("/volumes/{volume}")
async def get_volume(volume: str, ctx: ContextDep, caller: CallerDep) -> VolumeView:
    """One volume, by id or name."""
    return await _view(Records(ctx.store), caller, volume)


@router.patch("/volumes/{volume}")
async def update_volume(
    volume: str, body: VolumeUpdate, ctx: ContextDep, caller: CallerDep
) -> VolumeView:
    """Rename a volume or grow it (volumes never shrink)."""
    records = Records(ctx.store)
    _, found = await records.find(Kind.VOLUME, VolumeRecord, caller, volume)

    async def change(record: VolumeRecord) -> tuple[VolumeRecord, Guards | None]:
        _refuse_deleting(record)
        spec, guards = record.spec, Guards()
        if body.size_gb is not None and body.size_gb != spec.size_gb:
            if body.size_gb < spec.size_gb:
                raise InvalidInput(
                    f"volume {record.id} has {spec.size_gb} GiB; a volume cannot shrink "
                    f"to {body.size_gb}",
                    hint="give a larger size, or copy the data to a new, smaller volume",
                )
            guards.usage = Usage(volume_gb=body.size_gb - spec.size_gb)
            spec = spec.model_copy(update={"size_gb": body.size_gb})
        if body.name is not None and body.name != spec.name:
            guards.names = name_guard(Kind.VOLUME, record.project, body.name, record.id)
            guards.released_names = [name_key(Kind.VOLUME, record.project, spec.name)]
            spec = spec.model_copy(update={"name": body.name})
        return record.model_copy(update={"spec": spec}), guards

    await records.mutate(Kind.VOLUME, VolumeRecord, caller, found.id, change)
    return await _view(records, caller, found.id)


@router.delete("/volumes/{volume}", status_code=202)
async def delete_volume(volume: str, ctx: ContextDep, caller: CallerDep) -> VolumeView:
    """Delete a volume no VM lists; its agent removes the file, then the record."""
    records = Records(ctx.store)
    kv, record = await records.find(Kind.VOLUME, VolumeRecord, caller, volume)
    if record.deleting:
        return await _view(records, caller, record.id)
    await _refuse_attached(records, caller, record)
    guards = Guards(
        released_names=_own_name(record),
        freed=Usage(volumes=1, volume_gb=record.spec.size_gb),
        compares=[Compare.absent(attachment_claim(record.id))],
    )
    if record.spec.host is None:
        # Never bound: no agent holds a file of it, so the record simply goes.
        if await records.remove(caller, kv, guards) is None:
            raise Conflict(f"volume {record.id} changed while being deleted", hint="try again")
        return VolumeView(**record.model_copy(update={"deleting": True}).model_dump())
    marked = record.model_copy(update={"deleting": True})
    if await records.replace(caller, kv, marked, guards) is None:
        raise Conflict(f"volume {record.id} changed while being deleted", hint="try again")
    return await _view(records, caller, record.id)


@router.post(
    "/volumes/{volume}/snapshots",
    status_code=202,
    responses=links(
        202,
        revert=link(
            "POST /volumes/{volume}/revert",
            "revert the volume to the snapshot",
            parameters={"volume": "$request.path.volume"},
            body={"snapshot": "$request.body#/name"},
        ),
        delete=link(
            "DELETE /volumes/{volume}/snapshots/{snapshot}",
            "delete the snapshot",
            parameters={"volume": "$request.path.volume", "snapshot": "$request.body#/name"},
        ),
    ),
)
async def create_snapshot(
    volume: str, body: SnapshotCreate, ctx: ContextDep, caller: CallerDep
) -> SnapshotView:
    """Take a snapshot of a volume (internal qcow2 snapshot, made by its agent)."""
    records = Records(ctx.store)
    _, found = await records.find(Kind.VOLUME, VolumeRecord, caller, volume)

    async def change(record: VolumeRecord) -> tuple[VolumeRecord, Guards | None]:
        _refuse_deleting(record)
        if body.name in record.spec.snapshots:
            raise Conflict(
                f"volume {record.id} has a snapshot {body.name!r} already",
                hint="choose another name, or delete that snapshot first",
            )
        if len(record.spec.snapshots) >= MAX_SNAPSHOTS:
            raise Conflict(
                f"volume {record.id} has {MAX_SNAPSHOTS} snapshots, the most it may have",
                hint="delete a snapshot first",
            )
        spec = record.spec.model_copy(update={"snapshots": [*record.spec.snapshots, body.name]})
        return record.model_copy(update={"spec": spec}), None

    await records.mutate(Kind.VOLUME, VolumeRecord, caller, found.id, change)
    return SnapshotView(name=body.name, state=SnapshotState.CREATING)


@router.get("/volumes/{volume}/snapshots")
async def list_snapshots(volume: str, ctx: ContextDep, caller: CallerDep) -> SnapshotList:
    """A volume's snapshots: those on its disk and those still being made or removed."""
    view = await _view(Records(ctx.store), caller, volume)
    return SnapshotList(items=_snapshots(view))


@router.delete("/volumes/{volume}/snapshots/{snapshot}", status_code=202)
async def delete_snapshot(
    volume: str, snapshot: str, ctx: ContextDep, caller: CallerDep
) -> SnapshotView:
    """Delete a snapshot of a volume (its agent removes it from the disk)."""
    records = Records(ctx.store)
    _, found = await records.find(Kind.VOLUME, VolumeRecord, caller, volume)
    status = await records.status(Kind.VOLUME, VolumeStatus, found.id)

    async def change(record: VolumeRecord) -> tuple[VolumeRecord, Guards | None]:
        _refuse_deleting(record)
        if snapshot not in record.spec.snapshots:
            raise NotFound(
                f"volume {record.id} has no snapshot {snapshot!r}",
                hint=f"list them with `nubes volume snapshot list {record.id}`",
            )
        if _revert_pending(record, status) == snapshot:
            raise Conflict(
                f"volume {record.id} is being reverted to {snapshot!r}",
                hint="wait until the revert is done, then delete the snapshot",
            )
        kept = [name for name in record.spec.snapshots if name != snapshot]
        spec = record.spec.model_copy(update={"snapshots": kept})
        return record.model_copy(update={"spec": spec}), None

    await records.mutate(Kind.VOLUME, VolumeRecord, caller, found.id, change)
    return SnapshotView(name=snapshot, state=SnapshotState.DELETING)


@router.post("/volumes/{volume}/revert", status_code=202)
async def revert_volume(
    volume: str, body: RevertRequest, ctx: ContextDep, caller: CallerDep
) -> VolumeView:
    """Roll a volume back to a snapshot; refused while a running VM uses the volume."""
    records = Records(ctx.store)
    _, found = await records.find(Kind.VOLUME, VolumeRecord, caller, volume)
    for vm in await _vms_listing(ctx.store, caller, found.id):
        if vm.spec.power_state is PowerState.RUNNING:
            raise Conflict(
                f"volume {found.id} is attached to VM {vm.id}, which is meant to run",
                hint=f"stop VM {vm.id} (or detach the volume) first, then revert",
            )
    status = await records.status(Kind.VOLUME, VolumeStatus, found.id)
    ready = {snapshot.name for snapshot in status.snapshots} if status else set()

    async def change(record: VolumeRecord) -> tuple[VolumeRecord, Guards | None]:
        _refuse_deleting(record)
        if body.snapshot not in record.spec.snapshots:
            raise NotFound(
                f"volume {record.id} has no snapshot {body.snapshot!r}",
                hint=f"list them with `nubes volume snapshot list {record.id}`",
            )
        if body.snapshot not in ready:
            raise Conflict(
                f"snapshot {body.snapshot!r} of volume {record.id} is not made yet",
                hint="wait until the snapshot list shows it ready",
            )
        done = status.revert_counter if status else 0
        previous = record.spec.revert.counter if record.spec.revert else 0
        revert = VolumeRevert(snapshot=body.snapshot, counter=max(done, previous) + 1)
        spec = record.spec.model_copy(update={"revert": revert})
        return record.model_copy(update={"spec": spec}), None

    await records.mutate(Kind.VOLUME, VolumeRecord, caller, found.id, change)
    return await _view(records, caller, found.id)


async def _view(records: Records, caller: Caller, volume: str) -> VolumeView:
    _, record = await records.find(Kind.VOLUME, VolumeRecord, caller, volume)
    status = await records.status(Kind.VOLUME, VolumeStatus, record.id)
    return VolumeView(**record.model_dump(), status=status)


def _snapshots(view: VolumeView) -> list[SnapshotView]:
    seen = {snapshot.name: snapshot for snapshot in view.status.snapshots} if view.status else {}
    items = []
    for name in view.spec.snapshots:
        info = seen.get(name)
        if info is None:
            items.append(SnapshotView(name=name, state=SnapshotState.CREATING))
        else:
            items.append(
                SnapshotView(
                    name=name,
                    state=SnapshotState.READY,
                    created_at=info.created_at,
                    vm_state=info.vm_state,
                )
            )
    for name, info in seen.items():
        if name not in view.spec.snapshots:
            items.append(
                SnapshotView(name=name, state=SnapshotState.DELETING, created_at=info.created_at)
            )
    return items


def _revert_pending(record: VolumeRecord, status: VolumeStatus | None) -> str | None:
    revert = record.spec.revert
    if revert is None or (status is not None and status.revert_counter >= revert.counter):
        return None
    return revert.snapshot


def _refuse_deleting(record: VolumeRecord) -> None:
    if record.deleting:
        raise Conflict(f"volume {record.id} is being deleted", hint="it cannot change any more")


def _own_name(record: VolumeRecord) -> list[str]:
    return [name_key(Kind.VOLUME, record.project, record.spec.name)]


async def _refuse_attached(records: Records, caller: Caller, record: VolumeRecord) -> None:
    users = [vm.id for vm in await _vms_listing(records.store, caller, record.id)]
    claim = await records.store.get(attachment_claim(record.id))
    if claim is not None and isinstance(claim.value, str) and claim.value not in users:
        users.append(claim.value)
    status = await records.status(Kind.VOLUME, VolumeStatus, record.id)
    if status is not None and status.attached_to and status.attached_to not in users:
        users.append(status.attached_to)
    if users:
        raise Conflict(
            f"volume {record.id} is attached to VM {', '.join(users)}",
            hint="detach it first: nubes vm detach-volume VM VOLUME",
        )


async def _vms_listing(store: Store, caller: Caller, volume_id: str) -> list[VmRecord]:
    """The caller's VMs whose spec lists the volume."""
    prefix = kind_prefix(Kind.VM)
    listing = await store.range(prefix)
    found = []
    for kv in listing.kvs:
        if "/" in kv.key[len(prefix) :] or not isinstance(kv.value, dict):
            continue
        if kv.value.get("project") != caller.project:
            continue
        with contextlib.suppress(InvalidInput):  # a broken record is not the caller's fault
            record = VmRecord.from_json(kv.value)
            if volume_id in record.spec.volumes:
                found.append(record)
    return found


async def _only_alive_host(store: Store) -> str | None:
    """The host a new volume goes to: the only alive one, else none (bound at attach)."""
    prefix = kind_prefix(Kind.HOST)
    listing = await store.range(prefix)
    alive = [
        kv.key[len(prefix) : -len("/alive")]
        for kv in listing.kvs
        if kv.key.endswith("/alive") and kv.key.count("/") == prefix.count("/") + 1
    ]
    if len(alive) != 1:
        return None
    host = alive[0]
    return host if await store.get(resource_key(Kind.HOST, host)) is not None else None
