"""Volumes: made on the host, attached and detached while the VM runs (hotplug) and while
it is stopped, grown, snapshotted, reverted, and deleted without leftovers."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest

from nubes.store.keys import Kind
from tests.support.agent_lab import AgentLab, qemu_cmdline

pytestmark = pytest.mark.integration


def _qemu_img_info(lab: AgentLab, volume: str) -> dict[str, object]:
    path = lab.agent_state / "volumes" / f"{volume}.qcow2"
    output = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    document: dict[str, object] = json.loads(output)
    return document


def _qemu_io(path: str, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, path],
        capture_output=True,
        text=True,
        check=False,
    )


async def test_a_volume_is_hotplugged_into_a_running_vm_and_released_again(
    lab: AgentLab,
) -> None:
    vm = await lab.create_vm()
    volume = await lab.create_volume(size_gb=1)
    await lab.wait_vm(vm, "running")
    available = await lab.wait_volume(volume, "available")
    assert available.size_gb == 1
    assert available.attached_to is None
    await lab.wait_serial(vm, "nubes-guest: booted")

    mark = lab.mark(vm)
    await lab.update_vm(vm, volumes=[volume])
    attached = await lab.wait_for(
        vm, lambda s: s and s.get("attached_volumes") == [volume], since=mark, what="attached"
    )
    assert attached["reason"] is None
    await lab.wait_serial(vm, f"nubes-guest: disk-added vdb {volume}")
    in_use = await lab.wait_volume(volume, "in-use")
    assert in_use.attached_to == vm

    mark, volume_mark = lab.mark(vm), lab.mark(volume)
    await lab.update_vm(vm, volumes=[])
    await lab.wait_for(
        vm, lambda s: s and s.get("attached_volumes") == [], since=mark, what="detached"
    )
    await lab.wait_serial(vm, "nubes-guest: disk-removed vdb")
    released = await lab.wait_volume(volume, "available", since=volume_mark)
    assert released.attached_to is None


async def test_a_volume_attached_while_stopped_is_there_at_the_next_start(lab: AgentLab) -> None:
    vm = await lab.create_vm(power_state="stopped")
    volume = await lab.create_volume(size_gb=1)
    await lab.wait_vm(vm, "stopped")
    await lab.wait_volume(volume, "available")
    await lab.update_vm(vm, volumes=[volume])
    await lab.wait_volume(volume, "in-use")
    mark = lab.mark(vm)
    await lab.update_vm(vm, power_state="running", start_counter=1)
    running = await lab.wait_vm(vm, "running", since=mark)
    assert running.attached_volumes == [volume]
    assert running.pid is not None
    assert any(f"serial={volume}" in argument for argument in qemu_cmdline(running.pid))

    # Detached while stopped: the next start goes without it.
    mark = lab.mark(vm)
    await lab.update_vm(vm, power_state="stopped", soft_stop_timeout=0)
    await lab.wait_vm(vm, "stopped", since=mark)
    mark, volume_mark = lab.mark(vm), lab.mark(volume)
    await lab.update_vm(vm, volumes=[])
    await lab.wait_for(vm, lambda s: s and s["attached_volumes"] == [], since=mark)
    await lab.wait_volume(volume, "available", since=volume_mark)
    mark = lab.mark(vm)
    await lab.update_vm(vm, power_state="running", start_counter=2)
    again = await lab.wait_vm(vm, "running", since=mark)
    assert again.pid is not None
    assert not any(f"serial={volume}" in argument for argument in qemu_cmdline(again.pid))


async def test_snapshots_are_taken_reverted_and_deleted_through_the_spec(lab: AgentLab) -> None:
    volume = await lab.create_volume(size_gb=1)
    await lab.wait_volume(volume, "available")
    path = str(lab.agent_state / "volumes" / f"{volume}.qcow2")
    assert _qemu_io(path, "write -P 0xab 0 64k").returncode == 0

    def change(snapshots: list[str], revert: dict[str, object] | None = None):  # type: ignore[no-untyped-def]
        def apply(document: dict[str, object]) -> None:
            spec = document["spec"]
            assert isinstance(spec, dict)
            spec["snapshots"] = snapshots
            spec["revert"] = revert

        return apply

    mark = lab.mark(volume)
    await lab.update(Kind.VOLUME, volume, change(["before"]))
    taken = await lab.wait_for(
        volume, lambda s: s and [x["name"] for x in s["snapshots"]] == ["before"], since=mark
    )
    assert taken["state"] == "available"

    assert _qemu_io(path, "write -P 0xcd 0 64k").returncode == 0
    mark = lab.mark(volume)
    await lab.update(Kind.VOLUME, volume, change(["before"], {"snapshot": "before", "counter": 1}))
    await lab.wait_for(volume, lambda s: s and s["revert_counter"] == 1, since=mark)
    assert _qemu_io(path, "read -P 0xab 0 64k").returncode == 0

    mark = lab.mark(volume)
    await lab.update(Kind.VOLUME, volume, change([]))
    await lab.wait_for(volume, lambda s: s and s["snapshots"] == [], since=mark)

    mark = lab.mark(volume)
    await lab.update(Kind.VOLUME, volume, lambda d: d["spec"].update(size_gb=2))  # type: ignore[union-attr]
    grown = await lab.wait_for(volume, lambda s: s and s["size_gb"] == 2, since=mark)
    assert grown["state"] == "available"

    await lab.delete(Kind.VOLUME, volume)
    await lab.wait_gone(volume)
    assert lab.leftovers() == []


async def test_a_snapshot_of_a_volume_in_a_running_vm_goes_through_qemu(lab: AgentLab) -> None:
    volume = await lab.create_volume(size_gb=1)
    vm = await lab.create_vm(volumes=[volume])
    await lab.wait_vm(vm, "running")
    await lab.wait_volume(volume, "in-use")
    mark = lab.mark(volume)

    def snapshot(document: dict[str, object]) -> None:
        spec = document["spec"]
        assert isinstance(spec, dict)
        spec["snapshots"] = ["live"]

    await lab.update(Kind.VOLUME, volume, snapshot)
    taken = await lab.wait_for(
        volume, lambda s: s and [x["name"] for x in s["snapshots"]] == ["live"], since=mark
    )
    assert taken["state"] == "in-use"

    # A revert waits while the VM runs with the volume; the status says why.
    mark = lab.mark(volume)
    await lab.update(
        Kind.VOLUME, volume, lambda d: d["spec"].update(revert={"snapshot": "live", "counter": 1})
    )
    waiting = await lab.wait_for(
        volume, lambda s: s and "cannot revert" in (s.get("reason") or ""), since=mark
    )
    assert waiting["revert_counter"] == 0

    # Growing and dropping snapshots go through QEMU too, while it runs.
    mark = lab.mark(volume)
    await lab.update(
        Kind.VOLUME,
        volume,
        lambda d: d["spec"].update(size_gb=2, snapshots=[], revert=None),
    )
    grown = await lab.wait_for(
        volume, lambda s: s and s["size_gb"] == 2 and s["snapshots"] == [], since=mark
    )
    assert grown["state"] == "in-use"
    info = await asyncio.to_thread(_qemu_img_info, lab, volume)
    assert info["virtual-size"] == 2 << 30
    assert "snapshots" not in info

    # A volume in use cannot be deleted: the status says why.
    mark = lab.mark(volume)
    await lab.delete(Kind.VOLUME, volume)
    refused = await lab.wait_for(
        volume, lambda s: s and "detach" in (s.get("reason") or ""), since=mark
    )
    assert refused["state"] == "in-use"
    # Deleting the VM, then the volume goes too.
    await lab.delete(Kind.VM, vm)
    await lab.wait_gone(vm)
    await lab.wait_gone(volume)
    assert lab.leftovers() == []
