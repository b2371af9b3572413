"""Talking QMP to a VM's QEMU: run state, events, the end of QEMU noticed at once, volume
hotplug with the guest's consent, and internal snapshots of a running VM's disk.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from nubes.agent.compute.process import signal_process, wait_exited
from nubes.agent.compute.qemu_cmdline import DiskFormat, DiskPlan, hotplug_port
from nubes.agent.compute.qmp import QmpCommandError, QmpDisconnected, QmpSession
from nubes.errors import QemuError
from nubes.process import run_tool
from tests.integration.compute.conftest import EventLog, MakeVm, make_qcow2

pytestmark = pytest.mark.integration

POWER_OFF_TIMEOUT = 30.0
MIB = 1024 * 1024


def volume(path: Path, node: str = "vol-data000001") -> DiskPlan:
    return DiskPlan(node=node, path=path, format=DiskFormat.QCOW2, serial=node)


def image_info(path: Path) -> str:
    """`qemu-img info` without -U: it fails while a QEMU still holds the file's lock."""
    return run_tool(["qemu-img", "info", str(path)])


async def test_the_run_state_follows_stop_and_cont_with_events(make_vm: MakeVm) -> None:
    vm = make_vm()
    await vm.launch()
    events = EventLog()
    async with await vm.connect(events) as session:
        assert await session.query_status() == "running"
        await session.stop()
        assert await session.query_status() == "paused"
        await session.cont()
        assert await session.query_status() == "running"
        await asyncio.sleep(0.1)
    assert events.entries == ["STOP", "RESUME"]
    assert all(abs(event.timestamp - time.time()) < 60 for event in events.events)


async def test_a_refused_command_carries_qemus_description_and_class(make_vm: MakeVm) -> None:
    vm = make_vm()
    await vm.launch()
    async with await vm.connect() as session:
        with pytest.raises(QmpCommandError) as raised:
            await session.execute("device_del", {"id": "no-such-device"})
    assert raised.value.error_class == "DeviceNotFound"
    assert str(raised.value) == "QEMU refused device_del: Device 'no-such-device' not found"


async def test_the_power_button_powers_a_booted_guest_off_and_the_session_sees_it_end(
    make_vm: MakeVm,
) -> None:
    vm = make_vm()
    pid = await vm.launch()
    await vm.wait_booted()
    events = EventLog()
    session = await vm.connect(events)
    try:
        await session.system_powerdown()
        await asyncio.wait_for(session.closed.wait(), POWER_OFF_TIMEOUT)
    finally:
        await session.close()

    assert events.entries == ["POWERDOWN", "SHUTDOWN", "closed"]
    assert events.named("SHUTDOWN")[0].data == {"guest": True, "reason": "guest-shutdown"}
    assert await wait_exited(pid, 5)
    await vm.wait_for_console(r"^nubes-guest: shutdown power-button")


async def test_a_killed_qemu_closes_the_session_within_a_second(make_vm: MakeVm) -> None:
    vm = make_vm()
    pid = await vm.launch()
    events = EventLog()
    session = await vm.connect(events)
    try:
        signal_process(pid, signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.wait_for(session.closed.wait(), 1.0)
        noticed = time.monotonic() - killed
        with pytest.raises(QmpDisconnected):
            await session.query_status()
    finally:
        await session.close()

    print(f"closed {noticed * 1000:.1f} ms after SIGKILL")
    assert events.entries == ["closed"]


async def test_closing_the_session_ourselves_leaves_qemu_running_and_calls_no_handler(
    make_vm: MakeVm,
) -> None:
    vm = make_vm()
    await vm.launch()
    events = EventLog()
    session = await vm.connect(events)
    await session.close()
    await session.close()

    assert session.closed.is_set()
    assert events.entries == []
    with pytest.raises(QmpDisconnected):
        await session.quit()
    async with await vm.connect() as again:
        assert await again.query_status() == "running"


async def test_quit_ends_qemu_and_its_closing_socket_counts_as_the_answer(
    make_vm: MakeVm,
) -> None:
    vm = make_vm()
    pid = await vm.launch()
    events = EventLog()
    session = await vm.connect(events)
    try:
        await session.quit()
        await asyncio.wait_for(session.closed.wait(), 5)
        await session.quit()  # QEMU has gone: nothing left to do
    finally:
        await session.close()
    assert await wait_exited(pid, 5)
    assert events.named("SHUTDOWN")[0].data == {"guest": False, "reason": "host-qmp-quit"}
    assert events.entries[-1] == "closed"


async def test_connecting_where_no_qemu_listens_times_out_with_a_clear_error(
    workdir: Path,
) -> None:
    with pytest.raises(QemuError, match=r"no QMP answer from i-0123456789 .* within 0\.2 s"):
        await QmpSession.connect(workdir / "qmp.sock", name="i-0123456789", timeout=0.2)


async def test_a_volume_is_hotplugged_resized_and_unplugged_with_the_guests_consent(
    make_vm: MakeVm, workdir: Path
) -> None:
    vm = make_vm()
    await vm.launch()
    await vm.wait_booted()
    data = volume(make_qcow2(workdir / "vol-data000001.qcow2", size="64M"))
    events = EventLog()
    async with await vm.connect(events) as session:
        await session.attach_disk(data, hotplug_port(0))
        await session.attach_disk(data, hotplug_port(0))  # already there: nothing to do
        assert await session.attached_disks() == {
            "root": str(vm.root_disk.path),
            data.node: str(data.path),
        }
        await vm.wait_for_console(r"virtio_blk virtio\d+: \[vdb\] 131072 512-byte")

        await session.block_resize(data.node, 128 * MIB)
        await vm.wait_for_console(r"\[vdb\] new size: 262144 512-byte")

        started = time.monotonic()
        await session.detach_disk(data.node, timeout=30)
        detach_seconds = time.monotonic() - started
        await session.detach_disk(data.node, timeout=30)  # already gone: nothing to do
        assert await session.attached_disks() == {"root": str(vm.root_disk.path)}
        assert data.node not in await session.block_nodes()

    print(f"detach took {detach_seconds:.2f} s")
    deleted = [event.data.get("device") for event in events.named("DEVICE_DELETED")]
    assert "disk-vol-data000001" in deleted
    # The block node is gone, so QEMU holds no lock on the file any more.
    assert "virtual size: 128 MiB" in image_info(data.path)


async def test_a_pc_machine_hotplugs_a_volume_without_root_ports(
    make_vm: MakeVm, workdir: Path
) -> None:
    vm = make_vm(machine="pc")
    await vm.launch()
    await vm.wait_booted()
    data = volume(make_qcow2(workdir / "vol-data000001.qcow2"))
    async with await vm.connect() as session:
        await session.attach_disk(data, None)
        await vm.wait_for_console(r"virtio_blk virtio\d+: \[vdb\]")
        await session.detach_disk(data.node, timeout=30)
        assert await session.attached_disks() == {"root": str(vm.root_disk.path)}


async def test_a_refused_hotplug_leaves_no_block_node_behind(
    make_vm: MakeVm, workdir: Path
) -> None:
    vm = make_vm()
    await vm.launch()
    data = volume(make_qcow2(workdir / "vol-data000001.qcow2"))
    async with await vm.connect() as session:
        with pytest.raises(QmpCommandError, match="Bus 'no-such-port' not found"):
            await session.attach_disk(data, "no-such-port")
        assert data.node not in await session.block_nodes()
        with pytest.raises(QmpCommandError, match="Could not open"):
            await session.attach_disk(volume(workdir / "missing.qcow2"), hotplug_port(0))
    image_info(data.path)


async def test_a_guest_that_does_not_release_a_disk_fails_the_detach_clearly(
    make_vm: MakeVm, workdir: Path
) -> None:
    vm = make_vm()
    await vm.launch()
    await vm.wait_booted()
    data = volume(make_qcow2(workdir / "vol-data000001.qcow2"))
    async with await vm.connect() as session:
        await session.attach_disk(data, hotplug_port(1))
        await vm.wait_for_console(r"\[vdb\]")
        await session.stop()  # a paused guest cannot answer the unplug request
        with pytest.raises(QemuError, match=r"did not release disk vol-data000001 within 0\.5 s"):
            await session.detach_disk(data.node, timeout=0.5)
        assert data.node in await session.attached_disks()

        await session.cont()  # the request is still pending: the guest answers it now
        await session.detach_disk(data.node, timeout=30)
        assert data.node not in await session.block_nodes()


async def test_an_internal_snapshot_is_taken_and_deleted_while_the_vm_runs(
    make_vm: MakeVm,
) -> None:
    vm = make_vm()
    await vm.launch()
    root = vm.root_disk
    async with await vm.connect() as session:
        await session.snapshot_create(root.node, "before-upgrade")
        assert await session.snapshots(root.node) == ["before-upgrade"]
        listed = run_tool(["qemu-img", "snapshot", "-U", "-l", str(root.path)])
        assert "before-upgrade" in listed
        with pytest.raises(QmpCommandError, match="already exists"):
            await session.snapshot_create(root.node, "before-upgrade")

        await session.snapshot_delete(root.node, "before-upgrade")
        assert await session.snapshots(root.node) == []
        assert await session.query_status() == "running"
