"""Runs every doctor check against the real host, in a fixed order. A check that raises
becomes a failed check carrying the error: the doctor never crashes on a strange host.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from nubes.config import NubesConfig
from nubes.doctor.disk import check_disk
from nubes.doctor.kernel import (
    check_cgroup,
    check_modules,
    check_privileges,
    parse_effective_capabilities,
    read_kernel_facts,
)
from nubes.doctor.kvm import evaluate_kvm, probe_kvm, remembered_kvm_boot
from nubes.doctor.report import Check, fail
from nubes.doctor.store import check_store
from nubes.doctor.tools import check_tools


def guarded(name: str, check: Callable[[], list[Check]]) -> list[Check]:
    """The check's results, or one failed check that says how the check itself broke."""
    try:
        return check()
    except Exception as error:  # any surprise from a strange host is reported, not raised
        return [
            fail(
                name,
                f"the check itself failed: {type(error).__name__}: {error}",
                "look at the error; if the host looks sane, report it as a nubes bug",
            )
        ]


def run_checks(config: NubesConfig, path_variable: str | None = None) -> list[Check]:
    """Every check, in the order an operator fixes things: tools, kernel, disk, store."""
    path = os.environ.get("PATH", os.defpath) if path_variable is None else path_variable
    agent = config.agent
    data_directories = [
        config.state_dir,
        config.image_dir,
        config.agent_state_dir,
        *agent.storage_pools.values(),
    ]
    checks: list[Check] = []
    checks += guarded("tools", lambda: check_tools(agent.qemu, path))
    checks += guarded(
        "kvm",
        lambda: [
            evaluate_kvm(agent.accel, probe_kvm(), remembered_kvm_boot(config.agent_state_dir))
        ],
    )
    checks += guarded("modules", lambda: check_modules(read_kernel_facts()))
    checks += guarded("cgroup", lambda: [check_cgroup(_read("/proc/self/mountinfo"))])
    checks += guarded(
        "privileges",
        lambda: [
            check_privileges(os.geteuid(), parse_effective_capabilities(_read("/proc/self/status")))
        ],
    )
    checks += guarded("disk", lambda: check_disk(data_directories))
    checks += guarded("store", lambda: asyncio.run(check_store(config)))
    return checks


def _read(path: str) -> str:
    return Path(path).read_text()
