"""The SQLite store shared by several processes, as API, scheduler and agent share it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from nubes.errors import StoreUnavailable
from nubes.store import EventType
from nubes.store.sqlite import SqliteStore

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]


def worker(*arguments: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.store_worker", *map(str, arguments)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )


def finish(processes: list[subprocess.Popen[str]], timeout: float = 120) -> None:
    try:
        for process in processes:
            assert process.wait(timeout=timeout) == 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


async def test_cas_increments_from_four_processes_lose_nothing(tmp_path: Path) -> None:
    database = tmp_path / "nubes.db"
    processes = [worker("increment", database, "/counter", 150) for _ in range(4)]
    await asyncio.to_thread(finish, processes)
    async with await SqliteStore.open(database) as store:
        counter = await store.get("/counter")
    assert counter is not None
    assert (counter.value, counter.version) == (600, 600)


async def test_a_watch_sees_every_write_of_another_process_in_order(tmp_path: Path) -> None:
    database = tmp_path / "nubes.db"
    async with await SqliteStore.open(database) as store:
        start = await store.current_revision()
        processes = [worker("put-many", database, "/w/", 2000)]
        try:
            seen = []
            async with store.watch("/w/", from_revision=start + 1) as events:
                async for event in events:
                    seen.append(event)
                    if len(seen) == 2000:
                        break
        finally:
            await asyncio.to_thread(finish, processes)
    assert [event.value for event in seen] == list(range(2000))
    assert all(event.type is EventType.PUT for event in seen)
    assert [event.revision for event in seen] == list(range(start + 1, start + 2001))


async def test_a_lease_left_by_a_dead_process_expires_in_a_surviving_one(tmp_path: Path) -> None:
    database = tmp_path / "nubes.db"
    holder = worker("hold-lease", database, "/hosts/h1/alive", 2)
    try:
        assert holder.stdout is not None
        assert await asyncio.to_thread(holder.stdout.readline) == "ready\n"
    finally:
        holder.kill()
        holder.wait()
    async with await SqliteStore.open(database) as store:
        assert await store.get("/hosts/h1/alive") is not None
        async with store.watch("/hosts/") as events:
            event = await asyncio.wait_for(anext(events), 10)
    assert (event.type, event.key) == (EventType.DELETE, "/hosts/h1/alive")


async def test_the_database_file_is_private_to_its_owner(tmp_path: Path) -> None:
    database = tmp_path / "state" / "nubes.db"
    async with await SqliteStore.open(database) as store:
        await store.put("/k", 1)
    assert database.stat().st_mode & 0o777 == 0o600
    assert database.parent.stat().st_mode & 0o777 == 0o700


async def test_a_file_that_is_not_a_database_is_refused_clearly(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database, but long enough to have a header " * 20)
    with pytest.raises(StoreUnavailable) as raised:
        await SqliteStore.open(notes)
    assert str(notes) in str(raised.value)
    assert "not a database" in str(raised.value)
    assert raised.value.code == "store_unavailable"


async def test_a_path_that_cannot_be_created_is_refused_clearly(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreUnavailable, match="cannot open the SQLite store"):
        await SqliteStore.open(blocker / "nubes.db")
