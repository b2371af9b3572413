"""The API's way with records: read within the caller's project, page, create with
guards, change with compare-and-swap, delete.

Every write is one transaction that also checks its guards: the name is free in the
project (`/nubes/names/...`), claimed values (an address, a VNI) are free, and the
project's usage stays within its quota. A create either makes all of it or nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

from nubes.api.context import Caller
from nubes.errors import Conflict, InvalidInput, NotFound, QuotaExceeded
from nubes.model.common import Model
from nubes.model.project import ProjectRecord, Usage
from nubes.store.base import Compare, Delete, KeyValue, Put, Store, TxnOperation
from nubes.store.keys import NOUNS, Kind, kind_prefix, name_key, resource_key, usage_key

R = TypeVar("R", bound=Model)
S = TypeVar("S", bound=Model)

MAX_PAGE = 1000
DEFAULT_PAGE = 100
CAS_ATTEMPTS = 16

# Kinds whose records are not owned by a project (only admins change them).
GLOBAL_KINDS = frozenset({Kind.PROJECT, Kind.USER, Kind.FLAVOR, Kind.HOST})


class Page(BaseModel):
    """One page of a listing; pass `next` back as `cursor` for the following page."""

    items: list[Any]
    next: str | None = None


@dataclass
class Guards:
    """What a write must also check and claim, in the same transaction."""

    names: dict[str, str] = field(default_factory=dict)  # name key -> id to claim
    released_names: list[str] = field(default_factory=list)
    claims: dict[str, str] = field(default_factory=dict)  # claim key -> owner id
    released_claims: list[str] = field(default_factory=list)
    usage: Usage | None = None  # added to the project's usage (checked against its quota)
    freed: Usage | None = None  # taken off the project's usage
    compares: list[Compare] = field(default_factory=list)
    operations: list[TxnOperation] = field(default_factory=list)


def not_found(kind: Kind, ident: str) -> NotFound:
    noun = NOUNS[kind]
    return NotFound(
        f"no {noun} {ident!r} in this project",
        hint=f"list them with `nubes {kind.value.removesuffix('s')} list`",
    )


def visible(caller: Caller, kind: Kind, project: str | None) -> bool:
    """A record of another project is invisible (a 404, never a 403 that confirms it)."""
    return kind in GLOBAL_KINDS or project == caller.project


class Records:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def get(
        self, kind: Kind, model: type[R], caller: Caller, ident: str
    ) -> tuple[KeyValue, R]:
        """The record `ident` of `kind` in the caller's project.

        Raises:
            NotFound: there is none, or it belongs to another project.
        """
        try:
            key = resource_key(kind, ident)
        except ValueError:
            raise not_found(kind, ident) from None
        kv = await self.store.get(key)
        if kv is None:
            raise not_found(kind, ident)
        record = model.from_json(kv.value)
        if not visible(caller, kind, getattr(record, "project", None)):
            raise not_found(kind, ident)
        return kv, record

    async def find(
        self, kind: Kind, model: type[R], caller: Caller, ref: str
    ) -> tuple[KeyValue, R]:
        """The record `ref` names: its id, or its name in the caller's project.

        Raises:
            NotFound: no such id or name in the project.
        """
        if not _plain(ref):
            raise not_found(kind, ref)
        kv = await self.store.get(resource_key(kind, ref))
        if kv is not None:
            record = model.from_json(kv.value)
            if visible(caller, kind, getattr(record, "project", None)):
                return kv, record
        # Not an id of this project (another's id is as good as unknown): maybe a name.
        guard = await self.store.get(name_key(kind, caller.project, ref))
        if guard is not None and isinstance(guard.value, str):
            kv = await self.store.get(resource_key(kind, guard.value))
            if kv is not None:
                record = model.from_json(kv.value)
                if visible(caller, kind, getattr(record, "project", None)):
                    return kv, record
        raise not_found(kind, ref)

    async def status(self, kind: Kind, model: type[S], ident: str) -> S | None:
        kv = await self.store.get(f"{resource_key(kind, ident)}/status")
        return None if kv is None else model.from_json(kv.value)

    async def page(
        self,
        kind: Kind,
        model: type[R],
        caller: Caller | None,
        *,
        limit: int = DEFAULT_PAGE,
        cursor: str | None = None,
        keep: Callable[[R], bool] | None = None,
        status_model: type[S] | None = None,
    ) -> tuple[list[tuple[R, S | None]], str | None]:
        """One page of the caller's records of `kind` in id order, with their statuses.

        `caller` None lists every project's (for admins' views). `cursor` is the id
        the previous page ended on.

        Raises:
            InvalidInput: `limit` is out of range or `cursor` is not an id.
        """
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be 1 to {MAX_PAGE}, got {limit}")
        prefix = kind_prefix(kind)
        start: str | None = None
        if cursor is not None:
            if not _plain(cursor):
                raise InvalidInput(f"cursor {cursor!r} is not one a listing returned")
            start = f"{prefix}{cursor}\x00"  # just after it; keys under it are skipped below
        items: list[tuple[R, S | None]] = []
        batch = max(2 * limit + 2, 64)
        while True:
            result = await self.store.range(prefix, limit=batch, start=start)
            kvs = result.kvs
            index = 0
            while index < len(kvs):
                kv = kvs[index]
                name = kv.key[len(prefix) :]
                index += 1
                if "/" in name:
                    continue
                status_kv: KeyValue | None = None
                if index < len(kvs) and kvs[index].key == f"{kv.key}/status":
                    status_kv = kvs[index]
                    index += 1
                record = model.from_json(kv.value)
                if caller is not None and not visible(
                    caller, kind, getattr(record, "project", None)
                ):
                    continue
                if keep is not None and not keep(record):
                    continue
                status = None
                if status_model is not None:
                    if status_kv is None and index >= len(kvs) and len(kvs) == batch:
                        status = await self.status(kind, status_model, name)
                    elif status_kv is not None:
                        status = status_model.from_json(status_kv.value)
                items.append((record, status))
                if len(items) == limit:
                    return items, name
            if len(kvs) < batch:
                return items, None
            start = kvs[-1].key + "\x00"

    async def create(
        self, caller: Caller, kind: Kind, ident: str, record: Model, guards: Guards | None = None
    ) -> int:
        """Writes a new record with its guards, all or nothing; returns the revision.

        Raises:
            Conflict: the id, a name or a claim is taken (the message says which).
            QuotaExceeded: the project's quota does not allow it.
        """
        guards = guards or Guards()
        key = resource_key(kind, ident)
        return await self._commit(
            caller,
            guards,
            [Compare.absent(key)],
            [Put(key, record.to_json())],
            what=f"{NOUNS[kind]} {ident}",
        )

    async def replace(
        self, caller: Caller, kv: KeyValue, record: Model, guards: Guards | None = None
    ) -> int | None:
        """Writes `record` over `kv` if nobody changed it meanwhile; None when somebody did.

        Raises:
            Conflict: a guard is taken. QuotaExceeded: over the quota.
        """
        try:
            return await self._commit(
                caller,
                guards or Guards(),
                [Compare.unchanged(kv)],
                [Put(kv.key, record.to_json())],
                what=kv.key,
                lost_race_is_none=True,
            )
        except _LostRace:
            return None

    async def remove(
        self,
        caller: Caller,
        kv: KeyValue,
        guards: Guards | None = None,
        *,
        with_status: bool = True,
    ) -> int | None:
        """Deletes the record `kv` (and its status) if unchanged; None when it changed."""
        operations: list[TxnOperation] = [Delete(kv.key)]
        if with_status:
            operations.append(Delete(f"{kv.key}/status"))
        try:
            return await self._commit(
                caller,
                guards or Guards(),
                [Compare.unchanged(kv)],
                operations,
                what=kv.key,
                lost_race_is_none=True,
            )
        except _LostRace:
            return None

    async def mutate(
        self,
        kind: Kind,
        model: type[R],
        caller: Caller,
        ident: str,
        change: Callable[[R], Awaitable[tuple[R, Guards | None]]],
    ) -> tuple[R, int]:
        """Reads the record, applies `change`, writes with CAS; again when it lost a race.

        Raises:
            NotFound: no such record. Conflict: it kept changing, or `change` refused.
        """
        for _ in range(CAS_ATTEMPTS):
            kv, record = await self.get(kind, model, caller, ident)
            updated, guards = await change(record)
            revision = await self.replace(caller, kv, updated, guards)
            if revision is not None:
                return updated, revision
        raise Conflict(
            f"{NOUNS[kind]} {ident} kept changing while this request tried to change it",
            hint="try again",
        )

    async def _commit(
        self,
        caller: Caller,
        guards: Guards,
        compares: list[Compare],
        operations: list[TxnOperation],
        *,
        what: str,
        lost_race_is_none: bool = False,
    ) -> int:
        for _ in range(CAS_ATTEMPTS):
            checks = [*compares, *guards.compares]
            writes = [*operations, *guards.operations]
            for key, owner in guards.names.items():
                checks.append(Compare.absent(key))
                writes.append(Put(key, owner))
            writes.extend(Delete(key) for key in guards.released_names)
            for key, owner in guards.claims.items():
                checks.append(Compare.absent(key))
                writes.append(Put(key, owner))
            writes.extend(Delete(key) for key in guards.released_claims)
            if guards.usage is not None or guards.freed is not None:
                usage_check, usage_write = await self._usage_change(caller.project, guards)
                checks.append(usage_check)
                writes.append(usage_write)
            result = await self.store.txn(checks, writes)
            if result.succeeded:
                return result.revision
            await self._explain_failure(compares, guards, what, lost_race_is_none)
        raise Conflict(
            f"{what} kept changing while this request tried to write it", hint="try again"
        )

    async def _usage_change(self, project: str, guards: Guards) -> tuple[Compare, Put]:
        key = usage_key(project)
        kv = await self.store.get(key)
        current = Usage() if kv is None else Usage.from_json(kv.value)
        updated = current
        if guards.usage is not None:
            updated = updated.plus(guards.usage)
            project_kv = await self.store.get(resource_key(Kind.PROJECT, project))
            if project_kv is None:
                raise NotFound(
                    f"project {project} no longer exists",
                    hint="log into an existing project with `nubes login --project`",
                )
            quota = ProjectRecord.from_json(project_kv.value).quota
            over = [item for item in updated.over(quota) if item not in current.over(quota)]
            if over:
                raise QuotaExceeded(
                    f"project {project} would go over its quota: {', '.join(over)}",
                    hint="delete something first, or ask an admin to raise the quota",
                )
        if guards.freed is not None:
            updated = updated.minus(guards.freed)
        check = Compare.absent(key) if kv is None else Compare.unchanged(kv)
        return check, Put(key, updated.to_json())

    async def _explain_failure(
        self, compares: Sequence[Compare], guards: Guards, what: str, lost_race_is_none: bool
    ) -> None:
        """Raises the error a failed transaction means, or returns to try again (usage race)."""
        for compare in compares:
            current = await self.store.get(compare.key)
            if not _holds(compare, current):
                if lost_race_is_none:
                    raise _LostRace
                raise Conflict(f"{what} already exists", hint="choose another id or name")
        for compare in guards.compares:
            if not _holds(compare, await self.store.get(compare.key)):
                if lost_race_is_none:
                    raise _LostRace
                raise Conflict(f"something {what} depends on changed meanwhile", hint="try again")
        for key in guards.names:
            if await self.store.get(key) is not None:
                name = key.rsplit("/", 1)[-1]
                raise Conflict(
                    f"the name {name!r} is already taken in this project",
                    hint="choose another name, or delete the one that has it",
                )
        for key in guards.claims:
            taken = await self.store.get(key)
            if taken is not None:
                value = key.rsplit("/", 1)[-1]
                raise Conflict(
                    f"{value} is already in use by {taken.value}",
                    hint="choose another one, or leave it out to get a free one",
                )


class _LostRace(Exception):
    pass


def _holds(compare: Compare, current: KeyValue | None) -> bool:
    from nubes.store.base import compare_holds

    return compare_holds(compare, current)


def _plain(ref: str) -> bool:
    return 0 < len(ref) <= 128 and ref.isascii() and ref.isprintable() and "/" not in ref


def name_guard(kind: Kind, project: str, name: str, ident: str) -> dict[str, str]:
    return {name_key(kind, project, name): ident}
