"""The tiny guest as the host agent's compute tests see it: booted with no NIC, it says
when it runs, gives up on metadata at once, and reports volumes hotplugged over QMP
(`blockdev-add` + `device_add`) and released on `device_del`.

q35 plugs volumes into a PCIe root port (QEMU 7.2 drives its hotplug through ACPI by
default), pc into its root bus (PIIX4 ACPI hotplug).
"""

from __future__ import annotations

from typing import Any

import pytest

from nubes.process import run_tool
from tests.support.guest_lab import GuestLab, QmpConnection, SerialConsole

pytestmark = pytest.mark.integration

BOOT_TIMEOUT = 120
# Without a NIC the guest must not wait for a metadata service (it used to wait 30 s).
NO_NETWORK_VERDICT_SECONDS = 3.0
HOTPLUG_TIMEOUT = 60
POWER_OFF_TIMEOUT = 30
HOTPLUG_PORTS = ("hotplug0", "hotplug1")


def hotplug_ports(machine: str) -> list[str]:
    """QEMU arguments for empty slots that take hotplugged disks: root ports on q35."""
    if machine != "q35":
        return []
    arguments = []
    for chassis, port in enumerate(HOTPLUG_PORTS, start=1):
        arguments += ["-device", f"pcie-root-port,id={port},chassis={chassis}"]
    return arguments


def boot_without_nic(lab: GuestLab, machine: str = "q35") -> tuple[SerialConsole, QmpConnection]:
    console = lab.boot(machine=machine, qmp=True, nic=False, extra_qemu_args=hotplug_ports(machine))
    console.wait_for("booted", BOOT_TIMEOUT)
    return console, lab.connect_qmp()


def plug_volume(
    lab: GuestLab, qmp: QmpConnection, machine: str, name: str, *, serial: str | None, port: str
) -> None:
    """A fresh 16 MiB qcow2 volume as node NAME, plugged as virtio-blk device disk-NAME."""
    volume = lab.workdir / f"{name}.qcow2"
    run_tool(["qemu-img", "create", "-q", "-f", "qcow2", str(volume), "16M"])
    qmp.execute(
        "blockdev-add",
        {"driver": "qcow2", "node-name": name, "file": {"driver": "file", "filename": str(volume)}},
    )
    device: dict[str, Any] = {"driver": "virtio-blk-pci", "drive": name, "id": f"disk-{name}"}
    if serial is not None:
        device["serial"] = serial
    if machine == "q35":
        device["bus"] = port
    qmp.execute("device_add", device)


def test_a_guest_without_a_nic_says_booted_and_gives_up_on_metadata_at_once(
    lab: GuestLab,
) -> None:
    console = lab.boot(qmp=False, nic=False)
    booted = console.wait_for("booted", BOOT_TIMEOUT)
    (uptime,) = booted.text.split()[2:]
    assert 0 < float(uptime) < booted.seconds
    failed = console.wait_for("metadata-failed", NO_NETWORK_VERDICT_SECONDS, after=booted)
    assert failed.text == "nubes-guest: metadata-failed no-network"
    assert failed.seconds - booted.seconds < NO_NETWORK_VERDICT_SECONDS
    # The rest of the boot goes on as with a network: the SSH server starts.
    console.wait_for("ssh-ready", BOOT_TIMEOUT, after=failed)


@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_a_hotplugged_volume_is_announced_and_released_on_device_del(
    lab: GuestLab, machine: str
) -> None:
    console, qmp = boot_without_nic(lab, machine)

    plug_volume(lab, qmp, machine, "vol1", serial="vol-test", port="hotplug0")
    added = console.wait_for("disk-added", HOTPLUG_TIMEOUT)
    assert added.text == "nubes-guest: disk-added vdb vol-test"

    qmp.execute("device_del", {"id": "disk-vol1"})
    # QEMU only deletes the device once the guest has let go of it (pciehp or ACPI eject).
    qmp.wait_for_event("DEVICE_DELETED", HOTPLUG_TIMEOUT, device="disk-vol1")
    removed = console.wait_for("disk-removed", HOTPLUG_TIMEOUT, after=added)
    assert removed.text == "nubes-guest: disk-removed vdb"
    # Released for good: its node can go, as the agent's detach does after the device.
    qmp.execute("blockdev-del", {"node-name": "vol1"})


def test_a_volume_without_a_serial_is_announced_with_a_dash(lab: GuestLab) -> None:
    console, qmp = boot_without_nic(lab)
    plug_volume(lab, qmp, "q35", "vol1", serial="vol-one", port="hotplug0")
    first = console.wait_for("disk-added", HOTPLUG_TIMEOUT)
    plug_volume(lab, qmp, "q35", "vol2", serial=None, port="hotplug1")
    second = console.wait_for("disk-added", HOTPLUG_TIMEOUT, after=first)
    assert [first.text, second.text] == [
        "nubes-guest: disk-added vdb vol-one",
        "nubes-guest: disk-added vdc -",
    ]


def test_the_power_button_works_as_soon_as_the_guest_says_booted(lab: GuestLab) -> None:
    console, qmp = boot_without_nic(lab)
    qmp.execute("system_powerdown")
    assert console.event_arguments("shutdown", POWER_OFF_TIMEOUT) == ["power-button"]
    assert console.wait_for_exit(POWER_OFF_TIMEOUT) == 0
