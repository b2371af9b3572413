"""The host record and its heartbeat: what the cluster knows of this host and its agent."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from nubes.model.host import HostRecord
from nubes.store.keys import Kind, host_alive_key, resource_key
from tests.support.agent_lab import HOST, AgentLab

pytestmark = pytest.mark.integration


async def test_the_agent_registers_its_host_with_capacity_and_accelerator(lab: AgentLab) -> None:
    kv = await lab.db.get(resource_key(Kind.HOST, HOST))
    assert kv is not None
    host = HostRecord.from_json(kv.value)
    assert host.capacity.vcpus == os.cpu_count()
    assert host.capacity.memory_mb > 1024
    assert host.accel == "tcg"
    assert host.boot_id == (await asyncio.to_thread(_boot_id))


async def test_the_heartbeat_outlives_its_ttl_and_a_clean_stop_removes_it(lab: AgentLab) -> None:
    await asyncio.sleep(6)  # longer than the lab's 4 s TTL: the lease is being kept alive
    assert await lab.db.get(host_alive_key(HOST)) is not None
    lab.stop_agent(signal.SIGTERM)
    assert await lab.db.get(host_alive_key(HOST)) is None


async def test_a_killed_agent_loses_its_alive_key_when_the_lease_expires(lab: AgentLab) -> None:
    lab.stop_agent(signal.SIGKILL)
    killed_at = time.monotonic()
    assert await lab.db.get(host_alive_key(HOST)) is not None
    while await lab.db.get(host_alive_key(HOST)) is not None:
        assert time.monotonic() - killed_at < 10, "the alive key outlived its lease"
        await asyncio.sleep(0.2)
    assert time.monotonic() - killed_at >= 2  # not before the lease ran out


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as file:
        return file.read().strip()
