"""Reading and pruning the event log on a real SQLite store take bounded work: a page,
the tail and a prune read about what they return or remove, never the whole log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from nubes.config import EventsConfig
from nubes.events.log import SCAN_BUDGET, EventFilter, read_events
from nubes.events.recorder import EventRecorder
from nubes.model.event import EventRecord, EventType
from nubes.store.base import RangeResult
from nubes.store.keys import EVENTS_BY_TIME_PREFIX
from nubes.store.sqlite import SqliteStore
from tests.unit.test_events_recorder import eventually, recording

START = datetime(2025, 1, 1, tzinfo=UTC)


class CountingStore(SqliteStore):
    """Counts the keys its ranges return: the work a reader does."""

    keys_read = 0

    async def range(
        self, prefix: str, *, limit: int | None = None, start: str | None = None
    ) -> RangeResult:
        found = await super().range(prefix, limit=limit, start=start)
        self.keys_read += len(found.kvs)
        return found


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CountingStore]:
    opened = await CountingStore.open(tmp_path / "nubes.db")
    try:
        yield opened
    finally:
        await opened.close()


def made(count: int, project: str, first: int = 0) -> list[EventRecord]:
    return [
        EventRecord(
            id=f"sg-{project}:q{index:016d}",
            at=START + timedelta(seconds=index),
            project=project,
            kind="security-groups",
            resource=f"sg-{project}",
            type=EventType.REQUEST,
            message=f"{project} {index}",
        )
        for index in range(first, first + count)
    ]


async def test_a_members_pages_skip_other_projects_in_bounded_steps(store: CountingStore) -> None:
    recorder = EventRecorder(store)
    await recorder.write(made(3, "alpha") + made(3 * SCAN_BUDGET, "beta", first=10))
    await recorder.write(made(2, "alpha", first=10 + 3 * SCAN_BUDGET))
    alpha = EventFilter(project="alpha")
    seen: list[str] = []
    cursor: str | None = None
    requests = 0
    while True:
        store.keys_read = 0
        page, cursor = await read_events(store, alpha, limit=100, cursor=cursor)
        assert store.keys_read <= SCAN_BUDGET + 256  # one request never reads the whole log
        seen += [event.message for event in page]
        requests += 1
        if cursor is None:
            break
    assert seen == [
        f"alpha {index}" for index in (0, 1, 2, 10 + 3 * SCAN_BUDGET, 11 + 3 * SCAN_BUDGET)
    ]
    assert requests >= 3
    store.keys_read = 0
    newest, _ = await read_events(store, alpha, limit=2, tail=True)
    assert [event.message for event in newest] == seen[-2:]
    assert store.keys_read <= 4


async def test_the_tail_and_a_page_read_about_what_they_return(store: CountingStore) -> None:
    recorder = EventRecorder(store)
    await recorder.write(made(1000, "alpha"))
    store.keys_read = 0
    newest, following = await read_events(store, EventFilter(), limit=10, tail=True)
    assert [event.message for event in newest] == [f"alpha {i}" for i in range(990, 1000)]
    assert following is None
    assert store.keys_read == 10
    store.keys_read = 0
    page, following = await read_events(store, EventFilter(), limit=10)
    assert [event.message for event in page] == [f"alpha {i}" for i in range(10)]
    assert following is not None
    assert store.keys_read == 11
    later, _ = await read_events(store, EventFilter(), limit=10, cursor=following)
    assert later[0].message == "alpha 10"
    history, _ = await read_events(store, EventFilter(resource="sg-alpha"), limit=5, tail=True)
    assert [event.message for event in history] == [f"alpha {i}" for i in range(995, 1000)]


async def test_a_following_recorder_prunes_by_count_reading_only_what_goes(
    store: CountingStore,
) -> None:
    recorder = EventRecorder(
        store, EventsConfig(retention_count=100, retention_days=3650), prune_interval=3600
    )
    await recorder.write(made(130, "alpha"))

    async def left() -> list[str]:
        return [kv.value["message"] for kv in (await store.range(EVENTS_BY_TIME_PREFIX)).kvs]

    async with recording(recorder):  # counts the log once, then prunes as it starts
        await eventually(lambda: _has(left, 100), "the log pruned to 100")
        await recorder.write(made(20, "alpha", first=200))
        for _ in range(200):  # its count follows the watch: prune once it saw the 20
            store.keys_read = 0
            await recorder.prune()
            assert store.keys_read <= 20 + 2 * 42  # what goes, and a look at the oldest
            kept = await left()
            assert len(kept) >= 100
            if len(kept) == 100:
                break
            await asyncio.sleep(0.05)
        assert kept[0] == "alpha 50"
        assert kept[-1] == "alpha 219"


async def _has(read: Callable[[], Awaitable[list[str]]], count: int) -> bool:
    return len(await read()) == count
