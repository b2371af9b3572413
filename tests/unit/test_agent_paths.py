"""The agent's paths: ids become path components only after validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from nubes.agent.paths import AgentPaths
from nubes.agent.status import differs
from nubes.errors import InvalidId
from nubes.model.vm import VmState, VmStatus

PATHS = AgentPaths(state_dir=Path("/var/lib/nubes/agent"), run_dir=Path("/run/nubes/agent"))


def test_a_vm_keeps_disks_in_state_and_sockets_in_run() -> None:
    runtime = PATHS.runtime("i-0123456789", vnc=True)
    assert runtime.qmp_socket == Path("/run/nubes/agent/vms/i-0123456789/qmp.sock")
    assert runtime.serial_log == Path("/var/lib/nubes/agent/vms/i-0123456789/serial.log")
    assert runtime.vnc_socket is not None
    assert PATHS.runtime("i-0123456789").vnc_socket is None


@pytest.mark.parametrize("bad", ["../../etc", "i-0123456789/..", "vol-0123456789", "i-ABCDEFGHIJ"])
def test_a_string_that_is_not_a_vm_id_never_becomes_a_path(bad: str) -> None:
    with pytest.raises(InvalidId):
        PATHS.vm_state_dir(bad)
    with pytest.raises(InvalidId):
        PATHS.runtime(bad)


def test_a_status_differs_only_in_what_a_user_can_see() -> None:
    first = VmStatus(state=VmState.RUNNING, updated_at="2026-11-21T00:00:00Z")  # type: ignore[arg-type]
    later = first.model_copy(update={"updated_at": first.updated_at.replace(minute=5)})
    assert not differs(first, later)
    assert differs(first, first.model_copy(update={"pid": 42}))
    assert differs(None, first)
