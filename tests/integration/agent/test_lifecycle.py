"""A VM's life through its spec: start, soft and forced stop, start again, reboot, resize,
delete — each observed in the status the agent writes and on the host itself."""

from __future__ import annotations

import asyncio
import socket

import pytest

from nubes.model.vm import Flavor
from nubes.store.keys import Kind
from tests.support.agent_lab import AgentLab, qemu_cmdline

pytestmark = pytest.mark.integration


async def test_a_vm_runs_stops_starts_reboots_and_is_deleted_without_leftovers(
    lab: AgentLab,
) -> None:
    vm = await lab.create_vm()
    running = await lab.wait_vm(vm, "running")
    assert running.pid == lab.qemu_pids()[vm]
    assert running.qemu_status == "running"
    assert running.host == "lab-host"
    await lab.wait_serial(vm, "nubes-guest: booted")

    mark = lab.mark(vm)
    await lab.update_vm(vm, power_state="stopped")
    stopped = await lab.wait_vm(vm, "stopped", since=mark)
    assert stopped.reason is None
    assert stopped.pid is None
    assert "nubes-guest: shutdown" in lab.serial_log(vm)  # the guest powered off cleanly
    assert vm not in lab.qemu_pids()

    mark = lab.mark(vm)
    await lab.update_vm(vm, power_state="running", start_counter=1)
    again = await lab.wait_vm(vm, "running", since=mark)
    assert again.pid is not None
    assert again.pid != running.pid
    await lab.wait_serial(vm, "nubes-guest: booted")

    mark = lab.mark(vm)
    await lab.update_vm(vm, reboot_counter=1)
    rebooted = await lab.wait_for(
        vm, lambda s: s and s.get("reboot_counter") == 1, since=mark, what="reboot done"
    )
    assert rebooted["pid"] == again.pid  # a reboot keeps the process
    await lab.wait_for(vm, lambda s: s and s.get("last_event") == "RESET", since=mark)

    mark = lab.mark(vm)
    await lab.update_vm(vm, power_state="stopped", soft_stop_timeout=0)
    forced = await lab.wait_vm(vm, "stopped", since=mark, timeout=10)
    assert forced.pid is None

    await lab.delete(Kind.VM, vm)
    await lab.wait_gone(vm)
    assert await lab.current_status(Kind.VM, vm) is None
    assert lab.leftovers() == []


async def test_a_soft_stop_turns_hard_when_the_guest_ignores_the_power_button(
    lab: AgentLab,
) -> None:
    vm = await lab.create_vm(soft_stop_timeout=1)
    await lab.wait_vm(vm, "running")
    # Before the guest's boot script has started acpid, the power button goes unheard.
    mark = lab.mark(vm)
    await lab.update_vm(vm, power_state="stopped")
    stopped = await lab.wait_vm(vm, "stopped", since=mark, timeout=15)
    assert stopped.pid is None
    assert vm not in lab.qemu_pids()


async def test_a_cold_resize_applies_at_the_next_start(lab: AgentLab) -> None:
    vm = await lab.create_vm()
    await lab.wait_vm(vm, "running")
    bigger = Flavor(name="bigger", vcpus=2, memory_mb=160, disk_gb=1)
    mark = lab.mark(vm)
    await lab.update_vm(vm, flavor=bigger.model_dump())
    pending = await lab.wait_for(
        vm, lambda s: s and s.get("resize_pending") is True, since=mark, what="resize pending"
    )
    assert pending["flavor"]["memory_mb"] == 96  # still the old size while it runs

    mark = lab.mark(vm)
    await lab.update_vm(vm, power_state="stopped", soft_stop_timeout=0)
    await lab.wait_vm(vm, "stopped", since=mark)
    mark = lab.mark(vm)
    await lab.update_vm(vm, power_state="running", start_counter=1)
    resized = await lab.wait_vm(vm, "running", since=mark)
    assert resized.flavor is not None
    assert resized.flavor.memory_mb == 160
    assert not resized.resize_pending
    assert resized.pid is not None
    argv = qemu_cmdline(resized.pid)
    assert argv[argv.index("-m") + 1] == "160M"
    assert argv[argv.index("-smp") + 1] == "2"


def _rfb_greeting(path: str) -> bytes:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(5)
        client.connect(path)
        return client.recv(12)


async def test_a_vm_asking_for_vnc_gets_a_console_on_a_unix_socket(lab: AgentLab) -> None:
    vm = await lab.create_vm(vnc=True)
    await lab.wait_vm(vm, "running")
    greeting = await asyncio.to_thread(_rfb_greeting, str(lab.run_dir / "vms" / vm / "vnc.sock"))
    assert greeting.startswith(b"RFB 003.")
