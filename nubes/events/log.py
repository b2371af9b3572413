"""Reading the event log: one resource's history is a prefix range, the whole log is read
and sorted by time (it is bounded by retention); pages resume after a cursor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nubes.errors import InvalidInput
from nubes.events.recorder import range_all
from nubes.model.event import EventRecord
from nubes.store.base import JsonValue, Store
from nubes.store.keys import EVENTS_PREFIX, resource_events_prefix

CURSOR_PATTERN = r"^[0-9]{1,20}_[A-Za-z0-9._:-]{1,300}$"
_CURSOR = re.compile(CURSOR_PATTERN)


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
    """Where a page that ended on `event` resumes."""
    return f"{_micros(event)}_{event.id}"


def _micros(event: EventRecord) -> int:
    return int(event.at.timestamp() * 1_000_000)


def _order(event: EventRecord) -> tuple[int, str]:
    return _micros(event), event.id


def parse_cursor(cursor: str) -> tuple[int, str]:
    """Raises InvalidInput: `cursor` is not one a listing returned."""
    if not _CURSOR.fullmatch(cursor):
        raise InvalidInput(
            f"cursor {cursor!r} is not one an event listing returned",
            hint="pass the `next` of the previous page",
        )
    micros, _, ident = cursor.partition("_")
    return int(micros), ident


def decode(value: JsonValue) -> EventRecord | None:
    """The event a stored value holds; None for one this version cannot read."""
    try:
        return EventRecord.from_json(value)
    except InvalidInput:
        return None


async def read_events(
    store: Store,
    chosen: EventFilter,
    *,
    limit: int,
    cursor: str | None = None,
    tail: bool = False,
) -> tuple[list[EventRecord], str | None]:
    """A page of the events `chosen` keeps, oldest first, and the cursor of the next page
    (None at the end). `tail`: the newest `limit` instead (no next page).

    Raises:
        InvalidInput: a bad cursor or resource.
        StoreError: the store cannot be reached.
    """
    after = parse_cursor(cursor) if cursor is not None else None
    if chosen.resource is not None:
        try:
            prefix = resource_events_prefix(chosen.resource)
        except ValueError:
            raise InvalidInput(f"{chosen.resource!r} is not a resource id") from None
    else:
        prefix = EVENTS_PREFIX
    listed = await range_all(store, prefix)
    events = [
        event
        for event in (decode(kv.value) for kv in listed.kvs)
        if event is not None and chosen.keeps(event)
    ]
    events.sort(key=_order)
    if tail:
        return events[-limit:], None
    if after is not None:
        events = [event for event in events if _order(event) > after]
    page = events[:limit]
    following = cursor_of(page[-1]) if len(events) > limit else None
    return page, following
