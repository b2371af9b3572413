"""How the event log sits in the store: each event under its time (so pages, the tail and
pruning are bounded range reads), indexed newest first and by resource, all three keys
written in one transaction, and only when the by-resource key is absent (written once).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from nubes.errors import InvalidInput
from nubes.model.event import EventRecord
from nubes.store.base import MAX_TXN_OPERATIONS, Compare, Delete, Get, JsonValue, Put, Store
from nubes.store.keys import event_key, event_newest_key, event_time_key, event_time_name

KEYS_PER_EVENT = 3
EVENTS_PER_TXN = (MAX_TXN_OPERATIONS - 1) // KEYS_PER_EVENT  # room for one extra Put


def micros_of(event: EventRecord) -> int:
    return int(event.at.timestamp() * 1_000_000)


def time_name_of(event: EventRecord) -> str:
    """The event's place in time order: its by-time key's last segment and its cursor."""
    return event_time_name(micros_of(event), event.id)


def suffix_of(event: EventRecord) -> str:
    """The part of an event's id after its resource: the last segment of its index key."""
    return event.id[len(event.resource) + 1 :]


def keys_of(event: EventRecord) -> tuple[str, str, str]:
    """The event's by-resource key (its write-once guard), by-time and newest-first keys."""
    return (
        event_key(event.resource, suffix_of(event)),
        event_time_key(time_name_of(event)),
        event_newest_key(micros_of(event), event.id),
    )


def decode(value: JsonValue) -> EventRecord | None:
    """The event a stored value holds; None for one this version cannot read."""
    try:
        return EventRecord.from_json(value)
    except InvalidInput:
        return None


def deletes_of(event: EventRecord) -> list[Delete]:
    return [Delete(key) for key in keys_of(event)]


async def write_once(store: Store, events: Sequence[EventRecord], extra: Sequence[Put] = ()) -> int:
    """Writes each event whose by-resource key is absent, with `extra`, in one transaction
    (two when some are there already); returns how many were written. At most
    EVENTS_PER_TXN events and one extra Put.

    Raises:
        StoreError: the store cannot be written.
        ValueError: too many events for one transaction (a bug).
    """
    if len(events) > EVENTS_PER_TXN or len(extra) > 1:
        raise ValueError(f"write at most {EVENTS_PER_TXN} events and one extra put at once")
    chosen = {keys_of(event)[0]: event for event in events}
    result = await store.txn(
        [Compare.absent(guard) for guard in chosen],
        [*_puts(chosen.values()), *extra],
        [Get(guard) for guard in chosen],
    )
    if result.succeeded:
        return len(chosen)
    present = {kv.key for found in result.responses if isinstance(found, list) for kv in found}
    missing = {guard: event for guard, event in chosen.items() if guard not in present}
    result = await store.txn(
        [Compare.absent(guard) for guard in missing], [*_puts(missing.values()), *extra]
    )
    # Lost again: another writer wrote these meanwhile, which is as good.
    return len(missing) if result.succeeded else 0


def _puts(events: Iterable[EventRecord]) -> list[Put]:
    puts: list[Put] = []
    for event in events:
        guard, by_time, newest = keys_of(event)
        name = time_name_of(event)
        puts += [Put(guard, name), Put(by_time, event.to_json()), Put(newest, name)]
    return puts


async def read_by_time(store: Store, time_names: Sequence[str]) -> dict[str, EventRecord]:
    """The events of these by-time names that are still there and readable, by name.

    Raises:
        StoreError: the store cannot be reached.
    """
    found: dict[str, EventRecord] = {}
    for start in range(0, len(time_names), MAX_TXN_OPERATIONS):
        chunk = time_names[start : start + MAX_TXN_OPERATIONS]
        result = await store.txn([], [Get(event_time_key(name)) for name in chunk])
        for name, response in zip(chunk, result.responses, strict=True):
            for kv in response if isinstance(response, list) else []:
                event = decode(kv.value)
                if event is not None:
                    found[name] = event
    return found
