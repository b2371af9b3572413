"""Fixtures for the end-to-end networking tests: a lab host running a real `nubes agent`
with networking settings, and the network records written on top of it (needs root).
When a test fails, the end of the agent's log is printed with it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.agent_lab import lab_for_test
from tests.support.network_lab import NETWORK_SETTINGS, NetLab


@pytest.fixture
async def net(request: pytest.FixtureRequest) -> AsyncIterator[NetLab]:
    needs = "namespaces, nftables, QEMU"
    async with lab_for_test(request, needs, agent_settings=NETWORK_SETTINGS) as lab:
        yield NetLab(lab)
