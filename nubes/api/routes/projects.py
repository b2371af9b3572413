"""Projects: the tenants everything else belongs to, with their quotas and usage.

Admins make, change and delete them; a member sees only the projects it is in
(another project is a 404, so its existence is never confirmed).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response
from pydantic import ConfigDict, Field

from nubes.api.auth import read_tokens, revoke_tokens
from nubes.api.context import Caller, CallerDep, ContextDep
from nubes.api.params import CursorQuery, LimitQuery
from nubes.api.records import DEFAULT_PAGE, MAX_PAGE, Records
from nubes.errors import Conflict, NotFound
from nubes.model.common import NAME_PATTERN, Model, now
from nubes.model.network import keypair_key_name
from nubes.model.project import MAX_QUOTA, ProjectRecord, Quota, Usage, UserRecord
from nubes.store.base import Compare, Delete, KeyValue, Store
from nubes.store.keys import Kind, name_key, resource_key, usage_key

router = APIRouter(tags=["projects"])


Limit = Annotated[int, Field(ge=-1, le=MAX_QUOTA)]


class ProjectCreate(Model):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = Field(default="", max_length=1024)
    quota: Quota = Field(default_factory=Quota)

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"name": "example-project", "description": "for the examples"},
                {"name": "example-project-2", "quota": {"vms": 5, "vcpus": 10, "floating_ips": -1}},
            ]
        }
    )


class QuotaUpdate(Model):
    """The limits to change; the ones left out keep their value. -1 means no limit."""

    vms: Limit | None = None
    vcpus: Limit | None = None
    memory_mb: Limit | None = None
    volumes: Limit | None = None
    volume_gb: Limit | None = None
    floating_ips: Limit | None = None


class ProjectUpdate(Model):
    description: str | None = Field(default=None, max_length=1024)
    quota: QuotaUpdate | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"description": "changed"}, {"quota": {"vms": 30, "volume_gb": -1}}]
        }
    )


class ProjectPage(Model):
    items: list[ProjectRecord]
    next: str | None = None


class ProjectUsage(Model):
    """What a project holds against what it may hold."""

    project: str
    quota: Quota
    usage: Usage


@router.post("/projects", status_code=201)
async def create_project(body: ProjectCreate, ctx: ContextDep, caller: CallerDep) -> ProjectRecord:
    """Make a project (admin)."""
    caller.require_admin("make projects")
    record = ProjectRecord(**body.model_dump(), created_at=now())
    await Records(ctx.store).create(caller, Kind.PROJECT, body.name, record)
    return record


@router.get("/projects")
async def list_projects(
    ctx: ContextDep,
    caller: CallerDep,
    limit: LimitQuery = DEFAULT_PAGE,
    cursor: CursorQuery = None,
) -> ProjectPage:
    """The projects, by name (members: the ones they are in)."""
    mine = None if caller.is_admin else await _member_projects(ctx.store, caller)
    items, following = await Records(ctx.store).page(
        Kind.PROJECT,
        ProjectRecord,
        caller,
        limit=limit,
        cursor=cursor,
        keep=lambda project: mine is None or project.name in mine,
    )
    return ProjectPage(items=[project for project, _ in items], next=following)


@router.get("/projects/{name}")
async def get_project(name: str, ctx: ContextDep, caller: CallerDep) -> ProjectRecord:
    """One project."""
    _, record = await _visible_project(ctx.store, caller, name)
    return record


@router.get("/projects/{name}/usage")
async def get_usage(name: str, ctx: ContextDep, caller: CallerDep) -> ProjectUsage:
    """What a project holds, and its quota."""
    _, record = await _visible_project(ctx.store, caller, name)
    return ProjectUsage(project=name, quota=record.quota, usage=await _usage(ctx.store, name))


@router.patch("/projects/{name}")
async def update_project(
    name: str, body: ProjectUpdate, ctx: ContextDep, caller: CallerDep
) -> ProjectRecord:
    """Change a project's description or quota (admin).

    A quota below what the project holds is allowed: nothing is taken away, but
    creates that need more are refused until it is under the quota again.
    """
    caller.require_admin("change projects")
    await _visible_project(ctx.store, caller, name)

    async def change(project: ProjectRecord) -> tuple[ProjectRecord, None]:
        update: dict[str, object] = {}
        if body.description is not None:
            update["description"] = body.description
        if body.quota is not None:
            limits = body.quota.model_dump(exclude_none=True)
            update["quota"] = project.quota.model_copy(update=limits)
        return project.model_copy(update=update), None

    record, _ = await Records(ctx.store).mutate(Kind.PROJECT, ProjectRecord, caller, name, change)
    return record


@router.delete("/projects/{name}", status_code=204)
async def delete_project(name: str, ctx: ContextDep, caller: CallerDep) -> Response:
    """Delete an empty project (admin); its members leave it and its tokens stop working."""
    caller.require_admin("delete projects")
    if name == caller.project:
        raise Conflict(
            f"this token works in project {name}, so it cannot delete it",
            hint="log into another project and delete it from there",
        )
    kv, _ = await _visible_project(ctx.store, caller, name)
    usage_kv = await ctx.store.get(usage_key(name))
    usage = Usage() if usage_kv is None else Usage.from_json(usage_kv.value)
    held = [f"{field} {value}" for field, value in usage.model_dump().items() if value]
    held += [kind.value for kind in await _kinds_held(ctx.store, name)]
    if held:
        raise Conflict(
            f"project {name} still holds resources: {', '.join(held)}",
            hint="delete them first (log into the project and list each kind)",
        )
    # The usage key is part of the compare: a VM or volume made meanwhile fails the delete.
    usage_check = (
        Compare.absent(usage_key(name)) if usage_kv is None else Compare.unchanged(usage_kv)
    )
    result = await ctx.store.txn(
        [Compare.unchanged(kv), usage_check], [Delete(kv.key), Delete(usage_key(name))]
    )
    if not result.succeeded:
        raise Conflict(f"project {name} changed while it was being deleted", hint="try again")
    await _forget_project(ctx.store, caller, name)
    return Response(status_code=204)


async def _visible_project(
    store: Store, caller: Caller, name: str
) -> tuple[KeyValue, ProjectRecord]:
    """The project, when the caller is an admin or one of its members.

    Raises:
        NotFound: no such project, or the caller is not in it.
    """
    kv = None
    if caller.is_admin or name in await _member_projects(store, caller):
        kv = await store.get(resource_key(Kind.PROJECT, name)) if _plain(name) else None
    if kv is None:
        raise NotFound(f"no project {name!r}", hint="list yours with `nubes project list`")
    return kv, ProjectRecord.from_json(kv.value)


async def _member_projects(store: Store, caller: Caller) -> list[str]:
    kv = await store.get(resource_key(Kind.USER, caller.user))
    return [] if kv is None else UserRecord.from_json(kv.value).projects


async def _usage(store: Store, project: str) -> Usage:
    kv = await store.get(usage_key(project))
    return Usage() if kv is None else Usage.from_json(kv.value)


async def _kinds_held(store: Store, project: str) -> list[Kind]:
    """The kinds of which the project still has a named record (its name guards, and
    its key pairs, which are kept under `<project>:<name>` instead)."""
    kinds = []
    for kind in Kind:
        # name_key wants a name; the guards of the project are every key under its parent.
        prefix = name_key(kind, project, "_").removesuffix("_")
        if (await store.range(prefix, limit=1)).kvs:
            kinds.append(kind)
    keypairs = resource_key(Kind.KEYPAIR, keypair_key_name(project, ""))
    if Kind.KEYPAIR not in kinds and (await store.range(keypairs, limit=1)).kvs:
        kinds.append(Kind.KEYPAIR)
    return kinds


async def _forget_project(store: Store, caller: Caller, project: str) -> None:
    """Takes a deleted project out of its members' lists and revokes its tokens, so a
    project made later with the same name does not let them back in."""
    records = Records(store)

    async def leave(record: UserRecord) -> tuple[UserRecord, None]:
        kept = [name for name in record.projects if name != project]
        return record.model_copy(update={"projects": kept}), None

    cursor: str | None = None
    while True:
        members, cursor = await records.page(
            Kind.USER,
            UserRecord,
            caller,
            limit=MAX_PAGE,
            cursor=cursor,
            keep=lambda user: project in user.projects,
        )
        for user, _ in members:
            try:
                await records.mutate(Kind.USER, UserRecord, caller, user.name, leave)
            except NotFound:
                continue  # deleted meanwhile
        if cursor is None:
            break
    await revoke_tokens(store, await read_tokens(store, project=project))


def _plain(name: str) -> bool:
    return 0 < len(name) <= 128 and name.isascii() and name.isprintable() and "/" not in name
