"""The event recorder: follows every resource in the store and writes its history to the
event log (`/nubes/events/`), and prunes the log to its retention limits.

It runs beside the scheduler daemon. It remembers the last value of each key (a watch
event carries only the new one) and turns each change into events (nubes.events.changes).
Event keys come from the store revision of the change, and each is written only if
absent, so two recorders, or one that replays after a restart, write each event once.
A cursor in the store (the last revision written for) lets a restart resume: it watches
from there, knowing the value at the cursor of every key unchanged since; a key changed
meanwhile gets events with what is known (its new state, no previous one). When the
history was compacted past the cursor, the changes in the gap are lost (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from nubes.config import EventsConfig
from nubes.errors import CompactedError, StoreError
from nubes.events.changes import (
    RECORDED_KINDS,
    UNKNOWN,
    Before,
    Change,
    KeyPath,
    events_of,
    parse_key,
)
from nubes.events.storage import EVENTS_PER_TXN, write_once
from nubes.model.event import EventRecord
from nubes.store.base import (
    Delete,
    EventType,
    JsonValue,
    KeyValue,
    Put,
    Store,
    WatchEvent,
)
from nubes.store.keys import (
    EVENT_CURSOR_KEY,
    EVENTS_BY_TIME_PREFIX,
    EVENTS_NEWEST_PREFIX,
    ROOT,
    event_key,
    event_newest_key,
    kind_prefix,
    resource_key,
    status_key,
)
from nubes.store.listing import range_all

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0
PRUNE_SECONDS = 300.0
BATCH_CHANGES = 2048  # store changes turned into events per round of writes
_QUEUE_SIZE = 8192
_REMEMBERED_TIMES = 100_000


@dataclass(slots=True)
class _Known:
    value: JsonValue | object  # the value, or UNKNOWN
    revision: int  # the revision it is known at


class EventRecorder:
    """Run with `await recorder.run(stop)`; `ready` is set once it follows the store."""

    def __init__(
        self,
        store: Store,
        config: EventsConfig | None = None,
        *,
        prune_interval: float = PRUNE_SECONDS,
    ) -> None:
        self.store = store
        self.config = config or EventsConfig()
        self.prune_interval = prune_interval
        self.ready = asyncio.Event()
        self.written = 0  # events this recorder wrote
        self._known: dict[str, _Known] = {}
        self._unknown_until = 0  # a key not known before this revision had an unknown value
        self._skip_cursor = False
        self._last_at: OrderedDict[str, datetime] = OrderedDict()
        # How many events the log holds, while following (None: count when pruning). Kept
        # from the watch, which sees every writer's events; about right, not exact.
        self._count: int | None = None
        self._count_from = 0  # changes up to this revision are in the count
        self._seen_revision = 0
        self._pruned_revision = 0  # the last prune's deletes: the count is stale before it

    # -- the main loop ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Records and prunes until `stop` is set; never raises (it shares a task group
        with the scheduler): store trouble and bugs are logged and retried."""
        while not stop.is_set():
            try:
                start = await self._prime()
                self.ready.set()
                await self._follow(start, stop)
            except CompactedError:
                log.warning(
                    "events: the store's history was compacted past what was recorded; "
                    "changes in that gap have no events"
                )
                self._skip_cursor = True
            except StoreError as error:
                log.warning("events: store trouble (%s); again in %s s", error, RETRY_SECONDS)
                await _pause(stop, RETRY_SECONDS)
            except Exception:
                log.exception("events: the recorder failed; starting again in %s s", RETRY_SECONDS)
                await _pause(stop, RETRY_SECONDS)

    async def _prime(self) -> int:
        """Learns every recorded key (as it was at the cursor, when resuming); returns
        the revision to watch from."""
        cursor = None if self._skip_cursor else await self._read_cursor()
        self._skip_cursor = False
        listings = [
            await range_all(self.store, kind_prefix(kind)) for kind in sorted(RECORDED_KINDS)
        ]
        first, last = listings[0].revision, max(listed.revision for listed in listings)
        if cursor is not None and cursor > last:
            cursor = None  # not this store's history (copied or restored): start afresh
        self._known.clear()
        for listed in listings:
            for kv in listed.kvs:
                if parse_key(kv.key) is not None:
                    self._learn(kv, cursor)
        counted = await range_all(self.store, EVENTS_NEWEST_PREFIX)
        self._count, self._count_from = len(counted.kvs), counted.revision
        if cursor is None:
            self._unknown_until = 0
            return first + 1
        # A key the listing missed was deleted after the cursor: its value then is unknown.
        self._unknown_until = last + 1
        log.info("events: resuming after revision %d", cursor)
        return cursor + 1

    def _learn(self, kv: KeyValue, cursor: int | None) -> None:
        if cursor is None or kv.mod_revision <= cursor:
            self._known[kv.key] = _Known(kv.value, kv.mod_revision)
        elif kv.create_revision <= cursor:
            self._known[kv.key] = _Known(UNKNOWN, cursor)  # changed while nobody recorded
        # else: made after the cursor; its creation is replayed

    async def _read_cursor(self) -> int | None:
        kv = await self.store.get(EVENT_CURSOR_KEY)
        value = None if kv is None else kv.value
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    async def _follow(self, start: int, stop: asyncio.Event) -> None:
        queue: asyncio.Queue[WatchEvent] = asyncio.Queue(_QUEUE_SIZE)

        async def pump() -> None:
            async with self.store.watch(ROOT, start) as changes:
                async for change in changes:
                    await queue.put(change)

        loop = asyncio.get_running_loop()
        pumping = asyncio.create_task(pump(), name="events watch")
        stopping = asyncio.create_task(stop.wait())
        next_prune = loop.time()
        try:
            while not stop.is_set():
                if loop.time() >= next_prune:
                    await self.prune()
                    next_prune = loop.time() + self.prune_interval
                getting = asyncio.create_task(queue.get())
                try:
                    await asyncio.wait(
                        [getting, pumping, stopping],
                        timeout=max(0.0, next_prune - loop.time()),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    getting.cancel()
                if pumping.done():
                    pumping.result()  # the watch ended: raise its error for run()
                    return
                if not getting.done() or getting.cancelled():
                    continue
                batch = [getting.result()]
                while len(batch) < BATCH_CHANGES and not queue.empty():
                    batch.append(queue.get_nowait())
                await self._record(batch, complete=queue.empty())
        finally:
            for task in (pumping, stopping):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- turning changes into events --------------------------------------------------------

    async def _record(self, batch: Sequence[WatchEvent], *, complete: bool) -> None:
        events: list[EventRecord] = []
        for change in batch:
            events += self.apply(change)
        if not events:
            return  # no cursor write either: the recorder's own writes would wake it again
        # The last revision may continue in the next batch (one transaction, many keys):
        # then the cursor stays before it, and a restart replays it (written once).
        last = batch[-1].revision
        await self.write(events, last if complete else last - 1)

    def apply(self, change: WatchEvent) -> list[EventRecord]:
        """Remembers `change` and returns its events."""
        self._count_event(change)
        path = parse_key(change.key)
        if path is None:
            return []
        known = self._known.get(change.key)
        if known is not None and change.revision <= known.revision:
            return []  # the listing already had it
        before: Before = None
        if known is not None:
            before = known.value
        elif change.revision < self._unknown_until and change.version != 1:
            before = UNKNOWN  # existed before the listing, changed while nobody recorded
        after = change.value if change.type is EventType.PUT else None
        if after is None:
            self._known.pop(change.key, None)
        else:
            self._known[change.key] = _Known(after, change.revision)
        try:
            events = events_of(self._change(path, change.revision, before, after))
        except Exception:  # one odd record must not stop the log
            log.exception("events: cannot describe the change of %s; skipped", change.key)
            return []
        return [self._in_order(event) for event in events]

    def _count_event(self, change: WatchEvent) -> None:
        self._seen_revision = max(self._seen_revision, change.revision)
        if (
            self._count is None
            or change.revision <= self._count_from
            or not change.key.startswith(EVENTS_BY_TIME_PREFIX)
        ):
            return
        if change.type is EventType.DELETE:
            self._count -= 1
        elif change.version == 1:  # events are written once; a rewrite is no new event
            self._count += 1

    def _change(self, path: KeyPath, revision: int, before: Before, after: JsonValue) -> Change:
        record: JsonValue = None
        status: JsonValue = None
        if path.part == "status":
            record = self._value(resource_key(path.kind, path.ident))
        else:
            status = self._value(status_key(path.kind, path.ident))
        return Change(
            path,
            revision,
            before,
            after,
            record=record,
            status=status,
            seen_at=datetime.now(UTC),
        )

    def _value(self, key: str) -> JsonValue:
        known = self._known.get(key)
        return None if known is None or known.value is UNKNOWN else known.value

    def _in_order(self, event: EventRecord) -> EventRecord:
        """The event, no earlier than the resource's last one: clocks of different
        writers (agent, API, recorder) must not reorder a resource's history."""
        last = self._last_at.get(event.resource)
        if last is not None and event.at < last:
            event = event.model_copy(update={"at": last})
        self._last_at[event.resource] = event.at
        self._last_at.move_to_end(event.resource)
        while len(self._last_at) > _REMEMBERED_TIMES:
            self._last_at.popitem(last=False)
        return event

    # -- writing and pruning ----------------------------------------------------------------

    async def write(self, events: Sequence[EventRecord], cursor: int | None = None) -> int:
        """Writes the events that are not in the log yet (and the cursor, after the last);
        returns how many were new.

        Raises:
            StoreError: the store cannot be written.
        """
        new = 0
        for start in range(0, len(events), EVENTS_PER_TXN):
            chunk = events[start : start + EVENTS_PER_TXN]
            last = start + EVENTS_PER_TXN >= len(events)
            extra = [Put(EVENT_CURSOR_KEY, cursor)] if last and cursor is not None else []
            new += await write_once(self.store, chunk, extra)
        self.written += new
        return new

    async def prune(self, moment: datetime | None = None) -> int:
        """Removes events older than `retention_days`, then the oldest beyond
        `retention_count`, from the old end of the log a page at a time; returns how many
        went. The count is the one kept from the watch while following (counted here
        otherwise), so pruning reads only what it removes.

        Raises:
            StoreError: the store cannot be reached.
        """
        moment = moment or datetime.now(UTC)
        cutoff = moment - timedelta(days=self.config.retention_days)
        # By-time names start with the zero-padded time: older ones sort below this.
        older_than = f"{int(cutoff.timestamp() * 1_000_000):020d}"
        # While the last prune's deletes are not in the count yet, it is too high.
        stale = self._count is not None and self._seen_revision < self._pruned_revision
        removed = 0
        while True:
            page = await self._oldest(EVENTS_PER_TXN)
            doomed = [kv for kv in page if kv.key[len(EVENTS_BY_TIME_PREFIX) :] < older_than]
            removed += await self._delete(doomed)
            if len(doomed) < EVENTS_PER_TXN:
                break
        if self._count is None:
            count = len((await range_all(self.store, EVENTS_NEWEST_PREFIX)).kvs)
        elif stale:
            count = 0  # count again next time
        else:
            count = self._count - removed
        excess = count - self.config.retention_count
        after: str | None = None
        while excess > 0:
            # On from the last page, not from the oldest again: two recorders pruning at
            # once delete the same events, not twice as many.
            page = await self._oldest(min(EVENTS_PER_TXN, excess), after)
            if not page:
                break
            gone = await self._delete(page)
            removed, excess, after = removed + gone, excess - len(page), page[-1].key
        if removed:
            log.info("events: pruned %d old events", removed)
        return removed

    async def _oldest(self, count: int, after: str | None = None) -> list[KeyValue]:
        start = None if after is None else after + "\x00"
        return (await self.store.range(EVENTS_BY_TIME_PREFIX, limit=count, start=start)).kvs

    async def _delete(self, doomed: Sequence[KeyValue]) -> int:
        """Deletes these by-time keys with their index keys; returns how many events."""
        if not doomed:
            return 0
        deletes: list[Delete] = []
        for kv in doomed:
            deletes += [Delete(key) for key in _index_keys(kv)]
        result = await self.store.txn([], deletes)
        self._pruned_revision = result.revision
        return len(doomed)


def _index_keys(kv: KeyValue) -> list[str]:
    """The keys of the event `kv` holds (by time): itself and its two index keys, read
    from the raw value (no model: pruning reads many). An unreadable event loses its
    by-resource key only, which readers skip (it names no event)."""
    keys = [kv.key]
    name = kv.key[len(EVENTS_BY_TIME_PREFIX) :]
    micros, _, ident = name.partition("_")
    value = kv.value if isinstance(kv.value, dict) else {}
    resource, event_id = value.get("resource"), value.get("id")
    with contextlib.suppress(ValueError):
        keys.append(event_newest_key(int(micros), ident))
        if isinstance(resource, str) and isinstance(event_id, str) and event_id == ident:
            keys.append(event_key(resource, event_id[len(resource) + 1 :]))
    return keys


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
