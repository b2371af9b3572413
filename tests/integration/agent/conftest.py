"""Fixtures for the agent tests: a lab host with a real `nubes agent` process (needs root)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from tests.support.agent_lab import AgentLab


@pytest.fixture
async def lab() -> AsyncIterator[AgentLab]:
    if os.geteuid() != 0:
        pytest.fail("the agent tests need root (QEMU processes, cgroups)")
    async with AgentLab() as host:
        yield host
