"""Fixtures for the agent tests: a lab host with a real `nubes agent` process (needs root).
When a test fails, the end of the agent's log is printed with it: that log is usually
the only place that says why."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.agent_lab import AgentLab, lab_for_test


@pytest.fixture
async def lab(request: pytest.FixtureRequest) -> AsyncIterator[AgentLab]:
    async with lab_for_test(request, "QEMU processes, cgroups") as host:
        yield host
