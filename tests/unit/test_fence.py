"""The fencer's decisions (records and processes in, pids to kill out) and its checks of who
runs: the agent by pidfile and start time, a QEMU by its nubes marker before the kill."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from nubes.agent.compute.qemu_cmdline import DiskFormat, process_marker
from nubes.agent.fence import (
    Fencing,
    agent_pidfile,
    agent_running,
    all_disks_on_shared_pools,
    choose_fencing,
    kill_qemu,
    remove_agent_pidfile,
    write_agent_pidfile,
)
from nubes.agent.paths import AgentPaths
from nubes.agent.runtime import LaunchedDisk, LaunchRecord
from nubes.ids import IdKind, new_id
from nubes.model.common import now
from nubes.model.migration import MigrationRequest
from nubes.model.vm import Flavor, VmRecord, VmSpec

SMALL = Flavor(name="small", vcpus=1, memory_mb=256, disk_gb=1)
TTL = 4.0


def record(
    host: str | None, *, ha: bool = False, migration: tuple[str, str] | None = None
) -> VmRecord:
    vm_id = new_id(IdKind.VM)
    request = None
    if migration is not None:
        request = MigrationRequest(source=migration[0], target=migration[1])
    spec = VmSpec(name=vm_id, flavor=SMALL, host=host, ha=ha, migration=request)
    return VmRecord(id=vm_id, spec=spec, created_at=now())


def decide(
    running: dict[str, int],
    records: Mapping[str, VmRecord | None] | None,
    *,
    last_known: dict[str, VmRecord] | None = None,
    restartable: set[str] | None = None,
    silent: float = 0.0,
) -> dict[str, int]:
    chosen = choose_fencing(
        "h1",
        running,
        records,
        last_known=last_known or {},
        restartable=restartable or set(),
        store_silent_seconds=silent,
        heartbeat_ttl=TTL,
    )
    return {fencing.vm_id: fencing.pid for fencing in chosen}


def test_a_qemu_of_a_vm_bound_to_another_host_is_killed_and_ours_are_not() -> None:
    moved, ours, unbound = record("h2"), record("h1"), record(None)
    running = {moved.id: 10, ours.id: 11, unbound.id: 12}
    records = {vm.id: vm for vm in (moved, ours, unbound)}

    assert decide(running, records) == {moved.id: 10}


def test_a_vm_without_a_readable_record_is_left_to_the_agent() -> None:
    vm_id = new_id(IdKind.VM)
    assert decide({vm_id: 10}, {vm_id: None}) == {}
    assert decide({vm_id: 10}, {}) == {}


def test_a_move_involving_this_host_protects_both_of_its_qemus() -> None:
    incoming = record("h2", migration=("h2", "h1"))  # this host is the target
    outgoing = record("h2", migration=("h1", "h2"))  # switched, not yet cleared
    elsewhere = record("h2", migration=("h2", "h3"))  # a move this host has no part in
    running = {incoming.id: 1, outgoing.id: 2, elsewhere.id: 3}
    records = {vm.id: vm for vm in (incoming, outgoing, elsewhere)}

    assert decide(running, records) == {elsewhere.id: 3}


def test_a_short_store_outage_kills_nothing() -> None:
    ha = record("h1", ha=True)
    running = {ha.id: 10}

    assert decide(running, None, last_known={ha.id: ha}, restartable={ha.id}, silent=TTL / 2) == {}


def test_a_store_silent_past_the_ttl_kills_the_restartable_ha_qemus_only() -> None:
    ha, plain, local_ha = record("h1", ha=True), record("h1"), record("h1", ha=True)
    never_read = new_id(IdKind.VM)
    running = {ha.id: 1, plain.id: 2, local_ha.id: 3, never_read: 4}
    known = {ha.id: ha, plain.id: plain, local_ha.id: local_ha}

    chosen = decide(
        running,
        None,
        last_known=known,
        restartable={ha.id, plain.id, never_read},
        silent=TTL / 2 + 0.1,
    )

    assert chosen == {ha.id: 1, never_read: 4}


def test_disks_count_as_shared_only_when_every_one_is_under_a_pool(tmp_path: Path) -> None:
    pool, local = tmp_path / "pool", tmp_path / "local"

    def launch(*paths: Path) -> LaunchRecord:
        disks = [
            LaunchedDisk(node=f"d{i}", path=str(p), format=DiskFormat.QCOW2, serial=f"s{i}")
            for i, p in enumerate(paths)
        ]
        return LaunchRecord(vm_id=new_id(IdKind.VM), flavor=SMALL, disks=disks, argv=["qemu"])

    assert all_disks_on_shared_pools(launch(pool / "vms/a/root.qcow2"), [pool])
    assert not all_disks_on_shared_pools(
        launch(pool / "vms/a/root.qcow2", local / "vol.qcow2"), [pool]
    )
    assert not all_disks_on_shared_pools(launch(pool / ".." / "local/x.qcow2"), [pool])
    assert not all_disks_on_shared_pools(launch(pool / "vms/a/root.qcow2"), [])
    assert not all_disks_on_shared_pools(None, [pool])


def test_the_agent_runs_while_its_pidfile_names_this_live_process(tmp_path: Path) -> None:
    paths = AgentPaths(state_dir=tmp_path / "state", run_dir=tmp_path / "run")
    paths.run_dir.mkdir()
    assert not agent_running(paths)

    write_agent_pidfile(paths)
    assert agent_running(paths)

    pid, _ = agent_pidfile(paths).read_text().split()
    agent_pidfile(paths).write_text(f"{pid} 1\n")  # same pid, another start time: reused
    assert not agent_running(paths)

    write_agent_pidfile(paths)
    remove_agent_pidfile(paths)
    assert not agent_running(paths)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def test_a_pid_that_is_not_that_vms_qemu_is_never_signalled(
    sleeper: subprocess.Popen[bytes],
) -> None:
    fencing = Fencing(new_id(IdKind.VM), sleeper.pid, "test")

    assert not kill_qemu(fencing, "nbtest")
    assert sleeper.poll() is None
    assert not kill_qemu(Fencing(fencing.vm_id, os.getpid(), "test"), "nbtest")


def test_the_qemu_that_carries_the_vms_marker_is_killed() -> None:
    vm_id = new_id(IdKind.VM)
    # A stand-in with QEMU's marker in its argv: the fencer knows processes by that alone.
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(60)",
            "-name",
            f"guest={process_marker('nbtest', vm_id)}",
        ]
    )
    try:
        # Until the child has exec'd, its /proc cmdline is still pytest's (a flake when busy).
        marker = process_marker("nbtest", vm_id).encode()
        deadline = time.monotonic() + 10
        while marker not in Path(f"/proc/{process.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the stand-in never exec'd"
            time.sleep(0.01)
        assert kill_qemu(Fencing(vm_id, process.pid, "test"), "nbtest")
        assert process.wait(5) == -9
    finally:
        process.kill()
        process.wait()
