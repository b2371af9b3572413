"""Reading the event log a page at a time: forward in time from a cursor, the newest
`limit` (the tail), or one resource's history, each a bounded number of store reads.

A reader that sees only some events (a member: its project's) may get a page with fewer
than `limit` events, even none, and a `next`: the page stopped after SCAN_BUDGET events
of the log, so one request never reads the whole log; following `next` goes on.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from nubes.errors import InvalidInput
from nubes.events.storage import decode, read_by_time, time_name_of
from nubes.model.event import EventRecord
from nubes.store.base import Store
from nubes.store.keys import (
    EVENTS_BY_TIME_PREFIX,
    EVENTS_NEWEST_PREFIX,
    event_time_name,
    resource_events_prefix,
)
from nubes.store.listing import range_all

CURSOR_PATTERN = r"^[0-9]{1,20}_[A-Za-z0-9._:-]{1,300}$"
_CURSOR = re.compile(CURSOR_PATTERN)
SCAN_BUDGET = 2000  # events one request reads at most, kept or skipped
READ_PAGE = 256  # the most events one store read asks for

# (by-time name, the event; None: gone meanwhile or unreadable)
_Chunk = list[tuple[str, EventRecord | None]]


@dataclass(frozen=True)
class EventFilter:
    """Which events a reader gets: `project` None means every project's and the global ones."""

    project: str | None = None
    resource: str | None = None
    kind: str | None = None

    def keeps(self, event: EventRecord) -> bool:
        if self.project is not None and event.project != self.project:
            return False
        if self.resource is not None and event.resource != self.resource:
            return False
        return self.kind is None or event.kind == self.kind


def cursor_of(event: EventRecord) -> str:
    """Where a page that ended on `event` resumes: its place in time order."""
    return time_name_of(event)


def parse_cursor(cursor: str) -> str:
    """The by-time name a cursor stands for.

    Raises:
        InvalidInput: `cursor` is not one a listing returned.
    """
    if not _CURSOR.fullmatch(cursor):
        raise InvalidInput(
            f"cursor {cursor!r} is not one an event listing returned",
            hint="pass the `next` of the previous page",
        )
    micros, _, ident = cursor.partition("_")
    return event_time_name(int(micros), ident)


async def read_events(
    store: Store,
    chosen: EventFilter,
    *,
    limit: int,
    cursor: str | None = None,
    tail: bool = False,
    budget: int = SCAN_BUDGET,
) -> tuple[list[EventRecord], str | None]:
    """A page of the events `chosen` keeps, oldest first, and the cursor of the next page
    (None at the end). `tail`: the newest `limit` instead (no next page). At most `budget`
    events are read (then the page may be short, and `next` resumes after the last read).

    Raises:
        InvalidInput: a bad cursor or resource.
        StoreError: the store cannot be reached.
    """
    after = parse_cursor(cursor) if cursor is not None else None
    if chosen.resource is not None:
        names = await _resource_names(store, chosen.resource)
        if tail:
            names.reverse()
        elif after is not None:
            names = [name for name in names if name > after]
        chunks = _by_name(store, names, limit)
    elif tail:
        chunks = _newest(store, limit)
    else:
        chunks = _by_time(store, after, limit)
    page, following = await _collect(chunks, chosen, limit, budget, whole=not tail)
    if tail:
        return sorted(page, key=time_name_of), None
    return page, following


async def _collect(
    chunks: AsyncIterator[_Chunk], chosen: EventFilter, limit: int, budget: int, *, whole: bool
) -> tuple[list[EventRecord], str | None]:
    """Up to `limit` kept events and where to resume (None: nothing left). `whole`: look
    for one more kept event, so a full last page says there is none after it."""
    page: list[EventRecord] = []
    read, last = 0, None
    async for chunk in chunks:
        for name, event in chunk:
            if event is not None and chosen.keeps(event):
                if len(page) == limit:
                    return page, cursor_of(page[-1])
                page.append(event)
                if len(page) == limit and not whole:
                    return page, None
            read, last = read + 1, name
        if read >= budget:
            return page, last
    return page, None


def _next_size(size: int) -> int:
    return min(READ_PAGE, size * 2)


async def _by_time(store: Store, after: str | None, limit: int) -> AsyncIterator[_Chunk]:
    start = EVENTS_BY_TIME_PREFIX + (f"{after}\x00" if after is not None else "")
    size = min(READ_PAGE, limit + 1)
    while True:
        got = await store.range(EVENTS_BY_TIME_PREFIX, limit=size, start=start)
        yield [(kv.key[len(EVENTS_BY_TIME_PREFIX) :], decode(kv.value)) for kv in got.kvs]
        if len(got.kvs) < size:
            return
        start, size = got.kvs[-1].key + "\x00", _next_size(size)


async def _newest(store: Store, limit: int) -> AsyncIterator[_Chunk]:
    start: str | None = None
    size = min(READ_PAGE, limit)
    while True:
        got = await store.range(EVENTS_NEWEST_PREFIX, limit=size, start=start)
        names = [kv.value for kv in got.kvs if isinstance(kv.value, str)]
        found = await read_by_time(store, names)
        yield [(name, found.get(name)) for name in names]
        if len(got.kvs) < size:
            return
        start, size = got.kvs[-1].key + "\x00", _next_size(size)


async def _by_name(store: Store, names: Sequence[str], limit: int) -> AsyncIterator[_Chunk]:
    start, size = 0, min(READ_PAGE, limit + 1)
    while start < len(names):
        chunk = names[start : start + size]
        found = await read_by_time(store, chunk)
        yield [(name, found.get(name)) for name in chunk]
        start, size = start + len(chunk), _next_size(size)


async def _resource_names(store: Store, resource: str) -> list[str]:
    """The by-time names of one resource's events, in time order (small values only)."""
    try:
        prefix = resource_events_prefix(resource)
    except ValueError:
        raise InvalidInput(f"{resource!r} is not a resource id") from None
    listed = await range_all(store, prefix)
    return sorted(kv.value for kv in listed.kvs if isinstance(kv.value, str))
