"""The watch endpoint: server-sent events of changes to the caller's resources.

One store watch over every key, filtered to the kinds asked for and to the caller's
project (admins also see hosts); a comment line keeps idle connections open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse
from pydantic import Field

from nubes.api.context import ApiContext, Caller, CallerDep, ContextDep
from nubes.errors import Forbidden, InvalidInput, NubesError
from nubes.model.common import Model
from nubes.store.base import EventType, JsonValue, Store, WatchEvent
from nubes.store.keys import ROOT, Kind, kind_prefix, resource_key

router = APIRouter(tags=["watch"])

PROJECT_KINDS: tuple[Kind, ...] = (
    Kind.KEYPAIR,
    Kind.IMAGE,
    Kind.NETWORK,
    Kind.SUBNET,
    Kind.PORT,
    Kind.SECURITY_GROUP,
    Kind.FLOATING_IP,
    Kind.VOLUME,
    Kind.VM,
)
ADMIN_KINDS: tuple[Kind, ...] = (Kind.HOST,)
KEEPALIVE_SECONDS = 15.0
KEEPALIVE_SETTING = "watch_keepalive_seconds"  # ApiContext.extras may shorten it (tests)
# Which project each record seen belongs to; deletes carry no value, so this is how a
# delete is known to be the caller's. Bounded: the oldest entries are forgotten first.
MAX_REMEMBERED = 100_000
_PUBLIC = "*"
_QUEUE_SIZE = 1024


class WatchData(Model):
    """The `data:` of one event; `id:` is the store revision of the change."""

    kind: str = Field(description="the kind, as in the API paths: vms, ports, hosts...")
    id: str = Field(description="the resource's id (a key pair's or a host's name)")
    part: Literal["record", "status", "alive"]
    record: dict[str, JsonValue] | None = Field(default=None, description="part record")
    status: dict[str, JsonValue] | None = Field(default=None, description="part status")
    alive: bool | None = Field(default=None, description="part alive (hosts)")


class _Filter:
    """Turns store events into the caller's events, or None for the others'."""

    def __init__(self, store: Store, caller: Caller, kinds: frozenset[Kind]) -> None:
        self.store = store
        self.caller = caller
        self.kinds = kinds
        self.owners: OrderedDict[tuple[Kind, str], str] = OrderedDict()

    def _remember(self, kind: Kind, ident: str, value: JsonValue) -> str | None:
        if not isinstance(value, dict):
            return None
        project = value.get("project")
        if not isinstance(project, str):
            return None
        owner = _PUBLIC if kind is Kind.IMAGE and value.get("public") is True else project
        self.owners[(kind, ident)] = owner
        self.owners.move_to_end((kind, ident))
        while len(self.owners) > MAX_REMEMBERED:
            self.owners.popitem(last=False)
        return owner

    async def prime(self) -> None:
        """Learns the owner of every record of the watched project kinds."""
        for kind in self.kinds:
            if kind not in PROJECT_KINDS:
                continue
            prefix = kind_prefix(kind)
            start: str | None = None
            while True:
                result = await self.store.range(prefix, limit=1000, start=start)
                for kv in result.kvs:
                    ident = kv.key[len(prefix) :]
                    if "/" not in ident:
                        self._remember(kind, ident, kv.value)
                if len(result.kvs) < 1000:
                    break
                start = result.kvs[-1].key + "\x00"

    async def _owner(self, kind: Kind, ident: str) -> str | None:
        known = self.owners.get((kind, ident))
        if known is not None:
            return known
        kv = await self.store.get(resource_key(kind, ident))
        return None if kv is None else self._remember(kind, ident, kv.value)

    def _mine(self, owner: str | None) -> bool:
        return owner is not None and owner in (self.caller.project, _PUBLIC)

    async def data(self, event: WatchEvent) -> WatchData | None:
        parts = event.key[len(ROOT) :].split("/")
        try:
            kind = Kind(parts[0])
        except ValueError:
            return None
        if kind not in self.kinds or len(parts) not in (2, 3):
            return None
        ident = parts[1]
        part = "record" if len(parts) == 2 else parts[2]
        value = event.value if event.type is EventType.PUT else None
        if kind is Kind.HOST:
            if part == "alive":
                return WatchData(kind=kind, id=ident, part="alive", alive=value is not None)
            if part != "record":
                return None
            return WatchData(kind=kind, id=ident, part="record", record=_document(value))
        if part == "record":
            owner = self._remember(kind, ident, value) if value is not None else None
            owner = owner or self.owners.get((kind, ident))
        elif part == "status":
            owner = await self._owner(kind, ident)
        else:
            return None
        if not self._mine(owner):
            return None
        shown = ident.split(":", 1)[1] if kind is Kind.KEYPAIR and ":" in ident else ident
        if part == "record":
            return WatchData(kind=kind, id=shown, part="record", record=_document(value))
        return WatchData(kind=kind, id=shown, part="status", status=_document(value))


def _document(value: JsonValue) -> dict[str, JsonValue] | None:
    return value if isinstance(value, dict) else None


def _kinds(caller: Caller, asked: str | None) -> frozenset[Kind]:
    if asked is None or not asked.strip():
        return frozenset(PROJECT_KINDS + (ADMIN_KINDS if caller.is_admin else ()))
    chosen: set[Kind] = set()
    for word in (part.strip() for part in asked.split(",")):
        if not word:
            continue
        kind = next((k for k in (*PROJECT_KINDS, *ADMIN_KINDS) if k.value == word), None)
        if kind is None:
            raise InvalidInput(
                f"{word!r} is not a kind the watch follows",
                hint="choose from " + ", ".join(k.value for k in (*PROJECT_KINDS, *ADMIN_KINDS)),
            )
        if kind in ADMIN_KINDS and not caller.is_admin:
            raise Forbidden("only an admin may watch hosts", hint="leave hosts out of `kinds`")
        chosen.add(kind)
    return frozenset(chosen)


def _event(event_type: str, revision: int | None, data: Mapping[str, object]) -> str:
    lines = [f"event: {event_type}"]
    if revision is not None:
        lines.append(f"id: {revision}")
    lines.append(f"data: {json.dumps(data, separators=(',', ':'))}")
    return "\n".join(lines) + "\n\n"


async def _stream(
    ctx: ApiContext, events_filter: _Filter, from_revision: int, timeout: float | None
) -> AsyncIterator[str]:
    queue: asyncio.Queue[WatchEvent | NubesError] = asyncio.Queue(_QUEUE_SIZE)

    async def pump() -> None:
        try:
            async with ctx.store.watch(ROOT, from_revision) as events:
                async for event in events:
                    await queue.put(event)
        except NubesError as error:  # compacted away, or the store is gone
            await queue.put(error)

    keepalive = float(str(ctx.extras.get(KEEPALIVE_SETTING, KEEPALIVE_SECONDS)))
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    task = asyncio.create_task(pump(), name="watch pump")
    try:
        yield ": watching\n\n"
        while True:
            wait = keepalive
            if deadline is not None:
                wait = min(wait, deadline - loop.time())
                if wait <= 0:
                    return
            try:
                item = await asyncio.wait_for(queue.get(), wait)
            except TimeoutError:
                if deadline is None or loop.time() < deadline:
                    yield ": keep-alive\n\n"
                continue
            if isinstance(item, NubesError):
                yield _event("error", None, item.to_dict())
                return
            data = await events_filter.data(item)
            if data is not None:
                yield _event(item.type.value, item.revision, data.model_dump(exclude_none=True))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


_SSE_DESCRIPTION = (
    "A stream of `text/event-stream` events: `event: put` or `event: delete`, `id: <store "
    "revision>`, `data: <WatchData as JSON>`; `: keep-alive` comments when idle; "
    "`event: error` with `{code, message, hint}` (e.g. `store_compacted`: list again and "
    "watch from the listing's revision) just before the stream ends."
)


@router.get(
    "/watch",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": _SSE_DESCRIPTION,
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    },
)
async def watch(
    ctx: ContextDep,
    caller: CallerDep,
    kinds: Annotated[
        str | None,
        Query(max_length=256, description="comma-separated kinds (default: all you may see)"),
    ] = None,
    since: Annotated[
        int | None, Query(ge=0, description="send changes after this revision (default: now)")
    ] = None,
    timeout: Annotated[
        float | None, Query(gt=0, le=86_400, description="end the stream after this many seconds")
    ] = None,
    last_event_id: Annotated[
        str | None, Header(max_length=32, description="the last `id:` received; resumes after it")
    ] = None,
) -> StreamingResponse:
    """Server-sent events of changes to the caller's resources (and hosts, for admins)."""
    chosen = _kinds(caller, kinds)
    if since is None and last_event_id is not None:
        if not (last_event_id.isascii() and last_event_id.isdigit()):
            raise InvalidInput(
                f"Last-Event-ID {last_event_id!r} is not a revision",
                hint="send the `id:` of the last event received",
            )
        since = int(last_event_id)
    current = await ctx.store.current_revision()
    if since is not None and since > current:
        raise InvalidInput(
            f"revision {since} is in the future (the store is at {current})",
            hint="give a revision a listing or an event returned",
        )
    events_filter = _Filter(ctx.store, caller, chosen)
    await events_filter.prime()
    start = (current if since is None else since) + 1
    return StreamingResponse(
        _stream(ctx, events_filter, start, timeout),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
