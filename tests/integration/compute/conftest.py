"""Fixtures for the compute tests: the tiny image, a short runtime directory, and VMs that
are built with `build_qemu_argv`, started with `launch_qemu` under TCG, and killed by pid
when the test ends, however it ends.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nubes.agent.compute.cgroup import find_cpu_hierarchy
from nubes.agent.compute.process import (
    ProcessState,
    launch_qemu,
    process_state,
    read_pidfile,
    scan_qemu_processes,
    signal_process,
)
from nubes.agent.compute.qemu_cmdline import (
    Accelerator,
    DiskFormat,
    DiskPlan,
    KernelBoot,
    QemuPlan,
    RuntimePaths,
    build_qemu_argv,
)
from nubes.agent.compute.qmp import QmpEvent, QmpSession
from nubes.process import run_tool
from nubes.tinyimage.builder import BuildResult, build_tiny_image, default_cache_directory

BOOT_TIMEOUT = 60.0
SERIAL_PREFIX = "nubes-guest: "


@pytest.fixture(scope="session")
def image() -> BuildResult:
    """The tiny image from the usual cache (built there first if it is not)."""
    return build_tiny_image(default_cache_directory())


@pytest.fixture(scope="session")
def prefix() -> str:
    """An agent prefix of this test run only, so scans of /proc see only our VMs."""
    return "c" + secrets.token_hex(2)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Short, so the unix socket paths in it stay under the 108 bytes a sockaddr holds."""
    directory = Path(tempfile.mkdtemp(prefix="nb-", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def make_qcow2(path: Path, *, size: str = "64M", backing: Path | None = None) -> Path:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-b", str(backing), "-F", "qcow2"]
    run_tool([*argv, str(path), *([size] if backing is None else [])])
    return path


@dataclass
class EventLog:
    """What a QMP session reported, in order: events by name, and 'closed' when it ended."""

    entries: list[str] = field(default_factory=list)
    events: list[QmpEvent] = field(default_factory=list)

    def on_event(self, event: QmpEvent) -> None:
        self.entries.append(event.name)
        self.events.append(event)

    def on_close(self) -> None:
        self.entries.append("closed")

    def named(self, name: str) -> list[QmpEvent]:
        return [event for event in self.events if event.name == name]


@dataclass
class TinyVm:
    """One tiny-image VM: its plan, and once launched, its QEMU's pid."""

    plan: QemuPlan
    directory: Path
    pid: int | None = None

    @property
    def argv(self) -> list[str]:
        return build_qemu_argv(self.plan)

    @property
    def paths(self) -> RuntimePaths:
        return self.plan.paths

    @property
    def root_disk(self) -> DiskPlan:
        return self.plan.disks[0]

    async def launch(self) -> int:
        self.pid = await launch_qemu(self.argv, pidfile=self.paths.pidfile)
        return self.pid

    async def connect(self, events: EventLog | None = None) -> QmpSession:
        return await QmpSession.connect(
            self.paths.qmp_socket,
            name=self.plan.vm_id,
            on_event=None if events is None else events.on_event,
            on_close=None if events is None else events.on_close,
        )

    def console(self) -> str:
        try:
            return self.paths.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def wait_for_console(self, pattern: str, timeout: float = BOOT_TIMEOUT) -> str:
        """The first serial line that matches the regular expression `pattern`."""
        deadline = time.monotonic() + timeout
        wanted = re.compile(pattern)
        while True:
            lines = self.console().splitlines()
            for line in lines:
                if wanted.search(line):
                    return line
                if line.startswith(SERIAL_PREFIX + "boot-failed"):
                    pytest.fail(f"the guest failed to boot: {line}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"no serial line matching {pattern!r} within {timeout} s; console:\n"
                    + "\n".join(lines[-30:])
                )
            await asyncio.sleep(0.05)

    async def wait_booted(self) -> None:
        """Until the guest's boot script has finished (after it, the power button works)."""
        await self.wait_for_console(f"^{SERIAL_PREFIX}ssh-ready")

    def kill(self) -> None:
        """SIGKILL by pid (the launched one, else the one the pidfile names), until exited."""
        pid = self.pid if self.pid is not None else read_pidfile(self.paths.pidfile)
        if pid is None:
            return
        signal_process(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while process_state(pid) is ProcessState.RUNNING and time.monotonic() < deadline:
            time.sleep(0.02)


MakeVm = Callable[..., TinyVm]


@pytest.fixture
def make_vm(image: BuildResult, workdir: Path, prefix: str) -> Iterator[MakeVm]:
    """Plans tiny VMs on qcow2 overlays of the image's disk; kills them all at the end."""
    made: list[TinyVm] = []

    def make(
        vm_id: str = "i-0123456789",
        *,
        machine: str = "q35",
        directory: Path | None = None,
        extra_disks: tuple[DiskPlan, ...] = (),
    ) -> TinyVm:
        home = directory if directory is not None else workdir / vm_id
        home.mkdir(parents=True, exist_ok=True)
        root = make_qcow2(home / "root.qcow2", backing=image.directory / image.manifest.disk.path)
        manifest = image.manifest
        plan = QemuPlan(
            vm_id=vm_id,
            prefix=prefix,
            accel=Accelerator.TCG,
            machine=machine,
            vcpus=1,
            memory_mb=256,
            paths=RuntimePaths(
                qmp_socket=home / "qmp.sock",
                serial_socket=home / "serial.sock",
                serial_log=home / "serial.log",
                pidfile=home / "qemu.pid",
                guest_agent_socket=home / "qga.sock",
            ),
            disks=(
                DiskPlan(node="root", path=root, format=DiskFormat.QCOW2, serial="root"),
                *extra_disks,
            ),
            kernel_boot=KernelBoot(
                kernel=image.directory / manifest.kernel.path,
                initrd=image.directory / manifest.initrd.path,
                # Without `quiet` the kernel's own lines show on the console too.
                cmdline=" ".join(word for word in manifest.cmdline.split() if word != "quiet"),
            ),
            hotplug_slots=2,
        )
        vm = TinyVm(plan, home)
        made.append(vm)
        return vm

    try:
        yield make
    finally:
        for vm in made:
            vm.kill()
        # Whatever else carries our marker (a launch that failed half-way) goes too.
        for pid in scan_qemu_processes(prefix).values():
            signal_process(pid, signal.SIGKILL)


@pytest.fixture
def cgroup_cleanup(prefix: str) -> Iterator[None]:
    """Removes this run's `nubes-<prefix>` groups, which CpuWeights itself leaves in place."""
    yield
    hierarchy = find_cpu_hierarchy(Path("/proc/self/mountinfo").read_text())
    group = None if hierarchy is None else hierarchy.mount / f"nubes-{prefix}"
    if group is not None and group.is_dir():
        for child in group.iterdir():
            if child.is_dir():
                os.rmdir(child)
        os.rmdir(group)
