"""Starting QEMU for a VM: daemonized, found again by pidfile and marker, and a failed
start reported in QEMU's own words with nothing left running.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nubes.agent.compute.process import (
    find_vm_process,
    launch_qemu,
    read_cmdline,
    scan_qemu_processes,
)
from nubes.agent.compute.qemu_cmdline import DiskFormat, DiskPlan, process_marker
from nubes.errors import QemuError
from nubes.process import run_tool
from tests.integration.compute.conftest import MakeVm

pytestmark = pytest.mark.integration


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def seconds_to_run(argv: list[str]) -> float:
    """How long QEMU's foreground process takes, started plainly (the reference)."""
    started = time.monotonic()
    subprocess.run(argv, check=True)
    return time.monotonic() - started


async def test_a_launched_vm_runs_daemonized_and_is_found_by_pidfile_and_marker(
    make_vm: MakeVm, prefix: str
) -> None:
    vm = make_vm()
    pid = await vm.launch()

    assert find_vm_process(vm.paths.pidfile, prefix, vm.plan.vm_id) == pid
    assert scan_qemu_processes(prefix) == {vm.plan.vm_id: pid}
    cmdline = read_cmdline(pid)
    assert cmdline is not None
    assert cmdline[1:] == vm.argv[1:]
    assert f"guest={process_marker(prefix, vm.plan.vm_id)},debug-threads=on" in cmdline
    # Daemonized: its parent is PID 1, not us.
    assert parent_of(pid) == 1
    async with await vm.connect() as session:
        assert await session.query_status() == "running"


async def test_the_serial_log_fills_with_the_kernel_and_the_guest_lines(make_vm: MakeVm) -> None:
    vm = make_vm()
    await vm.launch()

    await vm.wait_for_console(r"Linux version \d")
    await vm.wait_for_console(r"^nubes-guest: booted ")
    await vm.wait_booted()


async def test_a_failed_launch_raises_qemus_message_and_leaves_no_process(
    make_vm: MakeVm, prefix: str, workdir: Path
) -> None:
    missing = workdir / "missing.qcow2"
    vm = make_vm(extra_disks=(DiskPlan("data", missing, DiskFormat.QCOW2, serial="data"),))

    with pytest.raises(QemuError) as raised:
        await vm.launch()

    message = str(raised.value)
    assert "qemu-system-x86_64: -blockdev driver=qcow2,node-name=data," in message
    assert f"Could not open '{missing}': No such file or directory" in message
    # `-msg timestamp=on` stamps QEMU's lines; the message is QEMU's text without it.
    assert message.startswith("QEMU did not start: qemu-system-x86_64: ")
    assert vm.plan.vm_id not in scan_qemu_processes(prefix)
    assert not vm.paths.pidfile.exists()


async def test_a_launch_cut_short_by_its_timeout_leaves_no_process(
    make_vm: MakeVm, prefix: str
) -> None:
    vm = make_vm()
    with pytest.raises(QemuError, match=r"did not finish starting within 0\.005 s"):
        await launch_qemu(vm.argv, pidfile=vm.paths.pidfile, timeout=0.005)
    # A daemon that forked before its parent was killed ends itself when it cannot
    # report to it; one that wrote its pidfile was killed by launch_qemu.
    deadline = time.monotonic() + 3
    while vm.plan.vm_id in scan_qemu_processes(prefix):
        assert time.monotonic() < deadline, "a QEMU of the cut-short launch still runs"
        await asyncio.sleep(0.05)
    assert not vm.paths.pidfile.exists()


async def test_a_second_launch_over_a_running_vm_is_refused_and_the_vm_kept(
    make_vm: MakeVm, prefix: str
) -> None:
    vm = make_vm()
    pid = await vm.launch()

    with pytest.raises(QemuError, match=f"already runs with pidfile .* \\(pid {pid}\\)"):
        await launch_qemu(vm.argv, pidfile=vm.paths.pidfile)
    assert find_vm_process(vm.paths.pidfile, prefix, vm.plan.vm_id) == pid


@pytest.fixture
def netns(prefix: str) -> Iterator[str]:
    name = f"nubes-{prefix}-{secrets.token_hex(2)}"
    run_tool(["ip", "netns", "add", name])
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


async def test_a_vm_launched_in_a_network_namespace_runs_there(
    make_vm: MakeVm, netns: str, prefix: str
) -> None:
    vm = make_vm()
    pid = await launch_qemu(vm.argv, pidfile=vm.paths.pidfile, netns=netns)
    vm.pid = pid

    assert run_tool(["ip", "netns", "identify", str(pid)]).strip() == netns
    assert find_vm_process(vm.paths.pidfile, prefix, vm.plan.vm_id) == pid
    async with await vm.connect() as session:
        assert await session.query_status() == "running"


async def test_a_launch_into_a_missing_namespace_says_so(make_vm: MakeVm, prefix: str) -> None:
    vm = make_vm()
    with pytest.raises(QemuError, match='Cannot open network namespace "nubes-no-such-ns"'):
        await launch_qemu(vm.argv, pidfile=vm.paths.pidfile, netns="nubes-no-such-ns")
    assert vm.plan.vm_id not in scan_qemu_processes(prefix)


@pytest.fixture
def comma_directory() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="nb,", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_a_vm_whose_paths_hold_commas_starts(make_vm: MakeVm, comma_directory: Path) -> None:
    vm = make_vm(directory=comma_directory / "vm,1")
    await vm.launch()

    async with await vm.connect() as session:
        assert await session.query_status() == "running"
        assert (await session.attached_disks())["root"] == str(vm.root_disk.path)
    await vm.wait_for_console(r"Linux version \d")


async def test_launching_costs_little_more_than_a_bare_qemu_start(make_vm: MakeVm) -> None:
    bare_seconds, launch_seconds = [], []
    for round_ in range(3):
        bare = make_vm(f"i-bare00000{round_}")
        bare_seconds.append(seconds_to_run(bare.argv))
        bare.kill()

        launched = make_vm(f"i-launch000{round_}")
        started = time.monotonic()
        await launched.launch()
        launch_seconds.append(time.monotonic() - started)
        launched.kill()

    print(f"bare QEMU start {min(bare_seconds):.3f} s, launch_qemu {min(launch_seconds):.3f} s")
    assert min(launch_seconds) < min(bare_seconds) + 0.1
