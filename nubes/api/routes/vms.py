"""VMs: create, read, change and delete them, and act on them (start, stop, reboot,
resize, volumes) by changing their spec with compare-and-swap; the agent does the rest.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Response
from fastapi.openapi.models import Example
from pydantic import ConfigDict, Field

from nubes.api.console import MAX_LINES, read_tail, serial_log_path
from nubes.api.context import CallerDep, ContextDep
from nubes.api.migrations import MigrationUnderWay, VmMigrate, read_migration, start_migration
from nubes.api.netops import merge_guards
from nubes.api.openapi_links import link, links
from nubes.api.params import DEFAULT_PAGE, CursorQuery, LimitQuery
from nubes.api.records import CAS_ATTEMPTS, Guards, Records, name_guard
from nubes.api.vmops import (
    VmCreate,
    VmPage,
    VmStateConflict,
    VmView,
    VolumeUnavailable,
    create_vm,
    delete_vm,
    effective_state,
    host_allocation_update,
    read_status,
    read_vm,
    view_of,
)
from nubes.errors import Conflict, InvalidInput, NotFound
from nubes.model.common import NAME_PATTERN, Model
from nubes.model.migration import MigrationStatus
from nubes.model.project import FlavorRecord, Usage
from nubes.model.vm import Flavor, PowerState, RestartPolicy, VmRecord, VmState, VmStatus
from nubes.model.volume import VolumeRecord, VolumeState, VolumeStatus
from nubes.store.base import Compare, Delete, Put
from nubes.store.keys import Kind, attachment_claim, name_key, status_key

router = APIRouter(tags=["vms"])

REVISION_HEADER = "X-Nubes-Revision"
# Read before the records: a watch from it (`/watch?since=`) misses no later change.
_REVISION_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "headers": {
            REVISION_HEADER: {
                "description": "the store revision the answer reflects; watch from it",
                "schema": {"type": "string"},
            }
        }
    }
}

VmRef = Annotated[str, Path(min_length=1, max_length=128, description="VM id or name")]
Change = Callable[[VmRecord, VmStatus | None], Awaitable[tuple[VmRecord, Guards | None]]]
# A VM in these states with power_state running is already running or on its way there.
_STARTING = frozenset(
    {VmState.PENDING, VmState.SCHEDULED, VmState.BUILDING, VmState.RUNNING, VmState.MIGRATING}
)
MAX_VOLUMES = 16


class VmUpdate(Model):
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    restart_policy: RestartPolicy | None = None
    autostart: bool | None = None
    cpu_weight: int | None = Field(default=None, ge=1, le=10_000)

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"restart_policy": "always", "cpu_weight": 200}, {"autostart": False}]
        }
    )


class VmStop(Model):
    force: bool = Field(default=False, description="pull the plug instead of the power button")
    timeout: float | None = Field(
        default=None, ge=0, le=3600, description="seconds before a soft stop turns hard"
    )

    model_config = ConfigDict(json_schema_extra={"examples": [{"timeout": 30}, {"force": True}]})


class VmResize(Model):
    flavor: str = Field(min_length=1, max_length=128, description="flavor name")

    model_config = ConfigDict(json_schema_extra={"examples": [{"flavor": "small"}]})


class VolumeAttach(Model):
    volume: str = Field(min_length=1, max_length=128, description="volume id or name")

    model_config = ConfigDict(json_schema_extra={"examples": [{"volume": "example-vol"}]})


class VmConsole(Model):
    vm: str
    host: str
    lines: list[str]
    truncated: bool = Field(description="the log holds more before these lines")


def _refuse(record: VmRecord, state: VmState, action: str, hint: str) -> VmStateConflict:
    return VmStateConflict(f"VM {record.id} is {state}: cannot {action} it now", hint=hint)


def _not_deleting(record: VmRecord, action: str) -> None:
    if record.deleting:
        raise _refuse(record, VmState.DELETING, action, "it is going away; make a new one")


def _not_moving(record: VmRecord, action: str) -> None:
    """Disks and size are part of what a migration moves: they change before or after."""
    migration = record.spec.migration
    if migration is not None:
        raise MigrationUnderWay(
            f"VM {record.id} is moving to host {migration.target}: cannot {action} it now",
            hint="wait for the migration to end (nubes vm migrate --wait), then try again",
        )


def _with_spec(record: VmRecord, **changes: object) -> VmRecord:
    return record.model_copy(update={"spec": record.spec.model_copy(update=changes)})


async def _act(ctx: ContextDep, caller: CallerDep, ref: str, change: Change) -> VmView:
    """Applies `change` to the VM's record with compare-and-swap, again after a lost race."""
    records = Records(ctx.store)
    for _ in range(CAS_ATTEMPTS):
        kv, record = await read_vm(ctx.store, caller, ref)
        status = await read_status(ctx.store, record.id)
        updated, guards = await change(record, status)
        if await records.replace(caller, kv, updated, guards) is not None:
            return await view_of(ctx.store, updated, status)
    raise Conflict(
        f"VM {ref} kept changing while this request tried to change it", hint="try again"
    )


# Named after what the other operations' examples make; `example-image` is uploaded by
# whoever runs the examples (an upload has no JSON body).
VM_EXAMPLES: dict[str, Example] = {
    "nic": {
        "summary": "a VM with a new port on a network and a key",
        "value": {
            "name": "example-vm",
            "flavor": "tiny",
            "image": "example-image",
            "networks": [{"network": "example-net"}],
            "key_name": "example-key",
        },
    },
    "stopped": {
        "summary": "a stopped VM on a chosen subnet, in a chosen group",
        "value": {
            "name": "example-vm-2",
            "flavor": "small",
            "image": "example-image",
            "networks": [{"network": "example-net-2", "subnet": "example-subnet-2"}],
            "security_groups": ["example-sg"],
            "power_state": "stopped",
            "restart_policy": "never",
            "user_data": "#cloud-config\n",
        },
    },
    "port": {
        "summary": "a VM on an existing port",
        "value": {
            "name": "example-vm-3",
            "flavor": "tiny",
            "image": "example-image",
            "ports": ["example-port"],
            "key_names": ["example-key", "example-key-2"],
        },
    },
}


@router.post(
    "/vms",
    status_code=201,
    responses=links(
        201,
        console=link(
            "GET /vms/{vm}/console",
            "the VM's serial console",
            parameters={"vm": "$response.body#/id"},
        ),
        stop=link("POST /vms/{vm}/stop", "stop the VM", parameters={"vm": "$response.body#/id"}),
        delete=link("DELETE /vms/{vm}", "delete the VM", parameters={"vm": "$response.body#/id"}),
    ),
)
async def create(
    body: Annotated[VmCreate, Body(openapi_examples=VM_EXAMPLES)],
    ctx: ContextDep,
    caller: CallerDep,
) -> VmView:
    """Make a VM; the scheduler places it and the host's agent starts it."""
    record = await create_vm(ctx.store, caller, body)
    return await view_of(ctx.store, record, None)


@router.get("/vms", responses=_REVISION_DOC)
async def list_vms(
    ctx: ContextDep,
    caller: CallerDep,
    response: Response,
    limit: LimitQuery = DEFAULT_PAGE,
    cursor: CursorQuery = None,
    name: Annotated[str | None, Query(max_length=128)] = None,
    state: VmState | None = None,
    host: Annotated[str | None, Query(max_length=128)] = None,
) -> VmPage:
    """The project's VMs, by id; filter by name, state or host."""
    records = Records(ctx.store)
    response.headers[REVISION_HEADER] = str(await ctx.store.current_revision())

    def keep(record: VmRecord) -> bool:
        return (name is None or record.spec.name == name) and (
            host is None or record.spec.host == host
        )

    views: list[VmView] = []
    following = cursor
    while True:
        items, following = await records.page(
            Kind.VM,
            VmRecord,
            caller,
            limit=limit,
            cursor=following,
            keep=keep,
            status_model=VmStatus,
        )
        for record, status in items:
            if state is None or effective_state(record, status) is state:
                views.append(await view_of(ctx.store, record, status))
        if len(views) >= limit or following is None:
            break
    if len(views) > limit:
        views = views[:limit]
        following = views[-1].id
    return VmPage(items=views, next=following)


@router.get("/vms/{vm}", responses=_REVISION_DOC)
async def get_vm(vm: VmRef, ctx: ContextDep, caller: CallerDep, response: Response) -> VmView:
    """One VM, by id or name, with its status and addresses."""
    response.headers[REVISION_HEADER] = str(await ctx.store.current_revision())
    _, record = await read_vm(ctx.store, caller, vm)
    return await view_of(ctx.store, record, await read_status(ctx.store, record.id))


@router.patch("/vms/{vm}")
async def update_vm(vm: VmRef, body: VmUpdate, ctx: ContextDep, caller: CallerDep) -> VmView:
    """Rename a VM, or change its restart policy, autostart or CPU weight."""

    async def change(record: VmRecord, status: VmStatus | None) -> tuple[VmRecord, Guards]:
        _not_deleting(record, "change")
        changes = body.model_dump(exclude_none=True)
        guards = Guards()
        if body.name is not None and body.name != record.spec.name:
            guards.names = name_guard(Kind.VM, record.project, body.name, record.id)
            guards.released_names = [name_key(Kind.VM, record.project, record.spec.name)]
        return _with_spec(record, **changes), guards

    return await _act(ctx, caller, vm, change)


@router.delete("/vms/{vm}", status_code=202)
async def delete(vm: VmRef, ctx: ContextDep, caller: CallerDep) -> VmView:
    """Delete a VM: its host's agent stops it and removes it; its quota is free at once."""
    record = await delete_vm(ctx.store, caller, vm)
    return await view_of(ctx.store, record, await read_status(ctx.store, record.id))


@router.post("/vms/{vm}/start", status_code=202)
async def start(vm: VmRef, ctx: ContextDep, caller: CallerDep) -> VmView:
    """Start a stopped, crashed or failed VM."""

    async def change(record: VmRecord, status: VmStatus | None) -> tuple[VmRecord, None]:
        _not_deleting(record, "start")
        state = effective_state(record, status)
        if record.spec.power_state is PowerState.RUNNING and state in _STARTING:
            raise _refuse(record, state, "start", "it is already running or starting")
        counter = record.spec.start_counter + 1
        return _with_spec(record, power_state=PowerState.RUNNING, start_counter=counter), None

    return await _act(ctx, caller, vm, change)


@router.post("/vms/{vm}/stop", status_code=202)
async def stop(vm: VmRef, ctx: ContextDep, caller: CallerDep, body: VmStop | None = None) -> VmView:
    """Stop a VM: the power button, then a hard stop after the timeout; `force` at once."""
    request = body or VmStop()
    timeout = 0.0 if request.force else request.timeout

    async def change(record: VmRecord, status: VmStatus | None) -> tuple[VmRecord, None]:
        _not_deleting(record, "stop")
        state = effective_state(record, status)
        stopping = record.spec.power_state is PowerState.STOPPED
        if stopping and (not request.force or state not in (VmState.RUNNING, VmState.BUILDING)):
            raise _refuse(
                record, state, "stop", "it is already stopped or stopping; `force` pulls the plug"
            )
        return _with_spec(record, power_state=PowerState.STOPPED, soft_stop_timeout=timeout), None

    return await _act(ctx, caller, vm, change)


@router.post("/vms/{vm}/reboot", status_code=202)
async def reboot(vm: VmRef, ctx: ContextDep, caller: CallerDep) -> VmView:
    """Reboot a running VM (a reset; the guest is not asked)."""

    async def change(record: VmRecord, status: VmStatus | None) -> tuple[VmRecord, None]:
        _not_deleting(record, "reboot")
        state = effective_state(record, status)
        if state is not VmState.RUNNING or record.spec.power_state is not PowerState.RUNNING:
            raise _refuse(record, state, "reboot", "only a running VM reboots; start it instead")
        return _with_spec(record, reboot_counter=record.spec.reboot_counter + 1), None

    return await _act(ctx, caller, vm, change)


@router.post("/vms/{vm}/resize", status_code=202)
async def resize(vm: VmRef, body: VmResize, ctx: ContextDep, caller: CallerDep) -> VmView:
    """Give a VM another flavor; it applies at the VM's next start (stop, then start)."""
    _, flavor_record = await Records(ctx.store).get(Kind.FLAVOR, FlavorRecord, caller, body.flavor)
    flavor = Flavor(
        name=flavor_record.name,
        vcpus=flavor_record.vcpus,
        memory_mb=flavor_record.memory_mb,
        disk_gb=flavor_record.disk_gb,
    )

    async def change(record: VmRecord, status: VmStatus | None) -> tuple[VmRecord, Guards]:
        _not_deleting(record, "resize")
        _not_moving(record, "resize")
        old = record.spec.flavor
        if old == flavor:
            raise Conflict(
                f"VM {record.id} already has flavor {flavor.name}", hint="choose another flavor"
            )
        if flavor.disk_gb and flavor.disk_gb < old.disk_gb:
            raise InvalidInput(
                f"flavor {flavor.name} has a {flavor.disk_gb} GB disk; the VM's is "
                f"{old.disk_gb} GB and disks never shrink",
                hint="choose a flavor with at least as much disk",
            )
        grown = Usage(
            vcpus=max(0, flavor.vcpus - old.vcpus),
            memory_mb=max(0, flavor.memory_mb - old.memory_mb),
        )
        shrunk = Usage(
            vcpus=max(0, old.vcpus - flavor.vcpus),
            memory_mb=max(0, old.memory_mb - flavor.memory_mb),
        )
        resized = _with_spec(record, flavor=flavor)
        guards = merge_guards(
            Guards(usage=grown, freed=shrunk), await host_allocation_update(ctx.store, resized)
        )
        return resized, guards

    return await _act(ctx, caller, vm, change)


@router.post("/vms/{vm}/volumes", status_code=202)
async def attach_volume(
    vm: VmRef, body: VolumeAttach, ctx: ContextDep, caller: CallerDep
) -> VmView:
    """Attach a volume (hotplugged when the VM runs); it must be free and on the VM's host."""
    records = Records(ctx.store)

    async def change(record: VmRecord, status: VmStatus | None) -> tuple[VmRecord, Guards]:
        _not_deleting(record, "attach a volume to")
        _not_moving(record, "attach a volume to")
        volume_kv, volume = await records.find(Kind.VOLUME, VolumeRecord, caller, body.volume)
        if volume.id in record.spec.volumes:
            raise VolumeUnavailable(
                f"volume {volume.id} is already attached to VM {record.id}",
                hint="nothing to do",
            )
        if len(record.spec.volumes) >= MAX_VOLUMES:
            raise VolumeUnavailable(
                f"VM {record.id} has {MAX_VOLUMES} volumes, the most it may have",
                hint="detach one first",
            )
        if volume.deleting:
            raise VolumeUnavailable(f"volume {volume.id} is being deleted", hint="use another")
        holder = await ctx.store.get(attachment_claim(volume.id))
        if holder is not None:
            raise VolumeUnavailable(
                f"volume {volume.id} is attached to VM {holder.value}",
                hint="detach it there first",
            )
        if record.spec.host is None:
            raise _refuse(
                record,
                effective_state(record, status),
                "attach a volume to",
                "wait until the VM is placed on a host (`nubes vm show`), then attach",
            )
        guards = Guards(
            claims={attachment_claim(volume.id): record.id},
            compares=[Compare.unchanged(volume_kv)],
        )
        if volume.spec.host is None:
            # Not made yet anywhere: it will be made on the VM's host.
            bound = volume.model_copy(
                update={"spec": volume.spec.model_copy(update={"host": record.spec.host})}
            )
            guards.operations.append(Put(volume_kv.key, bound.to_json()))
        else:
            _check_volume_ready(volume, record, await _volume_status(ctx, volume.id))
        return _with_spec(record, volumes=[*record.spec.volumes, volume.id]), guards

    return await _act(ctx, caller, vm, change)


async def _volume_status(ctx: ContextDep, volume_id: str) -> VolumeStatus | None:
    kv = await ctx.store.get(status_key(Kind.VOLUME, volume_id))
    return None if kv is None else VolumeStatus.from_json(kv.value)


def _check_volume_ready(
    volume: VolumeRecord, record: VmRecord, status: VolumeStatus | None
) -> None:
    if volume.spec.host != record.spec.host:
        raise VolumeUnavailable(
            f"volume {volume.id} is on host {volume.spec.host}; "
            f"VM {record.id} runs on {record.spec.host}",
            hint="attach a volume made on the VM's host",
        )
    if status is None or status.state is not VolumeState.AVAILABLE:
        state = "not made yet" if status is None else str(status.state)
        raise VolumeUnavailable(
            f"volume {volume.id} is {state}",
            hint="wait until it is available (`nubes volume show`), then attach it",
        )


@router.delete("/vms/{vm}/volumes/{volume}", status_code=202)
async def detach_volume(
    vm: VmRef,
    volume: Annotated[str, Path(min_length=1, max_length=128, description="volume id or name")],
    ctx: ContextDep,
    caller: CallerDep,
) -> VmView:
    """Detach a volume (unplugged when the VM runs; the guest must let it go)."""
    records = Records(ctx.store)

    async def change(record: VmRecord, status: VmStatus | None) -> tuple[VmRecord, Guards]:
        _not_deleting(record, "detach a volume from")
        _not_moving(record, "detach a volume from")
        _, found = await records.find(Kind.VOLUME, VolumeRecord, caller, volume)
        if found.id not in record.spec.volumes:
            raise VolumeUnavailable(
                f"volume {found.id} is not attached to VM {record.id}", hint="nothing to do"
            )
        guards = Guards()
        claim = await ctx.store.get(attachment_claim(found.id))
        if claim is not None and claim.value == record.id:
            guards.compares.append(Compare.unchanged(claim))
            guards.operations.append(Delete(claim.key))
        kept = [v for v in record.spec.volumes if v != found.id]
        return _with_spec(record, volumes=kept), guards

    return await _act(ctx, caller, vm, change)


@router.get("/vms/{vm}/console")
async def console(
    vm: VmRef,
    ctx: ContextDep,
    caller: CallerDep,
    lines: Annotated[int, Query(ge=1, le=MAX_LINES, description="how many of the last")] = 100,
) -> VmConsole:
    """The end of the VM's serial console log (on the all-in-one node)."""
    _, record = await read_vm(ctx.store, caller, vm)
    here = ctx.config.agent.host
    if record.spec.host is None:
        raise _refuse(
            record,
            effective_state(record, await read_status(ctx.store, record.id)),
            "show the console of",
            "it has no host yet, so no console; try again once it runs",
        )
    if record.spec.host != here:
        raise VmStateConflict(
            f"VM {record.id} runs on host {record.spec.host}; this API runs on {here} and "
            "reads only its own host's consoles",
            hint=f"read it on {record.spec.host} (`nubes vm console` there)",
        )
    found, truncated = await read_tail(serial_log_path(ctx.config, record.id), lines)
    return VmConsole(vm=record.id, host=here, lines=found, truncated=truncated)


@router.post("/vms/{vm}/migrate", status_code=202)
async def migrate(vm: VmRef, body: VmMigrate, ctx: ContextDep, caller: CallerDep) -> VmView:
    """Move a VM to another host (admin): running (`live`, the guest keeps running) or
    stopped. The target is `host`, or the scheduler's choice; `GET /vms/{vm}/migration`
    follows the move."""
    caller.require_admin("move VMs between hosts")

    async def change(record: VmRecord, status: VmStatus | None) -> tuple[VmRecord, Guards]:
        return await start_migration(ctx.store, record, status, body, ctx.config.scheduler)

    return await _act(ctx, caller, vm, change)


@router.get("/vms/{vm}/migration")
async def migration(vm: VmRef, ctx: ContextDep, caller: CallerDep) -> MigrationStatus:
    """The progress of the VM's last move between hosts."""
    _, record = await read_vm(ctx.store, caller, vm)
    progress = await read_migration(ctx.store, record.id)
    if progress is None:
        raise NotFound(
            f"VM {record.id} has never moved between hosts", hint="move it with `nubes vm migrate`"
        )
    return progress
