"""Fixtures for the end-to-end networking tests: a lab host running a real `nubes agent`
with networking settings, and the network records written on top of it (needs root).

When a test fails, the end of the agent's log is printed with it: that log usually says
why a port, lease or rule never came.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.agent_lab import AgentLab
from tests.support.network_lab import NETWORK_SETTINGS, NetLab

_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        item.stash[_FAILED] = True


@pytest.fixture
async def net(request: pytest.FixtureRequest) -> AsyncIterator[NetLab]:
    if os.geteuid() != 0:
        pytest.fail("the networking tests need root (namespaces, nftables, QEMU)")
    async with AgentLab(agent_settings=NETWORK_SETTINGS) as lab:
        yield NetLab(lab)
        if request.node.stash.get(_FAILED, False):
            tail = lab.agent_log_text()[-8000:]
            sys.stderr.write(f"\n--- end of the agent log ({lab.agent_log}) ---\n{tail}\n")
