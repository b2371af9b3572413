"""The event log: what happened to each resource, who asked for it, and how it ended.

Members read their project's events; admins read every project's and the global ones
(hosts, users, projects, flavors), or one project's with `project`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from nubes.api.context import ApiContext, Caller, CallerDep, ContextDep
from nubes.api.params import DEFAULT_PAGE, LimitQuery
from nubes.api.routes.watch import KEEPALIVE_SECONDS, KEEPALIVE_SETTING
from nubes.errors import Forbidden, NubesError
from nubes.events.log import CURSOR_PATTERN, EventFilter, parse_cursor, read_events
from nubes.events.storage import decode
from nubes.model.common import Model
from nubes.model.event import EventRecord
from nubes.store.base import EventType
from nubes.store.keys import EVENTS_BY_TIME_PREFIX

router = APIRouter(tags=["events"])

_QUEUE_SIZE = 1024
REPLAY_LIMIT = 1000  # events a watch sends from before it started, at most
_REPLAY_PAGE = 200

ResourceQuery = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="only this resource's events (its id; a host's or key pair's name)",
    ),
]
KindQuery = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=32,
        pattern=r"^[a-z-]+$",
        description="only events of this kind: vms, volumes, hosts...",
    ),
]
ProjectQuery = Annotated[
    str | None,
    Query(min_length=1, max_length=128, description="admins: only this project's events"),
]


CursorQuery = Annotated[
    str | None,
    Query(max_length=340, pattern=CURSOR_PATTERN, description="the previous page's `next`"),
]


class EventView(EventRecord):
    """One event of the log."""


class EventPage(Model):
    items: list[EventView]
    next: str | None = None


def _filter(
    caller: Caller, project: str | None, resource: str | None, kind: str | None
) -> EventFilter:
    if project is not None and project != caller.project and not caller.is_admin:
        raise Forbidden(
            "only an admin may read another project's events",
            hint="leave out `project`: you see your project's events",
        )
    if not caller.is_admin:
        project = caller.project
    return EventFilter(project=project, resource=resource, kind=kind)


@router.get("/events")
async def list_events(
    ctx: ContextDep,
    caller: CallerDep,
    resource: ResourceQuery = None,
    kind: KindQuery = None,
    project: ProjectQuery = None,
    limit: LimitQuery = DEFAULT_PAGE,
    cursor: CursorQuery = None,
    tail: Annotated[
        bool, Query(description="the newest `limit` events (still oldest first), no next page")
    ] = False,
) -> EventPage:
    """Events, oldest first: requests (who asked for what, and the outcome), records
    created, changed and deleted, and state changes (with the reason)."""
    chosen = _filter(caller, project, resource, kind)
    events, following = await read_events(ctx.store, chosen, limit=limit, cursor=cursor, tail=tail)
    return EventPage(
        items=[EventView.model_validate(event.model_dump()) for event in events], next=following
    )


async def _replay(ctx: ApiContext, chosen: EventFilter, after: str) -> list[EventRecord]:
    """The events after cursor `after`, oldest first, REPLAY_LIMIT at most."""
    found: list[EventRecord] = []
    cursor: str | None = after
    while cursor is not None and len(found) < REPLAY_LIMIT:
        page, cursor = await read_events(ctx.store, chosen, limit=_REPLAY_PAGE, cursor=cursor)
        found += page
    return found[:REPLAY_LIMIT]


async def _stream(
    ctx: ApiContext,
    chosen: EventFilter,
    from_revision: int,
    timeout: float | None,
    after: str | None,
) -> AsyncIterator[str]:
    queue: asyncio.Queue[EventRecord | NubesError] = asyncio.Queue(_QUEUE_SIZE)

    async def pump() -> None:
        try:
            async with ctx.store.watch(EVENTS_BY_TIME_PREFIX, from_revision) as changes:
                async for change in changes:
                    # A put is a new event (they are written once); deletes are pruning.
                    event = decode(change.value) if change.type is EventType.PUT else None
                    if event is not None and chosen.keeps(event):
                        await queue.put(event)
        except NubesError as error:
            await queue.put(error)

    keepalive = float(str(ctx.extras.get(KEEPALIVE_SETTING, KEEPALIVE_SECONDS)))
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    task = asyncio.create_task(pump(), name="event watch pump")
    sent: set[str] = set()  # replayed events the watch may bring again
    try:
        yield ": watching events\n\n"
        if after is not None:
            # Read after the watch's start was fixed: an event is in one or both, never lost.
            for event in await _replay(ctx, chosen, after):
                sent.add(event.id)
                yield f"event: event\ndata: {event.model_dump_json()}\n\n"
        while True:
            wait = keepalive
            if deadline is not None:
                wait = min(wait, deadline - loop.time())
                if wait <= 0:
                    return
            try:
                item = await asyncio.wait_for(queue.get(), wait)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if isinstance(item, NubesError):
                yield f"event: error\ndata: {json.dumps(item.to_dict())}\n\n"
                return
            if item.id in sent:
                continue
            yield f"event: event\ndata: {item.model_dump_json()}\n\n"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


_SSE_DESCRIPTION = (
    "A stream of `text/event-stream` events: `event: event` with `data: <EventView as "
    "JSON>` for each new event (first, with `after`, the events after that cursor); "
    "`: keep-alive` comments when idle; `event: error` with "
    "`{code, message, hint}` just before the stream ends on a store failure."
)


@router.get(
    "/events/watch",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": _SSE_DESCRIPTION,
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    },
)
async def watch_events(
    ctx: ContextDep,
    caller: CallerDep,
    resource: ResourceQuery = None,
    kind: KindQuery = None,
    project: ProjectQuery = None,
    timeout: Annotated[
        float | None, Query(gt=0, le=86_400, description="end the stream after this many seconds")
    ] = None,
    after: Annotated[
        str | None,
        Query(
            max_length=340,
            pattern=CURSOR_PATTERN,
            description="first send the events after this cursor (a listing's `next`, or "
            f"`<microseconds since 1970>_-`), {REPLAY_LIMIT} at most: nothing written "
            "between a listing and the watch is missed",
        ),
    ] = None,
) -> StreamingResponse:
    """New events as server-sent events, as they are written (filtered as the listing)."""
    chosen = _filter(caller, project, resource, kind)
    if after is not None:
        parse_cursor(after)  # a bad one is a 422 now, not an error in the stream
    start = await ctx.store.current_revision() + 1
    return StreamingResponse(
        _stream(ctx, chosen, start, timeout, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
