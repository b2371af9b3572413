"""Fixtures for the agent tests: a lab host with a real `nubes agent` process (needs root).

When a test fails, the end of the agent's log is printed with it: that log is usually
the only place that says why.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.agent_lab import AgentLab

_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        item.stash[_FAILED] = True


@pytest.fixture
async def lab(request: pytest.FixtureRequest) -> AsyncIterator[AgentLab]:
    if os.geteuid() != 0:
        pytest.fail("the agent tests need root (QEMU processes, cgroups)")
    async with AgentLab() as host:
        yield host
        if request.node.stash.get(_FAILED, False):
            tail = host.agent_log_text()[-8000:]
            sys.stderr.write(f"\n--- end of the agent log ({host.agent_log}) ---\n{tail}\n")
