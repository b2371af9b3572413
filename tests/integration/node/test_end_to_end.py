"""The whole cloud as a person uses it, through the CLI only, on a fresh `nubes up`: a key
pair, a security group, a VM with a floating IP and user-data reached over SSH from an
outside namespace, its lifecycle and a volume; `nubes down`/`up` in the middle adopts
the running VM; in the end nothing is left on the host."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Interface
from typing import Any, TypeVar

import pytest

from nubes.agent.compute.process import ProcessState, process_state, scan_qemu_processes
from tests.integration.node.conftest import NodeLab

T = TypeVar("T")
# A tiny guest under TCG on a busy 2-core machine: boot to SSH, or a reboot.
BOOT_TIMEOUT = 150.0
SSH_OPTIONS = (
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "BatchMode=yes",
    "-o", "ConnectTimeout=5",
    "-o", "LogLevel=ERROR",
)  # fmt: skip
USER_DATA = "#!/bin/sh\necho made-by-user-data > /root/user-data-ran\n"


def run(argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)


def cli(lab: NodeLab, *arguments: str) -> Any:
    """Runs `nubes ... -o json` and returns what it printed; fails the test on an error."""
    completed = lab.nubes(*arguments, "-o", "json")
    assert completed.returncode == 0, f"nubes {' '.join(arguments)}:\n{completed.stderr}"
    return json.loads(completed.stdout) if completed.stdout.strip() else None


def eventually(check: Callable[[], T | None], *, timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(1.0)


class Outside:
    """A machine on the external bridge: a namespace with a veth into the bridge and an
    address of the external network (the highest, far from what the API hands out)."""

    def __init__(self, lab: NodeLab, key: str) -> None:
        self.netns = f"{lab.prefix}-outside"
        self.key = key
        network = lab.external_cidr
        self.address = IPv4Interface(f"{network.broadcast_address - 1}/{network.prefixlen}")
        veth = f"{lab.prefix}ov"
        steps = [
            ["ip", "netns", "add", self.netns],
            ["ip", "link", "add", veth, "type", "veth", "peer", "name", "out0",
             "netns", self.netns],
            ["ip", "link", "set", veth, "master", lab.bridge, "up"],
            ["ip", "-n", self.netns, "link", "set", "lo", "up"],
            ["ip", "-n", self.netns, "addr", "add", str(self.address), "dev", "out0"],
            ["ip", "-n", self.netns, "link", "set", "out0", "up"],
        ]  # fmt: skip
        for argv in steps:
            completed = run(argv)
            assert completed.returncode == 0, f"{argv}: {completed.stderr}"

    def ssh(self, address: str, command: str) -> subprocess.CompletedProcess[str]:
        return run(
            ["ip", "netns", "exec", self.netns, "ssh", *SSH_OPTIONS, "-i", self.key,
             f"root@{address}", command],
            timeout=60,
        )  # fmt: skip

    def ssh_output(self, address: str, command: str) -> str | None:
        completed = self.ssh(address, command)
        return completed.stdout.strip() if completed.returncode == 0 else None

    def ping(self, address: str) -> bool:
        completed = run(
            ["ip", "netns", "exec", self.netns, "ping", "-n", "-c", "1", "-W", "2", address]
        )
        return completed.returncode == 0

    def close(self) -> None:
        run(["ip", "netns", "del", self.netns])  # takes the veth pair with it


@contextmanager
def outside_of(lab: NodeLab, key: str) -> Iterator[Outside]:
    outside = None
    try:
        outside = Outside(lab, key)
        yield outside
    finally:
        if outside is not None:
            outside.close()
        else:
            run(["ip", "netns", "del", f"{lab.prefix}-outside"])


def vm_state(lab: NodeLab, name: str) -> dict[str, Any]:
    shown: dict[str, Any] = cli(lab, "vm", "show", name)
    return shown


def guest_disks(outside: Outside, address: str) -> list[str] | None:
    listed = outside.ssh_output(address, "ls /sys/block")
    return None if listed is None else sorted(d for d in listed.split() if d.startswith("vd"))


@pytest.mark.timeout(1200)
def test_a_person_runs_a_vm_through_the_cli_and_leaves_nothing_behind(node_lab: NodeLab) -> None:
    lab = node_lab
    lab.up()
    key = lab.directory / "id_ed25519"
    made = run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
    assert made.returncode == 0, made.stderr
    user_data = lab.directory / "user-data.sh"
    user_data.write_text(USER_DATA)

    cli(lab, "keypair", "create", "mine", "--public-key-file", f"{key}.pub")
    cli(lab, "security-group", "create", "e2e")
    cli(lab, "security-group", "rule", "add", "e2e", "--protocol", "tcp", "--port", "22")
    cli(lab, "security-group", "rule", "add", "e2e", "--protocol", "icmp")
    vm = cli(
        lab, "vm", "create", "web1", "--image", "tiny", "--flavor", "tiny",
        "--network", "default", "--key", "mine", "--security-group", "e2e",
        "--user-data", str(user_data), "--floating-ip", "public", "--wait",
    )  # fmt: skip
    floating = vm["floating_ip"]
    address = floating.get("address") or floating["spec"]["address"]
    assert address in {str(a) for a in lab.external_cidr.hosts()}

    with outside_of(lab, str(key)) as outside:
        ran = eventually(
            lambda: outside.ssh_output(address, "cat /root/user-data-ran"),
            timeout=BOOT_TIMEOUT,
            what=f"SSH to {address} from outside",
        )
        assert ran == "made-by-user-data"
        assert eventually(lambda: outside.ping(address), timeout=30, what="ping")

        # stop, resize (taken at the next start), start
        cli(lab, "vm", "stop", "web1")
        cli(lab, "vm", "wait", "web1", "--state", "stopped")
        assert outside.ssh_output(address, "true") is None
        cli(lab, "vm", "resize", "web1", "--flavor", "small")
        cli(lab, "vm", "start", "web1")
        cli(lab, "vm", "wait", "web1", "--state", "running")
        memory = eventually(
            lambda: outside.ssh_output(address, "awk '/MemTotal/ {print $2}' /proc/meminfo"),
            timeout=BOOT_TIMEOUT,
            what="SSH after start",
        )
        assert int(memory) > 300_000  # kB: the small flavor's 512 MiB, not tiny's 96

        # reboot: the guest comes back with another boot id
        boot_id = outside.ssh_output(address, "cat /proc/sys/kernel/random/boot_id")
        assert boot_id
        cli(lab, "vm", "reboot", "web1")
        eventually(
            lambda: (
                (seen := outside.ssh_output(address, "cat /proc/sys/kernel/random/boot_id"))
                and seen != boot_id
            ),
            timeout=BOOT_TIMEOUT,
            what="the guest to come back from its reboot",
        )

        # a volume: attach (hotplug), see it, detach, snapshot
        disks = guest_disks(outside, address)
        assert disks == ["vda"]
        cli(lab, "volume", "create", "data", "--size", "1", "--wait")
        cli(lab, "vm", "attach-volume", "web1", "data")
        cli(lab, "volume", "wait", "data", "--state", "in-use")
        eventually(
            lambda: guest_disks(outside, address) == ["vda", "vdb"],
            timeout=60,
            what="the guest to see the volume",
        )
        cli(lab, "vm", "detach-volume", "web1", "data")
        cli(lab, "volume", "wait", "data", "--state", "available")
        eventually(
            lambda: guest_disks(outside, address) == ["vda"],
            timeout=60,
            what="the volume to leave the guest",
        )
        cli(lab, "volume", "snapshot", "create", "data", "before")
        eventually(
            lambda: (
                "before"
                in [s["name"] for s in (vm_volume_status(lab, "data").get("snapshots") or [])]
            ),
            timeout=60,
            what="the snapshot",
        )

        # nubes down keeps the VM running; the next nubes up adopts it
        pids = scan_qemu_processes(lab.prefix)
        assert len(pids) == 1
        (qemu_pid,) = pids.values()
        stopped = lab.nubes("down")
        assert stopped.returncode == 0, stopped.stderr
        assert process_state(qemu_pid) is ProcessState.RUNNING
        assert outside.ssh_output(address, "cat /root/user-data-ran") == "made-by-user-data"
        lab.up()
        shown = vm_state(lab, "web1")
        assert shown["status"]["state"] == "running"
        assert shown["status"]["pid"] == qemu_pid

        # delete everything
        cli(lab, "vm", "delete", "web1", "--wait")
        cli(lab, "volume", "delete", "data")
        eventually(lambda: cli(lab, "volume", "list") == [], timeout=60, what="volume gone")
        for fip in cli(lab, "floating-ip", "list"):
            cli(lab, "floating-ip", "delete", fip["id"])
        cli(lab, "security-group", "delete", "e2e")
        cli(lab, "keypair", "delete", "mine")
        assert cli(lab, "vm", "list") == []
        assert cli(lab, "floating-ip", "list") == []

    def host_is_clean() -> bool:
        return (
            not scan_qemu_processes(lab.prefix)
            and not lab.dnsmasq_pids()
            and not lab.namespaces()
            and lab.links() == [lab.bridge]  # no veth, no tap: only `nubes up`'s bridge
        )

    eventually(host_is_clean, timeout=60, what="the host to be clean")
    assert list((lab.run_dir / "vms").glob("*")) == []


def vm_volume_status(lab: NodeLab, name: str) -> dict[str, Any]:
    shown = cli(lab, "volume", "show", name)
    status: dict[str, Any] = shown.get("status") or {}
    return status
