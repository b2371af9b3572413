"""Failures a user can cause end in `error` with a readable reason and leave nothing
behind; and what the store forgot, `nubes host gc` finds and removes."""

from __future__ import annotations

import json
import signal

import pytest

from nubes.agent.compute.cgroup import CpuWeights
from nubes.model.vm import Flavor
from nubes.store.keys import Kind, resource_key
from tests.support.agent_lab import AgentLab

pytestmark = pytest.mark.integration


async def test_a_vm_with_a_missing_image_ends_in_error_and_leaves_nothing(lab: AgentLab) -> None:
    vm = await lab.create_vm(image="img-0000000000")
    failed = await lab.wait_vm(vm, "error")
    assert "image img-0000000000 does not exist" in (failed.reason or "")
    assert lab.leftovers() == []


async def test_a_flavor_larger_than_the_host_ends_in_error_until_it_is_fixed(
    lab: AgentLab,
) -> None:
    huge = Flavor(name="huge", vcpus=1, memory_mb=1024 * 1024, disk_gb=0)
    vm = await lab.create_vm(flavor=huge.model_dump())
    failed = await lab.wait_vm(vm, "error")
    assert "flavor huge asks for 1048576 MiB" in (failed.reason or ""), failed.reason
    assert lab.leftovers() == []
    # Fixing the spec is enough: the agent tries again.
    mark = lab.mark(vm)
    await lab.update_vm(vm, flavor={"name": "ok", "vcpus": 1, "memory_mb": 96, "disk_gb": 0})
    await lab.wait_vm(vm, "running", since=mark)


async def test_qemu_refusing_to_start_puts_its_own_message_in_the_status(lab: AgentLab) -> None:
    vm = await lab.create_vm()
    await lab.wait_vm(vm, "running")
    # The kernel in the host's image cache gets damaged: only QEMU, loading it, finds out.
    assert lab.image is not None
    kernel = lab.agent_state / "image-cache" / lab.image.id / "kernel"
    kernel.write_bytes(b"this is not a kernel" * 100)
    broken = await lab.create_vm()
    failed = await lab.wait_vm(broken, "error")
    assert "linux kernel too old" in (failed.reason or ""), failed.reason  # QEMU's own words
    assert broken not in lab.qemu_pids()
    assert not (lab.run_dir / "vms" / broken).exists()
    assert not (lab.agent_state / "vms" / broken).exists()


async def test_a_volume_in_error_puts_the_vm_in_error(lab: AgentLab) -> None:
    volume = await lab.create_volume(size_gb=1)
    await lab.wait_volume(volume, "available")
    path = lab.agent_state / "volumes" / f"{volume}.qcow2"
    path.write_bytes(b"this is not a disk image" * 100)
    await lab.update(Kind.VOLUME, volume, lambda d: d["spec"].update(size_gb=2))
    broken = await lab.wait_volume(volume, "error")
    assert broken.reason
    vm = await lab.create_vm(volumes=[volume])
    failed = await lab.wait_vm(vm, "error")
    assert f"volume {volume} is in error" in (failed.reason or ""), failed.reason
    assert vm not in lab.qemu_pids()


async def test_an_invalid_record_is_an_error_not_a_crash_of_the_agent(lab: AgentLab) -> None:
    vm = await lab.create_vm()
    await lab.wait_vm(vm, "running")
    bad = "i-zzzzzzzzzz"
    await lab.db.put(resource_key(Kind.VM, bad), {"id": bad, "spec": {"host": "lab-host"}})
    await lab.wait_vm(bad, "error")
    assert lab.agent is not None
    assert lab.agent.poll() is None
    await lab.db.delete(resource_key(Kind.VM, bad))


async def test_cpu_weight_is_applied_through_the_cgroup(lab: AgentLab) -> None:
    cgroups = CpuWeights(lab.prefix)
    if cgroups.available() is None:
        pytest.fail("no cgroup cpu controller on this host")
    vm = await lab.create_vm(cpu_weight=300)
    await lab.wait_vm(vm, "running")
    # Applied right after "running" is written, not before: the start does not wait for it.
    await lab.wait_for(vm, lambda s: s and s.get("cpu_weight") == 300, what="weight 300")
    assert cgroups.read(vm) == 300
    mark = lab.mark(vm)
    await lab.update_vm(vm, cpu_weight=50)
    await lab.wait_for(vm, lambda s: s and s.get("cpu_weight") == 50, since=mark)
    assert cgroups.read(vm) == 50
    await lab.delete(Kind.VM, vm)
    await lab.wait_gone(vm)
    assert vm not in cgroups.orphans(set())


async def test_host_gc_lists_then_removes_what_the_store_forgot(lab: AgentLab) -> None:
    vm = await lab.create_vm()
    volume = await lab.create_volume()
    await lab.wait_vm(vm, "running")
    await lab.wait_volume(volume, "available")
    # The records vanish while the agent is down: its processes and files are orphans now.
    lab.stop_agent(signal.SIGKILL)
    await lab.db.delete(resource_key(Kind.VM, vm), prefix=True)
    await lab.db.delete(resource_key(Kind.VOLUME, volume), prefix=True)

    listed = lab.nubes("host", "gc", "--dry-run", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    found = {(o["kind"], o["id"]) for o in json.loads(listed.stdout)["orphans"]}
    assert {("process", vm), ("vm-files", vm), ("volume", volume)} <= found
    assert json.loads(listed.stdout)["removed"] == []
    assert vm in lab.qemu_pids()

    swept = lab.nubes("host", "gc", "-o", "json")
    assert swept.returncode == 0, swept.stderr
    removed = {(o["kind"], o["id"]) for o in json.loads(swept.stdout)["removed"]}
    assert {("process", vm), ("vm-files", vm), ("volume", volume)} <= removed
    assert lab.leftovers() == []
    again = lab.nubes("host", "gc", "--dry-run", "-o", "json")
    assert json.loads(again.stdout)["orphans"] == []


async def test_a_vm_whose_root_disk_vanished_is_an_error_not_a_fresh_disk(lab: AgentLab) -> None:
    vm = await lab.create_vm()
    await lab.wait_vm(vm, "running")
    mark = lab.mark(vm)
    await lab.update_vm(vm, power_state="stopped", soft_stop_timeout=0)
    await lab.wait_vm(vm, "stopped", since=mark)
    (lab.agent_state / "vms" / vm / "root.qcow2").unlink()
    mark = lab.mark(vm)
    await lab.update_vm(vm, power_state="running", start_counter=1)
    failed = await lab.wait_vm(vm, "error", since=mark)
    assert "root disk" in (failed.reason or "")
    assert "gone" in (failed.reason or "")
    assert not (lab.agent_state / "vms" / vm / "root.qcow2").exists()
    assert vm not in lab.qemu_pids()


async def test_a_volume_whose_file_vanished_is_an_error_not_a_blank_volume(lab: AgentLab) -> None:
    volume = await lab.create_volume(size_gb=1)
    await lab.wait_volume(volume, "available")
    path = lab.agent_state / "volumes" / f"{volume}.qcow2"
    path.unlink()
    mark = lab.mark(volume)
    broken = await lab.wait_volume(volume, "error", since=mark, timeout=10)  # at the resync
    assert "is gone" in (broken.reason or "")
    assert not path.exists()
