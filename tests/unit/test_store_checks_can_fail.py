"""The conformance checks catch a store that breaks its promises.

Each test wraps a real SQLite store in a deliberately broken one and expects
the check to fail: a check that passes against these proves nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from nubes.store import Compare, KeyValue, Lease, RangeResult, Store, TxnOperation, TxnResult, Watch
from nubes.store import WatchEvent as Event
from nubes.store.sqlite import SqliteStore
from tests.support import store_checks
from tests.support.store_checks import StoreFactory


class DelegatingStore(Store):
    def __init__(self, inner: Store) -> None:
        self.inner = inner

    async def get(self, key: str) -> KeyValue | None:
        return await self.inner.get(key)

    async def range(self, prefix: str, *, limit: int | None = None) -> RangeResult:
        return await self.inner.range(prefix, limit=limit)

    async def put(self, key: str, value: object, *, lease: int = 0) -> int:
        return await self.inner.put(key, value, lease=lease)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        return await self.inner.delete(key, prefix=prefix)

    async def txn(
        self,
        compares: Sequence[Compare],
        on_success: Sequence[TxnOperation] = (),
        on_failure: Sequence[TxnOperation] = (),
    ) -> TxnResult:
        return await self.inner.txn(compares, on_success, on_failure)

    def watch(self, prefix: str, from_revision: int | None = None) -> Watch:
        return self.inner.watch(prefix, from_revision)

    async def current_revision(self) -> int:
        return await self.inner.current_revision()

    async def compact(self, revision: int) -> None:
        await self.inner.compact(revision)

    async def lease_grant(self, ttl: int) -> Lease:
        return await self.inner.lease_grant(ttl)

    async def lease_keepalive(self, lease_id: int) -> int:
        return await self.inner.lease_keepalive(lease_id)

    async def lease_revoke(self, lease_id: int) -> None:
        await self.inner.lease_revoke(lease_id)

    async def close(self) -> None:
        await self.inner.close()


class IgnoresCompares(DelegatingStore):
    """Runs the success branch whatever the compares say."""

    async def txn(
        self,
        compares: Sequence[Compare],
        on_success: Sequence[TxnOperation] = (),
        on_failure: Sequence[TxnOperation] = (),
    ) -> TxnResult:
        return await self.inner.txn([], on_success, on_failure)


class TamperedWatch(Watch):
    """Passes a real watch through, after feeding its first five events to `tamper`."""

    def __init__(self, inner: Watch, tamper: Callable[[list[Event]], list[Event]]) -> None:
        self.inner = inner
        self.tamper: Callable[[list[Event]], list[Event]] | None = tamper
        self.pending: list[Event] = []

    async def __anext__(self) -> Event:
        if self.tamper is not None:
            self.pending = self.tamper([await anext(self.inner) for _ in range(5)])
            self.tamper = None
        if self.pending:
            return self.pending.pop(0)
        return await anext(self.inner)

    async def close(self) -> None:
        await self.inner.close()

    async def __aenter__(self) -> TamperedWatch:
        await self.inner.__aenter__()
        return self


def swap_first_two(events: list[Event]) -> list[Event]:
    return [events[1], events[0], *events[2:]]


def repeat_one(events: list[Event]) -> list[Event]:
    return [*events[:3], events[3], *events[3:]]


def drop_one(events: list[Event]) -> list[Event]:
    return [*events[:3], *events[4:]]


def tampering_store(tamper: Callable[[list[Event]], list[Event]]) -> type[DelegatingStore]:
    class Tampering(DelegatingStore):
        def watch(self, prefix: str, from_revision: int | None = None) -> Watch:
            return TamperedWatch(self.inner.watch(prefix, from_revision), tamper)

    return Tampering


@pytest.fixture
async def broken(tmp_path: Path) -> AsyncIterator[Callable[[type[DelegatingStore]], StoreFactory]]:
    opened: list[Store] = []

    def factory(broken_kind: type[DelegatingStore]) -> StoreFactory:
        async def open_client() -> Store:
            opened.append(broken_kind(await SqliteStore.open(tmp_path / "nubes.db")))
            return opened[-1]

        return open_client

    yield factory
    for store in opened:
        await store.close()


async def test_the_cas_race_check_fails_when_compares_are_ignored(broken) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AssertionError, match="expected exactly one"):
        await store_checks.check_cas_race(broken(IgnoresCompares), writers=16, rounds=3)


async def test_the_lost_update_check_fails_when_compares_are_ignored(broken) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AssertionError, match="lost updates"):
        await store_checks.check_no_lost_update(broken(IgnoresCompares), writers=8, increments=10)


@pytest.mark.parametrize(
    ("tamper", "complaint"),
    [
        (swap_first_two, "out of revision order"),
        (repeat_one, "more than once"),
        (drop_one, "never arrived"),
    ],
)
async def test_the_watch_check_fails_when_events_are_reordered_repeated_or_lost(
    broken,  # type: ignore[no-untyped-def]
    tamper: Callable[[list[Event]], list[Event]],
    complaint: str,
) -> None:
    with pytest.raises(AssertionError, match=complaint):
        await store_checks.check_watch_exactly_once_in_order(
            broken(tampering_store(tamper)), writes=400, concurrency=4
        )


async def test_the_history_check_fails_when_a_replayed_event_is_lost(broken) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AssertionError):
        await store_checks.check_watch_from_old_revision(broken(tampering_store(drop_one)))


async def test_the_checks_pass_against_the_real_store(broken) -> None:  # type: ignore[no-untyped-def]
    open_client = broken(DelegatingStore)
    await store_checks.check_cas_race(open_client, writers=16, rounds=3)
    await store_checks.check_no_lost_update(open_client, writers=8, increments=10)
    await store_checks.check_watch_exactly_once_in_order(open_client, writes=400, concurrency=4)
    await store_checks.check_watch_from_old_revision(open_client)
