"""Shutting the tiny guest down: the ACPI power button (QMP `system_powerdown`) and the
`poweroff` and `reboot` commands, each announced on the serial console, disk left clean.

QEMU runs without `-no-reboot` here, so only a real power-off ends it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nubes.process import run_tool
from tests.support.guest_lab import GuestLab, SerialConsole

pytestmark = pytest.mark.integration

BOOT_TIMEOUT = 120
# The agent's soft stop waits about this long before it quits QEMU.
POWER_OFF_TIMEOUT = 30
PROOF_FILE = "/root/written-before-power-off"
PROOF_TEXT = "written before the power button"


def boot_until_ssh_ready(lab: GuestLab, machine: str = "q35", qmp: bool = False) -> SerialConsole:
    seed = lab.make_seed_iso(
        f"instance-id: i-0shutdown01\npublic-keys:\n  - {lab.public_key}\n", None
    )
    lab.start_dnsmasq()
    console = lab.boot(seed_iso=seed, machine=machine, qmp=qmp, exit_on_reboot=False)
    console.wait_for("ssh-ready", BOOT_TIMEOUT)
    return console


def read_guest_file(root_filesystem: Path, path: str) -> str:
    return run_tool(["debugfs", "-R", f"cat {path}", str(root_filesystem)])


def superblock(root_filesystem: Path) -> dict[str, str]:
    """dumpe2fs's superblock fields: `Filesystem state`, `Filesystem features`, ..."""
    output = run_tool(["dumpe2fs", "-h", str(root_filesystem)])
    fields = (line.split(":", 1) for line in output.splitlines() if ":" in line)
    return {name.strip(): value.strip() for name, value in fields}


@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_the_power_button_powers_the_guest_off_with_its_disk_clean(
    lab: GuestLab, machine: str
) -> None:
    console = boot_until_ssh_ready(lab, machine=machine, qmp=True)
    qmp = lab.connect_qmp()
    # Not synced by us: the guest's shutdown must get it onto the disk.
    written = lab.ssh(f"echo '{PROOF_TEXT}' > {PROOF_FILE}")
    assert written.returncode == 0, written.stderr

    deadline = time.monotonic() + POWER_OFF_TIMEOUT
    qmp.execute("system_powerdown")
    assert console.event_arguments("shutdown", POWER_OFF_TIMEOUT) == ["power-button"]
    assert console.wait_for_exit(max(deadline - time.monotonic(), 0.1)) == 0
    shutdowns = [event for event in qmp.events_until_closed(5) if event["event"] == "SHUTDOWN"]
    assert [event["data"] for event in shutdowns] == [{"guest": True, "reason": "guest-shutdown"}]

    root_filesystem = lab.root_filesystem_copy()
    assert read_guest_file(root_filesystem, PROOF_FILE) == PROOF_TEXT + "\n"
    # Remounted read-only before power went: nothing left for a journal replay. (ext4
    # leaves the state "clean" while mounted; needs_recovery is what tells.)
    fields = superblock(root_filesystem)
    assert fields["Filesystem state"] == "clean"
    assert "needs_recovery" not in fields["Filesystem features"].split()


def test_poweroff_in_the_guest_powers_it_off(lab: GuestLab) -> None:
    console = boot_until_ssh_ready(lab)
    # The session may die with the guest: its exit status says nothing.
    lab.ssh("poweroff")
    assert console.event_arguments("shutdown", POWER_OFF_TIMEOUT) == ["poweroff"]
    assert console.wait_for_exit(POWER_OFF_TIMEOUT) == 0


def test_reboot_in_the_guest_boots_it_again(lab: GuestLab) -> None:
    console = boot_until_ssh_ready(lab)
    lab.ssh("reboot")
    shutdown = console.wait_for("shutdown", POWER_OFF_TIMEOUT)
    assert shutdown.text == "nubes-guest: shutdown reboot"
    # The boot script runs once per boot: a second ssh-ready is a second boot.
    console.wait_for("ssh-ready", BOOT_TIMEOUT, after=shutdown)
    login = lab.ssh("true")
    assert login.returncode == 0, login.stderr
