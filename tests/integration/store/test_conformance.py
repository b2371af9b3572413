"""The store conformance suite: the same behaviour from SQLite and from a real etcd."""

from __future__ import annotations

import asyncio
import time

import pytest

from nubes.errors import CompactedError, LeaseNotFound
from nubes.store import Compare, Delete, EventType, Get, Put, Store
from tests.support import store_checks
from tests.support.store_checks import StoreFactory, unique_prefix

pytestmark = pytest.mark.integration


async def test_put_then_get_reports_revisions_and_versions(store: Store) -> None:
    key = unique_prefix("basic") + "a"
    first = await store.put(key, {"n": 1})
    second = await store.put(key, {"n": 2})
    kv = await store.get(key)
    assert kv is not None
    assert kv.value == {"n": 2}
    assert (kv.create_revision, kv.mod_revision, kv.version) == (first, second, 2)
    assert second == first + 1
    assert await store.current_revision() == second


async def test_get_of_a_missing_key_is_none(store: Store) -> None:
    assert await store.get(unique_prefix("missing") + "nothing") is None


async def test_json_values_round_trip(store: Store) -> None:
    key = unique_prefix("json") + "doc"
    document = {"name": "web1", "vcpus": 2, "ratio": 1.5, "tags": ["a", "b"], "host": None}
    await store.put(key, document)
    kv = await store.get(key)
    assert kv is not None
    assert kv.value == document


async def test_delete_removes_the_key_and_recreating_starts_a_new_life(store: Store) -> None:
    key = unique_prefix("delete") + "a"
    await store.put(key, 1)
    await store.put(key, 2)
    assert await store.delete(key) == 1
    assert await store.get(key) is None
    assert await store.delete(key) == 0
    revision = await store.put(key, 3)
    kv = await store.get(key)
    assert kv is not None
    assert (kv.version, kv.create_revision) == (1, revision)


async def test_range_returns_keys_under_the_prefix_in_key_order(store: Store) -> None:
    prefix = unique_prefix("range")
    for name in ["c", "a", "b"]:
        await store.put(prefix + name, name)
    await store.put(prefix[:-1] + "x", "not under the prefix")
    result = await store.range(prefix)
    assert [kv.key for kv in result.kvs] == [prefix + "a", prefix + "b", prefix + "c"]
    assert result.revision == await store.current_revision()
    limited = await store.range(prefix, limit=2)
    assert [kv.value for kv in limited.kvs] == ["a", "b"]


async def test_range_resumes_at_a_start_key_for_paging(store: Store) -> None:
    prefix = unique_prefix("range-start")
    for name in ["a", "b", "c", "d"]:
        await store.put(prefix + name, name)
    page = await store.range(prefix, start=prefix + "b", limit=2)
    assert [kv.value for kv in page.kvs] == ["b", "c"]
    rest = await store.range(prefix, start=prefix + "c\x00")
    assert [kv.value for kv in rest.kvs] == ["d"]
    with pytest.raises(ValueError, match="not under"):
        await store.range(prefix, start="/elsewhere/a")


async def test_delete_with_prefix_removes_every_key_under_it(store: Store) -> None:
    prefix = unique_prefix("prefix-delete")
    for index in range(5):
        await store.put(f"{prefix}{index}", index)
    assert await store.delete(prefix, prefix=True) == 5
    assert (await store.range(prefix)).kvs == []


async def test_txn_runs_the_failure_branch_when_a_compare_fails(store: Store) -> None:
    key = unique_prefix("txn") + "a"
    await store.put(key, "old")
    result = await store.txn(
        [Compare.value(key, "==", "something else")],
        [Put(key, "success")],
        [Get(key)],
    )
    assert not result.succeeded
    read = result.responses[0]
    assert isinstance(read, list)
    assert read[0].value == "old"
    kv = await store.get(key)
    assert kv is not None
    assert kv.value == "old"


async def test_txn_compares_follow_etcd_for_missing_keys(store: Store) -> None:
    key = unique_prefix("txn-missing") + "a"
    assert not (await store.txn([Compare.value(key, "==", None)])).succeeded
    assert not (await store.txn([Compare.value(key, "!=", "x")])).succeeded
    assert (await store.txn([Compare.absent(key)])).succeeded
    assert (await store.txn([Compare.create_revision(key, "==", 0)])).succeeded
    assert (await store.txn([Compare.mod_revision(key, "<", 1)])).succeeded


async def test_txn_compares_on_version_create_and_mod_revision(store: Store) -> None:
    key = unique_prefix("txn-compare") + "a"
    created = await store.put(key, 1)
    modified = await store.put(key, 2)
    assert (await store.txn([Compare.version(key, "==", 2)])).succeeded
    assert (await store.txn([Compare.version(key, ">", 1)])).succeeded
    assert not (await store.txn([Compare.version(key, "<", 2)])).succeeded
    assert (await store.txn([Compare.create_revision(key, "==", created)])).succeeded
    assert (await store.txn([Compare.mod_revision(key, "==", modified)])).succeeded
    assert not (await store.txn([Compare.mod_revision(key, "!=", modified)])).succeeded
    assert (await store.txn([Compare.value(key, "==", 2)])).succeeded


async def test_a_txn_writes_all_its_keys_at_one_revision(store: Store) -> None:
    prefix = unique_prefix("txn-atomic")
    before = await store.current_revision()
    result = await store.txn(
        [Compare.absent(prefix + "a")],
        [Put(prefix + "a", 1), Put(prefix + "b", 2), Delete(prefix + "nothing")],
    )
    assert result.succeeded
    assert result.revision == before + 1
    assert result.responses == [None, None, 0]
    kvs = (await store.range(prefix)).kvs
    assert {kv.mod_revision for kv in kvs} == {before + 1}


async def test_a_txn_that_writes_nothing_does_not_advance_the_revision(store: Store) -> None:
    key = unique_prefix("txn-read") + "a"
    await store.put(key, 1)
    before = await store.current_revision()
    result = await store.txn([Compare.value(key, "==", 1)], [Get(key)])
    assert result.succeeded
    assert result.revision == before
    failed = await store.txn([Compare.value(key, "==", 2)], [Put(key, 3)])
    assert not failed.succeeded
    assert failed.revision == before
    assert await store.current_revision() == before


async def test_sixteen_writers_racing_on_one_key_have_exactly_one_winner_per_round(
    open_client: StoreFactory,
) -> None:
    await store_checks.check_cas_race(open_client, writers=16, rounds=20)


async def test_concurrent_cas_increments_lose_no_update(open_client: StoreFactory) -> None:
    await store_checks.check_no_lost_update(open_client, writers=16, increments=25)


async def test_watch_delivers_ten_thousand_writes_exactly_once_in_order(
    open_client: StoreFactory,
) -> None:
    await store_checks.check_watch_exactly_once_in_order(open_client, writes=10_000)


async def test_watch_from_an_old_revision_replays_the_history(open_client: StoreFactory) -> None:
    await store_checks.check_watch_from_old_revision(open_client)


async def test_watch_from_now_sees_only_later_changes(store: Store) -> None:
    prefix = unique_prefix("watch-now")
    await store.put(prefix + "before", 0)
    async with store.watch(prefix) as events:
        await store.put(prefix + "after", 1)
        event = await asyncio.wait_for(anext(events), 10)
    assert (event.key, event.value, event.type) == (prefix + "after", 1, EventType.PUT)


async def test_watch_reports_deletes(store: Store) -> None:
    key = unique_prefix("watch-delete") + "a"
    created = await store.put(key, "x")
    async with store.watch(key, from_revision=created + 1) as events:
        await store.delete(key)
        event = await asyncio.wait_for(anext(events), 10)
    assert event.type is EventType.DELETE
    assert event.key == key
    assert event.value is None


async def test_watch_from_a_compacted_revision_raises_a_clear_error(store: Store) -> None:
    prefix = unique_prefix("compacted")
    first = await store.put(prefix + "a", 1)
    await store.put(prefix + "a", 2)
    latest = await store.put(prefix + "a", 3)
    await store.compact(latest)
    with pytest.raises(CompactedError) as raised:
        async with store.watch(prefix, from_revision=first) as events:
            await asyncio.wait_for(anext(events), 10)
    assert raised.value.compact_revision == latest
    assert "compacted" in str(raised.value)
    # The compaction point itself is still readable.
    async with store.watch(prefix, from_revision=latest) as events:
        event = await asyncio.wait_for(anext(events), 10)
    assert event.value == 3


async def test_keys_attached_to_an_expired_lease_vanish(store: Store) -> None:
    prefix = unique_prefix("lease")
    lease = await store.lease_grant(2)
    assert lease.ttl >= 2
    await store.put(prefix + "heartbeat", {"alive": True}, lease=lease.id)
    await store.put(prefix + "stays", 1)
    kv = await store.get(prefix + "heartbeat")
    assert kv is not None
    assert kv.lease == lease.id
    started = time.monotonic()
    async with store.watch(prefix) as events:
        event = await asyncio.wait_for(anext(events), lease.ttl + 5)
    assert (event.type, event.key) == (EventType.DELETE, prefix + "heartbeat")
    assert time.monotonic() - started >= lease.ttl - 1.5
    assert await store.get(prefix + "heartbeat") is None
    assert await store.get(prefix + "stays") is not None
    with pytest.raises(LeaseNotFound):
        await store.lease_keepalive(lease.id)


async def test_keepalive_holds_a_lease_past_its_ttl(store: Store) -> None:
    key = unique_prefix("keepalive") + "heartbeat"
    lease = await store.lease_grant(2)
    await store.put(key, 1, lease=lease.id)
    for _ in range(8):
        await asyncio.sleep(0.5)
        assert await store.lease_keepalive(lease.id) == lease.ttl
    assert await store.get(key) is not None


async def test_revoking_a_lease_deletes_its_keys_at_once(store: Store) -> None:
    prefix = unique_prefix("revoke")
    lease = await store.lease_grant(60)
    await store.put(prefix + "a", 1, lease=lease.id)
    await store.put(prefix + "b", 2, lease=lease.id)
    await store.lease_revoke(lease.id)
    assert (await store.range(prefix)).kvs == []
    with pytest.raises(LeaseNotFound):
        await store.lease_revoke(lease.id)


async def test_put_with_an_unknown_lease_fails_and_writes_nothing(store: Store) -> None:
    key = unique_prefix("bad-lease") + "a"
    with pytest.raises(LeaseNotFound):
        await store.put(key, 1, lease=123456789)
    with pytest.raises(LeaseNotFound):
        await store.txn([], [Put(key, 1, lease=123456789)])
    assert await store.get(key) is None


async def test_put_without_a_lease_detaches_the_key(store: Store) -> None:
    key = unique_prefix("detach") + "a"
    lease = await store.lease_grant(60)
    await store.put(key, 1, lease=lease.id)
    await store.put(key, 2)
    await store.lease_revoke(lease.id)
    kv = await store.get(key)
    assert kv is not None
    assert kv.value == 2
    assert kv.lease == 0


async def test_a_transaction_larger_than_etcd_allows_is_refused_by_every_engine(
    store: Store,
) -> None:
    prefix = unique_prefix("big-txn")
    with pytest.raises(ValueError, match="at most 128"):
        await store.txn([], [Put(f"{prefix}{index}", index) for index in range(129)])
    assert (await store.range(prefix)).kvs == []
    result = await store.txn([], [Put(f"{prefix}{index}", index) for index in range(128)])
    assert result.succeeded
