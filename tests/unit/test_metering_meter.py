"""The meter against a real SQLite store, driven by writing VM records and statuses,
volumes and floating IPs as the API and the agent do: intervals open and close at the
right times, a restart or a second meter never counts twice, old history is pruned."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from nubes.config import MeteringConfig
from nubes.errors import StoreUnavailable
from nubes.ids import IdKind, new_id
from nubes.metering import meter as meter_module
from nubes.metering.interval import MeteredKind, UsageInterval, read_intervals
from nubes.metering.meter import Meter
from nubes.model.network import FloatingIpRecord, FloatingIpSpec
from nubes.model.vm import Flavor, VmRecord, VmSpec, VmState, VmStatus
from nubes.model.volume import VolumeRecord, VolumeSpec
from nubes.store.base import Delete, EventType, Put, RangeResult, WatchEvent
from nubes.store.keys import Kind, meter_key, resource_key, status_key
from nubes.store.sqlite import SqliteStore

SMALL = Flavor(name="small", vcpus=1, memory_mb=1024, disk_gb=1)
BIG = Flavor(name="big", vcpus=4, memory_mb=4096, disk_gb=1)
T0 = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
FIP_SPEC = FloatingIpSpec(network="vpc-aaaaaaaaaa", address="198.18.0.10")


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "nubes.db")
    try:
        yield opened
    finally:
        await opened.close()


@contextlib.asynccontextmanager
async def running_meter(store: SqliteStore, **options: object) -> AsyncIterator[Meter]:
    meter = Meter(store, **options)  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(meter.run(stop))
    try:
        await asyncio.wait_for(meter.ready.wait(), 10)
        yield meter
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)  # run() ends cleanly, never raises


async def add_vm(store: SqliteStore, project: str = "p1", flavor: Flavor = SMALL) -> str:
    vm_id = new_id(IdKind.VM)
    spec = VmSpec(name=vm_id, flavor=flavor, host="h1")
    record = VmRecord(id=vm_id, project=project, spec=spec, created_at=at(0))
    await store.put(resource_key(Kind.VM, vm_id), record.to_json())
    return vm_id


async def set_state(store: SqliteStore, vm_id: str, state: VmState, when: datetime) -> None:
    """What the agent writes: the state, the flavor QEMU runs with, when it saw it."""
    record = VmRecord.from_json((await store.get(resource_key(Kind.VM, vm_id))).value)  # type: ignore[union-attr]
    status = VmStatus(state=state, host="h1", flavor=record.spec.flavor, updated_at=when)
    await store.put(status_key(Kind.VM, vm_id), status.to_json())


async def delete_vm(store: SqliteStore, vm_id: str) -> None:
    """As the agent ends a deleted VM: both keys in one transaction."""
    await store.txn([], [Delete(resource_key(Kind.VM, vm_id)), Delete(status_key(Kind.VM, vm_id))])


async def intervals(store: SqliteStore, project: str = "p1") -> list[UsageInterval]:
    return sorted(await read_intervals(store, project), key=lambda i: (i.resource, i.opening))


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.01)


async def settles_to(
    store: SqliteStore, count: int, open_count: int, project: str = "p1"
) -> list[UsageInterval]:
    async def done() -> bool:
        found = await intervals(store, project)
        return len(found) == count and sum(i.ended_at is None for i in found) == open_count

    await eventually(done)
    await asyncio.sleep(0.2)  # and stays so
    return await intervals(store, project)


async def test_a_vm_is_metered_from_running_to_stopped_at_the_agent_s_times(
    store: SqliteStore,
) -> None:
    async with running_meter(store):
        vm_id = await add_vm(store)
        await set_state(store, vm_id, VmState.BUILDING, at(1))
        await set_state(store, vm_id, VmState.RUNNING, at(2))
        [opened] = await settles_to(store, 1, 1)
        assert opened.started_at == at(2)
        assert opened.flavor is not None
        assert opened.flavor.name == "small"
        await set_state(store, vm_id, VmState.STOPPED, at(12))
        [closed] = await settles_to(store, 1, 0)
        assert (closed.started_at, closed.ended_at) == (at(2), at(12))
        # Started again (after a resize): a second interval, on the new flavor.
        record = VmRecord.from_json((await store.get(resource_key(Kind.VM, vm_id))).value)  # type: ignore[union-attr]
        resized = record.model_copy(update={"spec": record.spec.model_copy(update={"flavor": BIG})})
        await store.put(resource_key(Kind.VM, vm_id), resized.to_json())
        await set_state(store, vm_id, VmState.RUNNING, at(20))
        await set_state(store, vm_id, VmState.MIGRATING, at(25))  # still the same run
        await set_state(store, vm_id, VmState.RUNNING, at(26))
        _first, second = await settles_to(store, 2, 1)
        assert second.flavor is not None
        assert second.flavor.name == "big"
        assert second.started_at == at(20)
        await set_state(store, vm_id, VmState.DELETING, at(30))
        await delete_vm(store, vm_id)
        _first, second = await settles_to(store, 2, 0)
        assert second.ended_at == at(30)


async def test_a_crash_or_an_error_closes_the_interval(store: SqliteStore) -> None:
    async with running_meter(store):
        crashed, failed = await add_vm(store), await add_vm(store)
        for vm_id in (crashed, failed):
            await set_state(store, vm_id, VmState.RUNNING, at(0))
        await settles_to(store, 2, 2)
        await set_state(store, crashed, VmState.CRASHED, at(5))
        await set_state(store, failed, VmState.ERROR, at(7))
        ends = {i.resource: i.ended_at for i in await settles_to(store, 2, 0)}
        assert ends == {crashed: at(5), failed: at(7)}


async def test_volumes_are_metered_from_creation_by_size_and_floating_ips_until_released(
    store: SqliteStore,
) -> None:
    volume_id, fip_id = new_id(IdKind.VOLUME), new_id(IdKind.FLOATING_IP)
    created = datetime.now(UTC) - timedelta(minutes=5)
    volume = VolumeRecord(
        id=volume_id, project="p1", spec=VolumeSpec(name="data", size_gb=10), created_at=created
    )
    fip = FloatingIpRecord(id=fip_id, project="p1", spec=FIP_SPEC, created_at=created)
    async with running_meter(store):
        await store.put(resource_key(Kind.VOLUME, volume_id), volume.to_json())
        await store.put(resource_key(Kind.FLOATING_IP, fip_id), fip.to_json())
        found = await settles_to(store, 2, 2)
        assert {(i.kind, i.size_gb, i.started_at) for i in found} == {
            (MeteredKind.VOLUME, 10, created),
            (MeteredKind.FLOATING_IP, None, created),
        }
        bigger = volume.model_copy(update={"spec": VolumeSpec(name="data", size_gb=30)})
        await store.put(resource_key(Kind.VOLUME, volume_id), bigger.to_json())
        found = await settles_to(store, 3, 2)
        sizes = [(i.size_gb, i.ended_at is None) for i in found if i.kind is MeteredKind.VOLUME]
        assert sorted(sizes, key=str) == [(10, False), (30, True)]
        old, new = sorted(
            (i for i in found if i.kind is MeteredKind.VOLUME), key=lambda i: i.opening
        )
        assert old.ended_at == new.started_at  # no gap, no overlap
        deleting = bigger.model_copy(update={"deleting": True})
        await store.put(resource_key(Kind.VOLUME, volume_id), deleting.to_json())
        await store.delete(resource_key(Kind.FLOATING_IP, fip_id))
        await settles_to(store, 3, 0)
        await store.delete(resource_key(Kind.VOLUME, volume_id))
        await settles_to(store, 3, 0)


async def test_a_restarted_meter_closes_what_stopped_while_it_was_away_without_double_counting(
    store: SqliteStore,
) -> None:
    async with running_meter(store):
        stays, stops, goes = await add_vm(store), await add_vm(store), await add_vm(store)
        for vm_id in (stays, stops, goes):
            await set_state(store, vm_id, VmState.RUNNING, at(1))
        await settles_to(store, 3, 3)
    # The meter is away: one VM stops, one is deleted, one new starts.
    await set_state(store, stops, VmState.STOPPED, at(9))
    await delete_vm(store, goes)
    late = await add_vm(store)
    await set_state(store, late, VmState.RUNNING, at(4))
    async with running_meter(store):
        found = await settles_to(store, 4, 2)
    by_vm = {i.resource: i for i in found}
    assert by_vm[stays].ended_at is None
    assert by_vm[stays].started_at == at(1)
    assert by_vm[stops].ended_at == at(9)
    assert by_vm[goes].ended_at is not None  # gone without a status: closed when seen
    assert by_vm[late].started_at == at(4)
    async with running_meter(store):  # and once more: nothing new
        assert await settles_to(store, 4, 2) == found


async def test_a_restarted_meter_bills_a_stop_and_a_deletion_while_it_was_away_at_their_times(
    store: SqliteStore,
) -> None:
    async with running_meter(store):
        restarted, deleted = await add_vm(store), await add_vm(store)
        for vm_id in (restarted, deleted):
            await set_state(store, vm_id, VmState.RUNNING, at(1))
        await settles_to(store, 2, 2)
    # The meter is away: one VM stops and starts again, one is deleted.
    await set_state(store, restarted, VmState.STOPPED, at(9))
    await set_state(store, restarted, VmState.RUNNING, at(15))
    await set_state(store, deleted, VmState.DELETING, at(12))
    await delete_vm(store, deleted)
    async with running_meter(store):
        found = await settles_to(store, 3, 1)
    assert {(i.resource, i.started_at, i.ended_at) for i in found} == {
        (restarted, at(1), at(9)),
        (restarted, at(15), None),
        (deleted, at(1), at(12)),
    }
    async with running_meter(store):  # and once more: the history replayed again adds nothing
        assert await settles_to(store, 3, 1) == found


async def test_a_restarted_meter_without_the_history_goes_by_what_it_lists(
    store: SqliteStore,
) -> None:
    async with running_meter(store):
        restarted, deleted = await add_vm(store), await add_vm(store)
        for vm_id in (restarted, deleted):
            await set_state(store, vm_id, VmState.RUNNING, at(1))
        await settles_to(store, 2, 2)
    await set_state(store, restarted, VmState.STOPPED, at(9))
    await set_state(store, restarted, VmState.RUNNING, at(15))
    await delete_vm(store, deleted)
    await store.compact(await store.current_revision())
    async with running_meter(store):
        found = await settles_to(store, 2, 1)
    by_vm = {i.resource: i for i in found}
    assert (by_vm[restarted].started_at, by_vm[restarted].ended_at) == (at(1), None)
    assert by_vm[deleted].ended_at is not None  # when the meter saw it gone


async def test_two_meters_at_once_never_count_twice(tmp_path: Path) -> None:
    other = await SqliteStore.open(tmp_path / "nubes.db")
    first = await SqliteStore.open(tmp_path / "nubes.db")
    try:
        async with running_meter(first), running_meter(other):
            vms = [await add_vm(first) for _ in range(20)]
            for round_number in range(3):
                for vm_id in vms:
                    await set_state(first, vm_id, VmState.RUNNING, at(10 * round_number))
                for vm_id in vms:
                    await set_state(first, vm_id, VmState.STOPPED, at(10 * round_number + 5))
            found = await settles_to(first, 60, 0)
    finally:
        await first.close()
        await other.close()
    for vm_id in vms:
        runs = [(i.started_at, i.ended_at) for i in found if i.resource == vm_id]
        assert runs == [(at(10 * n), at(10 * n + 5)) for n in range(3)]


async def test_a_burst_of_vms_is_metered_in_few_transactions(store: SqliteStore) -> None:
    vms = [await add_vm(store) for _ in range(300)]
    await store.txn(
        [],
        [
            Put(
                status_key(Kind.VM, vm_id),
                VmStatus(state=VmState.RUNNING, flavor=SMALL, updated_at=at(1)).to_json(),
            )
            for vm_id in vms[:128]
        ],
    )
    for vm_id in vms[128:]:
        await set_state(store, vm_id, VmState.RUNNING, at(1))
    before = await store.current_revision()
    async with running_meter(store):
        await settles_to(store, 300, 300)
        # The reconciliation wrote 300 intervals in a few transactions (3 compares each).
        assert await store.current_revision() - before <= 10


async def test_a_burst_larger_than_the_queue_holds_the_watch_back_without_starting_over(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(meter_module, "QUEUE_SIZE", 2)
    monkeypatch.setattr(meter_module, "EVENTS_PER_ROUND", 2)
    reconciles = 0
    reconcile = Meter.reconcile

    async def counted(meter: Meter) -> dict[str, int]:
        nonlocal reconciles
        reconciles += 1
        return await reconcile(meter)

    monkeypatch.setattr(Meter, "reconcile", counted)
    vms = [await add_vm(store) for _ in range(40)]
    async with running_meter(store):
        status = VmStatus(state=VmState.RUNNING, flavor=SMALL, updated_at=at(1))
        await store.txn([], [Put(status_key(Kind.VM, vm_id), status.to_json()) for vm_id in vms])
        await settles_to(store, 40, 40)
    assert reconciles == 1


async def test_closed_intervals_older_than_keep_days_are_pruned(store: SqliteStore) -> None:
    now = datetime.now(UTC)
    for days, resource in ((10, "i-oldoldoldo"), (2, "i-recentrece")):
        interval = UsageInterval(
            project="p1",
            resource=resource,
            kind=MeteredKind.VM,
            opening="0000000000000001",
            flavor=None,
            started_at=now - timedelta(days=days, hours=1),
            ended_at=now - timedelta(days=days),
        )
        await store.put(meter_key("p1", resource, interval.opening), interval.to_json())
    meter = Meter(store, MeteringConfig(keep_days=5))
    assert await meter.prune() == 1
    assert [i.resource for i in await intervals(store)] == ["i-recentrece"]


async def test_projects_keep_their_own_intervals(store: SqliteStore) -> None:
    async with running_meter(store):
        mine, theirs = await add_vm(store, "p1"), await add_vm(store, "p2")
        for vm_id in (mine, theirs):
            await set_state(store, vm_id, VmState.RUNNING, at(0))
        assert [i.resource for i in await settles_to(store, 1, 1, "p1")] == [mine]
        assert [i.resource for i in await settles_to(store, 1, 1, "p2")] == [theirs]


async def test_a_late_meter_replaying_old_news_reopens_nothing(store: SqliteStore) -> None:
    """A second meter that reads a VM's `running` only after the first one has closed
    that run (its watch lags) must not open it again."""
    late = Meter(store)
    await late.reconcile()  # knows of no interval
    vm_id = await add_vm(store)
    async with running_meter(store):
        await set_state(store, vm_id, VmState.RUNNING, at(1))
        await settles_to(store, 1, 1)
        old_news = await store.get(status_key(Kind.VM, vm_id))
        await set_state(store, vm_id, VmState.STOPPED, at(5))
        await settles_to(store, 1, 0)
    assert old_news is not None
    record = await store.get(resource_key(Kind.VM, vm_id))
    assert record is not None
    for kv in (record, old_news):  # what its watch brings it, late
        event = WatchEvent(EventType.PUT, kv.key, kv.value, kv.mod_revision, kv.create_revision, 1)
        observation = late._observe_event(event)
        assert observation is not None
        await late._apply([observation])
    [closed] = await intervals(store)
    assert closed.ended_at == at(5)


class FlakyStore(SqliteStore):
    """A store that cannot be reached for its first few listings."""

    failures = 2

    async def range(
        self, prefix: str, *, limit: int | None = None, start: str | None = None
    ) -> RangeResult:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("the store is away (test)")
        return await super().range(prefix, limit=limit, start=start)


async def test_the_meter_waits_out_store_trouble_and_never_raises(tmp_path: Path) -> None:
    flaky = await FlakyStore.open(tmp_path / "nubes.db")
    assert isinstance(flaky, FlakyStore)
    try:
        vm_id = await add_vm(flaky)
        await set_state(flaky, vm_id, VmState.RUNNING, at(1))
        async with running_meter(flaky):
            await settles_to(flaky, 1, 1)
        assert flaky.failures == 0
    finally:
        await flaky.close()


class ClosingStore(SqliteStore):
    """A store in which an open interval is closed (as the meter does: delete the open key,
    put the closed one, in one transaction) right after the report's first page is read."""

    closing: UsageInterval | None = None

    async def range(
        self, prefix: str, *, limit: int | None = None, start: str | None = None
    ) -> RangeResult:
        read = await super().range(prefix, limit=limit, start=start)
        interval, self.closing = self.closing, None
        if interval is not None:
            closed = interval.model_copy(update={"ended_at": at(30)})
            await self.txn([], [Delete(interval.key), Put(closed.key, closed.to_json())])
        return read


async def test_a_report_read_while_an_interval_closes_still_finds_it_once(
    tmp_path: Path,
) -> None:
    store = await ClosingStore.open(tmp_path / "nubes.db")
    assert isinstance(store, ClosingStore)
    try:
        opened = UsageInterval(
            project="p1",
            resource="i-aaaaaaaaaa",
            kind=MeteredKind.VM,
            opening="0000000000000007",
            flavor=None,
            started_at=at(0),
        )
        await store.put(opened.key, opened.to_json())
        store.closing = opened
        [found] = await read_intervals(store, "p1")
        assert (found.started_at, found.ended_at) == (at(0), at(30))
    finally:
        await store.close()
