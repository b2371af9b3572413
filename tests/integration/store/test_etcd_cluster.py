"""The etcd engine on a three-member cluster: a member or the leader dies and reads,
watches, leases and guarded writes go on without losing, repeating or doubling anything."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from nubes.store import EventType
from nubes.store.base import Compare, Put, WatchEvent
from nubes.store.etcd import EtcdStore
from tests.support.etcd import EtcdCluster

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path / "etcd") as running:
        yield running


@pytest.fixture
async def store(cluster: EtcdCluster) -> AsyncIterator[EtcdStore]:
    async with await EtcdStore.connect(cluster.endpoints, timeout=20) as client:
        yield client


async def kill_in_background(cluster: EtcdCluster, leader: bool) -> str:
    """SIGKILLs the leader (or a follower) from a thread, so the event loop keeps running."""

    def kill() -> str:
        current = cluster.leader()
        victim = current if leader else next(m for m in cluster.members if m is not current)
        cluster.kill(victim)
        return victim.name

    return await asyncio.to_thread(kill)


async def test_reads_go_on_when_the_member_a_client_uses_is_killed(
    cluster: EtcdCluster, store: EtcdStore
) -> None:
    await store.put("/c/key", "value")
    slowest = 0.0
    for victim in cluster.members[:2]:  # one at a time: two down would lose the quorum
        await asyncio.to_thread(cluster.kill, victim)
        for _ in range(50):
            started = time.monotonic()
            kv = await store.get("/c/key")
            slowest = max(slowest, time.monotonic() - started)
            assert kv is not None
            assert kv.value == "value"
        await asyncio.to_thread(cluster.restart, victim)
    # Failing over to a live member takes an election at worst, not a reconnect backoff.
    assert slowest < 5.0, f"a read waited {slowest:.2f} s"


async def test_a_watch_resumes_across_a_leader_kill_without_losing_or_repeating(
    cluster: EtcdCluster, store: EtcdStore
) -> None:
    start = await store.current_revision()
    seen: list[WatchEvent] = []
    async with (
        await EtcdStore.connect(cluster.endpoints, timeout=20) as writer,
        store.watch("/w/", from_revision=start + 1) as events,
    ):

        async def write_all() -> None:
            for index in range(300):
                await writer.put(f"/w/{index:03d}", index)
                if index == 100:
                    await kill_in_background(cluster, leader=True)
            await writer.delete("/w/000")

        writing = asyncio.create_task(write_all())
        while len(seen) < 301:
            seen.append(await asyncio.wait_for(anext(events), 30))
        await writing
    values = [event.value for event in seen if event.type is EventType.PUT]
    assert values == list(range(300))
    assert [event.revision for event in seen] == list(range(start + 1, start + 302))
    assert seen[-1].type is EventType.DELETE


async def test_a_kept_lease_outlives_a_leader_kill(cluster: EtcdCluster, store: EtcdStore) -> None:
    lease = await store.lease_grant(3)
    await store.put("/l/alive", "yes", lease=lease.id)
    killed = False
    deadline = time.monotonic() + 9  # three TTLs
    while time.monotonic() < deadline:
        await store.lease_keepalive(lease.id)
        if not killed:
            await kill_in_background(cluster, leader=True)
            killed = True
        await asyncio.sleep(1)
    kv = await store.get("/l/alive")
    assert kv is not None
    assert kv.lease == lease.id


async def test_creations_through_a_leader_kill_each_happen_once(
    cluster: EtcdCluster, store: EtcdStore
) -> None:
    async def create(index: int) -> bool:
        key = f"/n/{index:03d}"
        result = await store.txn([Compare.absent(key)], [Put(key, {"index": index})])
        return result.succeeded

    tasks = []
    for index in range(200):
        tasks.append(asyncio.create_task(create(index)))
        if index == 80:
            await kill_in_background(cluster, leader=True)
        await asyncio.sleep(0.01)
    outcomes = await asyncio.gather(*tasks)
    assert all(outcomes), f"{outcomes.count(False)} creations reported failed"
    listed = await store.range("/n/")
    assert [kv.value["index"] for kv in listed.kvs] == list(range(200))
    assert {kv.version for kv in listed.kvs} == {1}  # nothing written twice


async def test_a_create_whose_answer_was_lost_settles_as_succeeded_once(
    store: EtcdStore,
) -> None:
    compares, writes = [Compare.absent("/s/vm")], [Put("/s/vm", "ours"), Put("/s/name", "vm")]
    sent = await store.txn(compares, writes)
    # Later writers change the record: the settling reads history, not the value now.
    await store.put("/s/vm", "bound to a host")
    settled = await store.settle_txn(compares, writes)
    assert settled.succeeded
    assert settled.revision == sent.revision
    kv = await store.get("/s/vm")
    assert kv is not None
    assert kv.version == 2


async def test_a_create_that_never_landed_settles_by_landing_once(store: EtcdStore) -> None:
    compares, writes = [Compare.absent("/s/new")], [Put("/s/new", "ours")]
    settled = await store.settle_txn(compares, writes)
    assert settled.succeeded
    kv = await store.get("/s/new")
    assert kv is not None
    assert kv.version == 1
    assert kv.mod_revision == settled.revision


async def test_a_create_someone_else_made_settles_as_failed(store: EtcdStore) -> None:
    await store.put("/s/taken", "theirs")
    settled = await store.settle_txn([Compare.absent("/s/taken")], [Put("/s/taken", "ours")])
    assert not settled.succeeded


async def test_a_swap_whose_answer_was_lost_settles_by_history(store: EtcdStore) -> None:
    await store.put("/s/cas", 1)
    before = await store.get("/s/cas")
    assert before is not None
    compares, writes = [Compare.unchanged(before)], [Put("/s/cas", 2)]
    sent = await store.txn(compares, writes)
    await store.put("/s/cas", 3)
    settled = await store.settle_txn(compares, writes)
    assert settled.succeeded
    assert settled.revision == sent.revision
    # A swap another writer won from the same state is not ours.
    now = await store.get("/s/cas")
    assert now is not None
    await store.put("/s/cas", 4)
    lost = await store.settle_txn([Compare.unchanged(now)], [Put("/s/cas", 5)])
    assert not lost.succeeded
    final = await store.get("/s/cas")
    assert final is not None
    assert final.value == 4


async def test_an_unguarded_write_cannot_be_settled(store: EtcdStore) -> None:
    with pytest.raises(ValueError, match="settled"):
        await store.settle_txn([], [Put("/s/free", 1)])
