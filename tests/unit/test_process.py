from __future__ import annotations

import pytest

from nubes.errors import CommandFailed, ToolMissing
from nubes.process import find_tool, run_tool


def test_a_tool_runs_and_its_output_comes_back() -> None:
    assert run_tool(["sh", "-c", "echo hello"]) == "hello\n"


def test_arguments_never_reach_a_shell() -> None:
    assert run_tool(["echo", "$(touch /tmp/nubes-pwned); x"]) == "$(touch /tmp/nubes-pwned); x\n"


def test_a_missing_tool_is_named_with_what_to_do() -> None:
    with pytest.raises(ToolMissing, match="no-such-tool-xyz is not installed") as raised:
        run_tool(["no-such-tool-xyz"])
    assert raised.value.hint is not None
    assert "scripts/setup" in raised.value.hint
    assert raised.value.code == "tool_missing"


def test_a_failing_tool_reports_its_exit_code_and_stderr() -> None:
    with pytest.raises(CommandFailed, match="exited 3: boom") as raised:
        run_tool(["sh", "-c", "echo boom >&2; exit 3"])
    assert raised.value.returncode == 3
    assert raised.value.code == "command_failed"


def test_system_directories_are_searched_for_tools() -> None:
    assert find_tool("sh").endswith("/sh")
