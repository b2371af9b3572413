"""Shared by every integration test: remember whether a test failed, so fixtures can
print what explains it (an agent's log) on their way out."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.agent_lab import TEST_FAILED


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        item.stash[TEST_FAILED] = True
