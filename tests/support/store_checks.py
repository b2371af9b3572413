"""Conformance checks of the store's hardest promises, as plain functions.

The conformance suite runs them against every engine; the unit tests run them
against deliberately broken stores to prove that they can fail.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable

from nubes.store import Compare, Delete, EventType, KeyValue, Put, Store, WatchEvent

StoreFactory = Callable[[], Awaitable[Store]]


def unique_prefix(name: str) -> str:
    return f"/test/{name}-{secrets.token_hex(4)}/"


async def check_cas_race(open_client: StoreFactory, writers: int = 16, rounds: int = 20) -> None:
    """Writers that all read the same revision race to swap: exactly one wins each round."""
    clients = [await open_client() for _ in range(writers)]
    key = unique_prefix("cas") + "contested"
    await clients[0].put(key, {"round": -1, "writer": None})
    for round_number in range(rounds):
        # Everybody reads before anybody writes, so every swap starts from the same revision.
        seen = await asyncio.gather(*(client.get(key) for client in clients))
        assert all(kv is not None for kv in seen)
        assert len({kv.mod_revision for kv in seen if kv is not None}) == 1

        async def swap(writer: int, kv: KeyValue | None, round_number: int) -> bool:
            assert kv is not None
            result = await clients[writer].txn(
                [Compare.unchanged(kv)],
                [Put(key, {"round": round_number, "writer": writer})],
            )
            return result.succeeded

        outcomes = await asyncio.gather(
            *(swap(writer, seen[writer], round_number) for writer in range(writers))
        )
        winners = [writer for writer, won in enumerate(outcomes) if won]
        assert len(winners) == 1, f"round {round_number}: winners {winners}, expected exactly one"
        final = await clients[0].get(key)
        assert final is not None
        assert final.value == {"round": round_number, "writer": winners[0]}


async def check_no_lost_update(
    open_client: StoreFactory, writers: int = 16, increments: int = 25
) -> None:
    """Concurrent read-modify-write loops guarded by CAS never lose an increment."""
    clients = [await open_client() for _ in range(writers)]
    key = unique_prefix("counter") + "value"

    async def increment(client: Store) -> int:
        retries = 0
        for _ in range(increments):
            while True:
                current = await client.get(key)
                if current is None:
                    guard, value = Compare.absent(key), 1
                else:
                    guard, value = Compare.unchanged(current), current.value + 1
                if (await client.txn([guard], [Put(key, value)])).succeeded:
                    break
                retries += 1
        return retries

    retries = await asyncio.gather(*(increment(client) for client in clients))
    final = await clients[0].get(key)
    assert final is not None
    assert final.value == writers * increments, f"lost updates: {final.value}"
    assert final.version == writers * increments
    assert sum(retries) > 0, "no writer ever lost a race: the check did not exercise contention"


async def check_watch_exactly_once_in_order(
    open_client: StoreFactory, writes: int = 10_000, concurrency: int = 8
) -> None:
    """Every change under a prefix arrives exactly once, in revision order, and nothing else."""
    watcher_client, *writer_clients = [await open_client() for _ in range(concurrency + 1)]
    prefix = unique_prefix("watch")
    other = unique_prefix("elsewhere")
    done_key = prefix + "~done"
    start = await watcher_client.current_revision()
    expected: list[tuple[str, str, int, object]] = []

    async def writer(client: Store, number: int) -> None:
        for index in range(number, writes, concurrency):
            key = f"{prefix}k{index % 97:02d}"
            if index % 10 == 9:
                # Two keys in one transaction share one revision.
                twin = f"{prefix}twin{index % 13:02d}"
                result = await client.txn([], [Put(key, index), Put(twin, -index)])
                expected.append(("put", key, result.revision, index))
                expected.append(("put", twin, result.revision, -index))
            elif index % 10 == 5:
                result = await client.txn([], [Delete(key)])
                if result.responses[0]:
                    expected.append(("delete", key, result.revision, None))
            else:
                revision = await client.put(key, index)
                expected.append(("put", key, revision, index))
            if index % 50 == 0:
                await client.put(f"{other}noise", index)  # outside the prefix: never seen

    received: list[WatchEvent] = []

    async def watch() -> None:
        async with watcher_client.watch(prefix, from_revision=start + 1) as events:
            async for event in events:
                if event.key == done_key:
                    return
                received.append(event)

    watching = asyncio.create_task(watch())
    await asyncio.gather(*(writer(client, number) for number, client in enumerate(writer_clients)))
    await writer_clients[0].put(done_key, True)
    await asyncio.wait_for(watching, timeout=120)

    revisions = [event.revision for event in received]
    assert revisions == sorted(revisions), "events arrived out of revision order"
    got = Counter((event.type.value, event.key, event.revision, event.value) for event in received)
    duplicated = [item for item, count in got.items() if count > 1]
    assert not duplicated, f"delivered more than once: {duplicated[:5]}"
    wanted = Counter(expected)
    missing, unexpected = wanted - got, got - wanted
    assert not missing, f"{sum(missing.values())} changes never arrived, e.g. {list(missing)[:3]}"
    assert not unexpected, f"changes nobody made arrived: {list(unexpected)[:3]}"
    assert all(event.key.startswith(prefix) for event in received)
    # Within one transaction, changes keep the order they were written in.
    for _, group in itertools.groupby(received, key=lambda event: event.revision):
        keys = [event.key for event in group]
        assert len(keys) in (1, 2), f"unexpected group {keys}"
        if len(keys) == 2:
            assert ["/twin" in key for key in keys] == [False, True], f"txn order broken: {keys}"
    assert len(received) >= writes


async def check_watch_from_old_revision(open_client: StoreFactory) -> None:
    """A watch that starts in the past replays exactly the history after that revision."""
    client = await open_client()
    prefix = unique_prefix("history")
    revisions = [await client.put(f"{prefix}{index:03d}", index) for index in range(50)]
    await client.delete(f"{prefix}010")
    start = revisions[20]
    received: list[WatchEvent] = []
    async with client.watch(prefix, from_revision=start) as events:
        async for event in events:
            received.append(event)
            if event.type is EventType.DELETE:
                break
    assert [event.revision for event in received[:-1]] == revisions[20:]
    assert [event.value for event in received[:-1]] == list(range(20, 50))
    assert received[-1].key == f"{prefix}010"
    assert received[-1].type is EventType.DELETE
