"""A clean agent stop against a real SQLite store: the host is down with reason "agent
stopped" and its VMs are left as they are; once its `stopped` key lapses too (the host died
after all), the monitor evacuates as for any failure."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nubes.agent.host import HostRegistration
from nubes.model.common import now
from nubes.model.host import HostLiveness, HostRecord
from nubes.model.vm import VmState
from nubes.scheduler.hosts import AGENT_STOPPED, HostMonitor
from nubes.store.keys import Kind, host_alive_key, host_stopped_key, resource_key
from nubes.store.sqlite import SqliteStore
from tests.unit.test_scheduler_hosts import HOST_SIZE, add_bound_vm, add_host, host_status, vm


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "nubes.db")
    yield opened
    await opened.close()


async def registered(store: SqliteStore, name: str) -> HostRegistration:
    record = HostRecord(
        name=name,
        capacity=HOST_SIZE,
        accel="tcg",
        storage_pools=["shared"],
        agent_version="test",
        boot_id="b",
        started_at=now(),
    )
    registration = HostRegistration(store, record, ttl=30)
    await registration.start()
    return registration


async def test_a_clean_agent_stop_marks_the_host_down_and_leaves_its_vms_alone(
    store: SqliteStore,
) -> None:
    registration = await registered(store, "h1")
    await add_host(store, "h2")
    plain = await add_bound_vm(store, "h1")
    ha = await add_bound_vm(store, "h1", ha=True, storage_pool="shared")

    await registration.stop()

    assert await store.get(host_alive_key("h1")) is None
    stopped = await store.get(host_stopped_key("h1"))
    assert stopped is not None
    assert stopped.lease != 0
    assert await HostMonitor(store).check_host("h1") is None
    assert await HostMonitor(store).sweep() == {}
    status = await host_status(store, "h1")
    assert status is not None
    assert (status.state, status.reason) == (HostLiveness.DOWN, AGENT_STOPPED)
    for vm_id in (plain, ha):
        record, vm_status = await vm(store, vm_id)
        assert (record.spec.host, vm_status.state) == ("h1", VmState.RUNNING)


async def test_a_stopped_host_whose_stopped_key_lapses_is_evacuated(
    store: SqliteStore,
) -> None:
    registration = await registered(store, "h1")
    await add_host(store, "h2")
    plain = await add_bound_vm(store, "h1")
    ha = await add_bound_vm(store, "h1", ha=True, storage_pool="shared")
    await registration.stop()
    await HostMonitor(store).sweep()

    await store.delete(host_stopped_key("h1"))  # what its lease ending does
    outcome = await HostMonitor(store).check_host("h1")

    assert outcome is not None
    assert outcome.moved == {ha: "h2"}
    status = await host_status(store, "h1")
    assert status is not None
    assert status.state is HostLiveness.DOWN
    assert status.reason != AGENT_STOPPED
    _, plain_status = await vm(store, plain)
    assert plain_status.state is VmState.ERROR


async def test_an_agent_that_starts_again_removes_the_stopped_key_and_the_host_is_up(
    store: SqliteStore,
) -> None:
    registration = await registered(store, "h1")
    await registration.stop()
    await HostMonitor(store).sweep()

    again = await registered(store, "h1")
    try:
        assert await store.get(host_stopped_key("h1")) is None
        await HostMonitor(store).sweep()
        status = await host_status(store, "h1")
        assert status is not None
        assert status.state is HostLiveness.UP
        assert await store.get(resource_key(Kind.HOST, "h1")) is not None
    finally:
        await again.stop()
