"""What the agent notices without being told: a killed QEMU, a guest that powers itself
off, and — after its own SIGKILL — the VMs it must adopt without restarting any."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from nubes.agent.compute.process import signal_process, wait_exited
from nubes.model.vm import Flavor
from nubes.store.keys import Kind
from tests.support.agent_lab import AgentLab

pytestmark = pytest.mark.integration

SMALL = Flavor(name="small", vcpus=1, memory_mb=96, disk_gb=0).model_dump()


async def test_a_killed_qemu_is_reported_crashed_within_two_seconds_and_restarted(
    lab: AgentLab,
) -> None:
    vm = await lab.create_vm()
    first = await lab.wait_vm(vm, "running")
    assert first.pid is not None
    await lab.wait_for(vm, lambda s: s and s["cpu_weight"], what="QMP and cgroup in place")
    mark = lab.mark(vm)
    killed_at = time.monotonic()
    signal_process(first.pid, signal.SIGKILL)
    crashed = await lab.wait_vm(vm, "crashed", since=mark, timeout=2.0)
    assert time.monotonic() - killed_at < 2.0
    assert "unexpectedly" in (crashed.reason or "")
    restarted = await lab.wait_for(
        vm,
        lambda s: s and s["state"] == "running" and s["pid"] not in (None, first.pid),
        since=mark,
        what="running again with a new QEMU",
    )
    assert restarted["restarts"] == 1


async def test_a_vm_whose_policy_is_never_stays_crashed(lab: AgentLab) -> None:
    vm = await lab.create_vm(restart_policy="never")
    first = await lab.wait_vm(vm, "running")
    assert first.pid is not None
    mark = lab.mark(vm)
    signal_process(first.pid, signal.SIGKILL)
    crashed = await lab.wait_vm(vm, "crashed", since=mark, timeout=2.0)
    assert crashed.restarts == 0
    await asyncio.sleep(3)  # a resync passes: still no restart
    assert vm not in lab.qemu_pids()
    assert (await lab.current_status(Kind.VM, vm))["state"] == "crashed"


async def test_a_zombie_qemu_counts_as_ended(lab: AgentLab) -> None:
    vm = await lab.create_vm(restart_policy="never")
    first = await lab.wait_vm(vm, "running")
    assert first.pid is not None
    mark = lab.mark(vm)
    signal_process(first.pid, signal.SIGKILL)
    # Its parent is init, which reaps it late here: the agent must not wait for that.
    crashed = await lab.wait_vm(vm, "crashed", since=mark, timeout=2.0)
    assert crashed.pid is None
    assert await wait_exited(first.pid, 5.0)


async def test_the_agent_adopts_ten_running_vms_after_its_own_sigkill_and_restarts_none(
    lab: AgentLab,
) -> None:
    vms = [await lab.create_vm(flavor=SMALL) for _ in range(10)]
    before = {vm: (await lab.wait_vm(vm, "running", timeout=60)).pid for vm in vms}
    lab.stop_agent(signal.SIGKILL)
    marks = {vm: lab.mark(vm) for vm in vms}
    lab.start_agent()
    await lab.wait_host_alive()
    assert lab.qemu_pids() == before
    # Adopted VMs answer again: a reboot request is carried out by the new agent.
    target = vms[0]
    await lab.update_vm(target, reboot_counter=1)
    await lab.wait_for(
        target, lambda s: s and s.get("reboot_counter") == 1, since=marks[target], what="reboot"
    )
    for vm in vms:
        status = await lab.current_status(Kind.VM, vm)
        assert status["state"] == "running"
        assert status["pid"] == before[vm]
        assert status["restarts"] == 0
        assert not any(
            isinstance(s, dict) and s.get("state") != "running"
            for s in lab.history[vm][marks[vm] :]
        ), f"{vm} left running after the agent restarted"
    assert lab.qemu_pids() == before
    assert "adopted QEMU" in lab.agent_log_text()


async def test_vms_follow_autostart_after_the_host_reboots(lab: AgentLab) -> None:
    keeps = await lab.create_vm(flavor=SMALL)
    waits = await lab.create_vm(flavor=SMALL, autostart=False)
    for vm in (keeps, waits):
        await lab.wait_vm(vm, "running")
    # A power cut: the agent and every QEMU die, and the host comes back with a new boot id.
    lab.stop_agent(signal.SIGKILL)
    for pid in lab.qemu_pids().values():
        signal_process(pid, signal.SIGKILL)
        await wait_exited(pid, 5.0)
    (lab.agent_state / "boot-id").write_text("an-earlier-boot\n")
    marks = {vm: lab.mark(vm) for vm in (keeps, waits)}
    lab.start_agent()
    restarted = await lab.wait_vm(keeps, "running", since=marks[keeps])
    assert restarted.restarts == 0  # a reboot is not a crash
    halted = await lab.wait_vm(waits, "stopped", since=marks[waits])
    assert "autostart is off" in (halted.reason or "")
    assert waits not in lab.qemu_pids()
    # Starting it is an explicit request, and it is honoured.
    mark = lab.mark(waits)
    await lab.update_vm(waits, start_counter=1)
    await lab.wait_vm(waits, "running", since=mark)


async def test_a_guest_that_powers_itself_off_is_stopped_within_a_second_and_stays_so(
    lab: AgentLab,
) -> None:
    image = await lab.register_tiny_image(extra_cmdline="nubes.poweroff-after-boot")
    vm = await lab.create_vm(image=image.id)
    first = await lab.wait_vm(vm, "running")
    stopped = await lab.wait_vm(vm, "stopped", timeout=40)
    assert "powered itself off" in (stopped.reason or "")
    assert stopped.last_event == "SHUTDOWN"
    assert stopped.last_event_at is not None
    # The status is written within a second of QEMU's event.
    assert (stopped.updated_at - stopped.last_event_at).total_seconds() < 1.0
    assert "nubes-guest: poweroff-requested" in lab.serial_log(vm)
    await asyncio.sleep(3)  # a resync passes: the guest's choice is respected
    assert vm not in lab.qemu_pids()
    assert (await lab.current_status(Kind.VM, vm))["state"] == "stopped"
    # A start request runs it again.
    mark = lab.mark(vm)
    await lab.update_vm(vm, start_counter=1)
    again = await lab.wait_vm(vm, "running", since=mark)
    assert again.pid != first.pid


async def test_restart_policy_always_restarts_a_guest_that_powered_off(lab: AgentLab) -> None:
    image = await lab.register_tiny_image(extra_cmdline="nubes.poweroff-after-boot")
    vm = await lab.create_vm(image=image.id, restart_policy="always")
    first = await lab.wait_vm(vm, "running")
    stopped = await lab.wait_vm(vm, "stopped", timeout=40)
    assert "restarting" in (stopped.reason or "")
    mark = lab.mark(vm)
    again = await lab.wait_vm(vm, "running", since=mark)
    assert again.pid != first.pid
