"""The event recorder on a real SQLite store: it follows changes, writes each event once
even with two recorders or a restart, resumes from its cursor, and prunes the log."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from nubes.config import EventsConfig
from nubes.errors import StoreUnavailable
from nubes.events.recorder import EventRecorder
from nubes.model.event import EventRecord, EventType
from nubes.store.base import RangeResult
from nubes.store.keys import (
    EVENT_CURSOR_KEY,
    EVENTS_BY_TIME_PREFIX,
    Kind,
    event_key,
    resource_key,
    status_key,
)
from nubes.store.sqlite import SqliteStore

VM_ID = "i-abcdefghij"


def vm(host: str | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "id": VM_ID,
        "project": "alpha",
        "deleting": False,
        "created_at": datetime.now(UTC).isoformat(),
        "spec": {"name": "web", "host": host, **spec},
    }


def status(state: str, host: str = "h1") -> dict[str, Any]:
    return {"state": state, "host": host, "updated_at": datetime.now(UTC).isoformat()}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "nubes.db")
    try:
        yield opened
    finally:
        await opened.close()


@contextlib.asynccontextmanager
async def recording(recorder: EventRecorder) -> AsyncIterator[EventRecorder]:
    stop = asyncio.Event()
    task = asyncio.create_task(recorder.run(stop))
    try:
        await asyncio.wait_for(recorder.ready.wait(), 10)
        yield recorder
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)  # returns: run() never raises


async def events(store: SqliteStore) -> list[EventRecord]:
    listed = await store.range(EVENTS_BY_TIME_PREFIX)
    return sorted((EventRecord.from_json(kv.value) for kv in listed.kvs), key=lambda e: e.id)


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    for _ in range(200):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never saw {what}")


async def states(store: SqliteStore) -> list[tuple[str | None, str | None]]:
    return [(e.previous_state, e.state) for e in await events(store) if e.type is EventType.STATE]


async def test_the_recorder_writes_a_vms_history_as_it_changes(store: SqliteStore) -> None:
    async with recording(EventRecorder(store)):
        await store.put(resource_key(Kind.VM, VM_ID), vm())
        await store.put(resource_key(Kind.VM, VM_ID), vm(host="h1"))
        await store.put(status_key(Kind.VM, VM_ID), status("building"))
        await store.put(status_key(Kind.VM, VM_ID), status("running"))
        await store.delete(resource_key(Kind.VM, VM_ID))  # as the agent does: record first
        await store.delete(status_key(Kind.VM, VM_ID))

        async def all_there() -> bool:
            return any(e.type is EventType.DELETED for e in await events(store))

        await eventually(all_there, "the deleted event")
    assert await states(store) == [
        (None, "pending"),
        ("pending", "scheduled"),
        ("scheduled", "building"),
        ("building", "running"),
    ]
    assert (await store.get(EVENT_CURSOR_KEY)) is not None


async def test_two_recorders_write_each_event_once(store: SqliteStore) -> None:
    async with recording(EventRecorder(store)), recording(EventRecorder(store)):
        for index in range(20):
            ident = f"i-{index:010d}"
            await store.put(resource_key(Kind.VM, ident), {**vm(), "id": ident})

        async def twenty_created() -> bool:
            return sum(e.type is EventType.CREATED for e in await events(store)) == 20

        await eventually(twenty_created, "20 created events")
        await asyncio.sleep(0.5)  # the slower recorder has caught up by now
    found = await events(store)
    assert len(found) == 40  # created + pending each, not twice that
    assert len({e.id for e in found}) == 40


async def test_a_restarted_recorder_records_what_changed_while_it_was_down(
    store: SqliteStore,
) -> None:
    async with recording(EventRecorder(store)) as first:
        await store.put(resource_key(Kind.VM, VM_ID), vm(host="h1"))
        await store.put(status_key(Kind.VM, VM_ID), status("running"))

        async def running() -> bool:
            return ("scheduled", "running") in await states(store)

        await eventually(running, "running")
    before = {e.id for e in await events(store)}
    # While no recorder runs: a new VM, and the first one stopped.
    other = "i-0000000001"
    await store.put(resource_key(Kind.VM, other), {**vm(), "id": other})
    await store.put(status_key(Kind.VM, VM_ID), status("stopped"))
    async with recording(EventRecorder(store)) as second:

        async def caught_up() -> bool:
            found = await events(store)
            return any(e.resource == other for e in found) and any(
                e.state == "stopped" for e in found
            )

        await eventually(caught_up, "the changes made while no recorder ran")
    after = await events(store)
    assert {e.id for e in after} >= before
    assert [e.type for e in after if e.resource == other] == [EventType.CREATED, EventType.STATE]
    assert first.written + second.written == len(after)  # nothing written twice


async def test_pruning_keeps_the_newest_within_count_and_age(store: SqliteStore) -> None:
    now = datetime.now(UTC)
    recorder = EventRecorder(store, EventsConfig(retention_count=100, retention_days=1))
    made = [
        EventRecord(
            id=f"{VM_ID}:q{index:016d}",
            at=now - timedelta(hours=index),
            kind="vms",
            resource=VM_ID,
            type=EventType.REQUEST,
            message=f"event {index}",
        )
        for index in range(150)
    ]
    assert await recorder.write(made) == 150
    assert await recorder.write(made) == 0  # written once
    # Older than a day go first (125 of them); the rest are within the count.
    assert await recorder.prune(now) == 125
    assert sorted(e.message for e in await events(store)) == sorted(
        f"event {index}" for index in range(25)
    )
    recorder.config = EventsConfig(retention_count=100, retention_days=365)
    await recorder.write(made)
    assert await recorder.prune(now) == 50
    kept = await events(store)
    assert len(kept) == 100
    assert max(now - e.at for e in kept) < timedelta(hours=100)
    assert await store.get(event_key(VM_ID, f"q{149:016d}")) is None


class FlakyStore(SqliteStore):
    """Fails its first listings as an unreachable store does."""

    failures = 2

    async def range(
        self, prefix: str, *, limit: int | None = None, start: str | None = None
    ) -> RangeResult:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("the store is away (test)")
        return await super().range(prefix, limit=limit, start=start)


async def test_store_trouble_is_survived_not_raised(tmp_path: Path) -> None:
    flaky = await FlakyStore.open(tmp_path / "flaky.db")
    try:
        async with recording(EventRecorder(flaky)):
            await flaky.put(resource_key(Kind.VM, VM_ID), vm())

            async def created() -> bool:
                return bool(await events(flaky))  # type: ignore[arg-type]

            await eventually(created, "an event after the store came back")
    finally:
        await flaky.close()
