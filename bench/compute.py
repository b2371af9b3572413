"""Host agent benchmark: the agent against bare QEMU with the same command line, in one run.

    .venv/bin/python -m bench.compute [--runs 7] [--vms 20] [--batch-rounds 3]
                                      [--memory-mb 96] [--json]

(a) one VM, from its record written to status `running`, against a bare
    `qemu-system-x86_64 -daemonize` answering QMP `query-status` (trials alternate);
(b) `--vms` VMs written at once until all are `running`, against as many bare QEMUs
    launched at once, each followed by its `query-status`;
(c) the agent SIGKILLed and started again with `--vms` VMs running: from the new
    process's start to its "agent ... up" line (written once every VM is adopted),
    with no status leaving `running`, no pid changed and no restart;
(d) the agent's memory per VM (Pss with `--vms` VMs minus Pss with none) and the
    processes other than QEMU that run for VMs (there must be none).

Needs root (QEMU processes, cgroups), like the agent tests. The agent runs in an
AgentLab (its own store, directories and process prefix) at the production resync
interval; the bare QEMUs run under another prefix in their own /tmp directory. Both
are ended, and their files removed, however the run ends. Exits 1 when a target is
missed, after printing every figure. VMs have 96 MiB by default: the tiny image does
not boot in 64 (its kernel resets in a loop) and QEMU's start does not depend on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from nubes.agent.compute.cgroup import find_cpu_hierarchy
from nubes.agent.compute.process import (
    find_vm_process,
    read_cmdline,
    read_pidfile,
    scan_qemu_processes,
    signal_process,
    wait_exited,
)
from nubes.agent.compute.qemu_cmdline import (
    Accelerator,
    DiskFormat,
    DiskPlan,
    KernelBoot,
    NicPlan,
    QemuPlan,
    RuntimePaths,
    build_qemu_argv,
    vm_uuid,
)
from nubes.agent.runtime import LaunchRecord
from nubes.config import AgentConfig
from nubes.ids import IdKind, new_id
from nubes.model.common import now
from nubes.model.vm import Flavor, VmRecord, VmSpec
from nubes.process import run_tool
from nubes.store.keys import ROOT, Kind, resource_key
from nubes.tinyimage.builder import BuildResult, build_tiny_image, default_cache_directory
from tests.support.agent_lab import HOST, AgentLab

RESYNC_INTERVAL = AgentConfig.model_fields["resync_interval"].default  # production's, not the lab's
START_TIMEOUT = 60.0
BATCH_TIMEOUT = 180.0
SETTLE_TIMEOUT = 240.0
TARGETS = {
    "single_ratio": 1.5,
    "batch_ratio": 1.3,
    "restart_seconds": 1.0,
    "memory_mib_per_vm": 1.0,
}
# The agent's log lines start with logging's asctime: local time, milliseconds.
_LOG_LINE = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3}) ", re.MULTILINE)
_ABSOLUTE_PATH = re.compile(r"/(?:[^,/\s=]+/)+[^,/\s=]+")


class BenchFailed(RuntimeError):
    """Something went wrong that makes a figure meaningless (not a missed target)."""


# -- pure helpers --------------------------------------------------------------------------


def command_line_shape(argv: Sequence[str], *, vm_id: str, prefix: str) -> list[str]:
    """`argv` with what differs between two VMs of one flavor and image (id, uuid, prefix,
    file paths) replaced by placeholders."""
    shape = []
    for argument in argv:
        argument = argument.replace(vm_uuid(vm_id), "<uuid>").replace(vm_id, "<vm>")
        argument = argument.replace(f":{prefix}:", ":<prefix>:")
        shape.append(_ABSOLUTE_PATH.sub("<path>", argument))
    return shape


def log_times(text: str) -> list[tuple[float, str]]:
    """(epoch seconds, line) of every line of an agent log that starts with a timestamp."""
    found = []
    for line in text.splitlines():
        match = _LOG_LINE.match(line)
        if match is not None:
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            found.append((stamp, line[match.end() :]))
    return found


def proc_memory_kib(pid: int) -> dict[str, int]:
    """Pss and private memory (smaps_rollup) and VmRSS (status) of a process, in KiB."""
    figures = {"private": 0}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name == "Pss":
            figures["pss"] = int(rest.split()[0])
        elif name in ("Private_Clean", "Private_Dirty"):
            figures["private"] += int(rest.split()[0])
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            figures["rss"] = int(line.split()[1])
    return figures


def descendants(root: int) -> list[int]:
    """Every live process below `root` in the process tree."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return sorted(found)


# -- following statuses precisely ------------------------------------------------------------


class StatusClock:
    """Every VM status write of the lab's store, stamped with time.monotonic() as it arrives.

    AgentLab's own follower keeps the values but not when they came; this watch runs
    beside it in the same process, which does nothing else while a figure is taken.
    """

    def __init__(self, lab: AgentLab) -> None:
        self.lab = lab
        self.arrivals: dict[str, list[tuple[float, Any]]] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> StatusClock:
        self._task = asyncio.create_task(self._follow())
        return self

    async def __aexit__(self, *exception: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _follow(self) -> None:
        async with self.lab.db.watch(f"{ROOT}{Kind.VM.value}/") as watch:
            async for event in watch:
                moment = time.monotonic()
                parts = event.key[len(ROOT) :].split("/")
                if len(parts) == 3 and parts[2] == "status":
                    value = None if event.type.value == "delete" else event.value
                    self.arrivals.setdefault(parts[1], []).append((moment, value))
                    # Every waiter holds the old event: setting it wakes them all.
                    self._changed.set()
                    self._changed = asyncio.Event()

    def mark(self, vm_id: str) -> int:
        return len(self.arrivals.get(vm_id, []))

    async def arrival(
        self, vm_id: str, state: str, *, timeout: float = START_TIMEOUT
    ) -> tuple[float, dict[str, Any]]:
        """When the first status of `vm_id` in `state` arrived."""
        deadline = time.monotonic() + timeout
        while True:
            for moment, value in self.arrivals.get(vm_id, []):
                if isinstance(value, dict) and value.get("state") == state:
                    return moment, value
                if isinstance(value, dict) and value.get("state") == "error":
                    raise BenchFailed(f"{vm_id} went to error: {value.get('reason')}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchFailed(f"{vm_id} not {state} within {timeout} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


async def put_vms(lab: AgentLab, count: int, flavor: Flavor) -> tuple[list[str], float]:
    """Writes `count` VM records one after the other; their ids and the moment just before."""
    assert lab.image is not None
    records = []
    for _ in range(count):
        vm_id = new_id(IdKind.VM)
        spec = VmSpec(name=vm_id, host=HOST, flavor=flavor, image=lab.image.id)
        records.append((vm_id, VmRecord(id=vm_id, spec=spec, created_at=now()).to_json()))
    started = time.monotonic()
    for vm_id, document in records:
        await lab.db.put(resource_key(Kind.VM, vm_id), document)
    return [vm_id for vm_id, _ in records], started


async def delete_vms(lab: AgentLab, vm_ids: Sequence[str]) -> None:
    """Deletes VMs through their records and waits until their QEMUs are gone."""
    pids = lab.qemu_pids()
    for vm_id in vm_ids:
        await lab.delete(Kind.VM, vm_id)
    for vm_id in vm_ids:
        await lab.wait_gone(vm_id, timeout=60)
        if vm_id in pids and not await wait_exited(pids[vm_id], 10):
            raise BenchFailed(f"the QEMU of deleted VM {vm_id} still runs")


# -- bare QEMU: the floor --------------------------------------------------------------------


class RawQmp:
    """QMP over a plain unix socket, no library: the least a client can do."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: Path) -> RawQmp:
        reader, writer = await asyncio.open_unix_connection(str(path))
        session = cls(reader, writer)
        await reader.readline()  # the greeting
        await session.execute("qmp_capabilities")
        return session

    async def execute(self, command: str) -> Any:
        self.writer.write(json.dumps({"execute": command}).encode() + b"\r\n")
        await self.writer.drain()
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError(f"QMP closed during {command}")
            message = json.loads(line)
            if "return" in message:
                return message["return"]
            if "error" in message:
                raise BenchFailed(f"QMP {command}: {message['error']}")

    async def quit(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.execute("quit")
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


@dataclass
class BareVm:
    vm_id: str
    directory: Path
    argv: list[str]
    pidfile: Path
    qmp_socket: Path
    pid: int | None = None
    qmp: RawQmp | None = None
    serial_log: Path | None = None


@dataclass
class BareQemus:
    """QEMUs started by hand with the command line the agent builds, under their own prefix."""

    image: BuildResult
    flavor: Flavor
    directory: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="nbb-", dir="/tmp"))
    )
    prefix: str = field(default_factory=lambda: "b" + secrets.token_hex(2))
    made: list[BareVm] = field(default_factory=list)

    def prepare(self, nics: tuple[NicPlan, ...] = (), netns: str | None = None) -> BareVm:
        """A VM's directory and root overlay (outside any timing, as the agent's image cache);
        with `nics`, on taps that already exist in `netns`."""
        vm_id = new_id(IdKind.VM)
        home = self.directory / f"{len(self.made)}"
        home.mkdir()
        root = home / "root.qcow2"
        disk = self.image.directory / self.image.manifest.disk.path
        run_tool(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(disk), "-F", "qcow2", str(root)]
        )
        manifest = self.image.manifest
        defaults = AgentConfig.model_fields
        paths = RuntimePaths(
            qmp_socket=home / "qmp.sock",
            serial_socket=home / "serial.sock",
            serial_log=home / "serial.log",
            pidfile=home / "qemu.pid",
            guest_agent_socket=home / "qga.sock",
        )
        plan = QemuPlan(
            vm_id=vm_id,
            prefix=self.prefix,
            accel=Accelerator.TCG,
            machine=defaults["machine"].default,
            vcpus=self.flavor.vcpus,
            memory_mb=self.flavor.memory_mb,
            paths=paths,
            disks=(DiskPlan(node="root", path=root, format=DiskFormat.QCOW2, serial="root"),),
            kernel_boot=KernelBoot(
                kernel=self.image.directory / manifest.kernel.path,
                initrd=self.image.directory / manifest.initrd.path,
                cmdline=manifest.cmdline,
            ),
            nics=nics,
            hotplug_slots=defaults["hotplug_slots"].default,
            qemu=defaults["qemu"].default,
        )
        argv = build_qemu_argv(plan)
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        vm = BareVm(vm_id, home, argv, paths.pidfile, paths.qmp_socket, serial_log=paths.serial_log)
        self.made.append(vm)
        return vm

    async def start(self, vm: BareVm) -> float:
        """Launches the VM's QEMU; the moment its `query-status` answered `running`."""
        process = await asyncio.create_subprocess_exec(
            *vm.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _, stderr = await process.communicate()
        if process.returncode != 0:
            raise BenchFailed(f"bare QEMU did not start: {stderr.decode(errors='replace')}")
        vm.pid = read_pidfile(vm.pidfile)
        vm.qmp = await RawQmp.connect(vm.qmp_socket)
        status = await vm.qmp.execute("query-status")
        answered = time.monotonic()
        if status.get("status") != "running":
            raise BenchFailed(f"bare QEMU says {status}")
        return answered

    async def stop(self, vm: BareVm) -> None:
        """Quits the QEMU, waits until it is gone, and removes its files."""
        if vm.qmp is not None:
            await vm.qmp.quit()
        if vm.pid is not None and not await wait_exited(vm.pid, 10):
            signal_process(vm.pid, signal.SIGKILL)
            await wait_exited(vm.pid, 5)
        shutil.rmtree(vm.directory, ignore_errors=True)

    async def close(self) -> None:
        """Kills whatever is left, by pidfile and by marker, and removes the directory."""
        pids = set(scan_qemu_processes(self.prefix).values())
        for vm in self.made:
            pid = find_vm_process(vm.pidfile, self.prefix, vm.vm_id)
            if pid is not None:
                pids.add(pid)
        for pid in pids:
            signal_process(pid, signal.SIGKILL)
        for pid in pids:
            await wait_exited(pid, 5)
        shutil.rmtree(self.directory, ignore_errors=True)


# -- the four measurements -------------------------------------------------------------------


@dataclass
class Trial:
    seconds: float
    cpu: float  # CPU seconds of the starting process: the agent, or this one for bare QEMU
    tools_cpu: float  # of the children it waited for: QEMU's foreground, qemu-img, prlimit


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds of a process and of the children it has reaped (utime+stime, cutime+cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks, (int(fields[13]) + int(fields[14])) / ticks


async def nubes_start(lab: AgentLab, clock: StatusClock, flavor: Flavor, count: int) -> Trial:
    """Writes `count` VM records; the time until all are running. Deletes them after."""
    assert lab.agent is not None
    own, children = cpu_seconds(lab.agent.pid)
    vm_ids, started = await put_vms(lab, count, flavor)
    arrivals = await asyncio.gather(
        *(clock.arrival(vm_id, "running", timeout=BATCH_TIMEOUT) for vm_id in vm_ids)
    )
    finished = max(moment for moment, _ in arrivals)
    after_own, after_children = cpu_seconds(lab.agent.pid)
    await delete_vms(lab, vm_ids)
    return Trial(finished - started, after_own - own, after_children - children)


async def bare_start(bare: BareQemus, count: int) -> Trial:
    """Launches `count` bare QEMUs at once; the time until all answered. Quits them after."""
    vms = [bare.prepare() for _ in range(count)]
    own, children = cpu_seconds(os.getpid())
    started = time.monotonic()
    finished = max(await asyncio.gather(*(bare.start(vm) for vm in vms)))
    after_own, after_children = cpu_seconds(os.getpid())
    await asyncio.gather(*(bare.stop(vm) for vm in vms))
    return Trial(finished - started, after_own - own, after_children - children)


async def alternate(
    lab: AgentLab, clock: StatusClock, bare: BareQemus, count: int, rounds: int, label: str
) -> dict[str, list[dict[str, float]]]:
    """Rounds of both sides, the first side swapping each round, so that drift in the
    machine weighs on both alike; nothing of one side runs while the other is timed."""
    ours: list[Trial] = []
    theirs: list[Trial] = []
    for index in range(rounds):
        if index % 2 == 0:
            ours.append(await nubes_start(lab, clock, bare.flavor, count))
            theirs.append(await bare_start(bare, count))
        else:
            theirs.append(await bare_start(bare, count))
            ours.append(await nubes_start(lab, clock, bare.flavor, count))
        print(
            f"{label} round {index + 1}: nubes {ours[-1].seconds:.3f} s, "
            f"bare {theirs[-1].seconds:.3f} s",
            file=sys.stderr,
        )
    return {"nubes": [vars(t) for t in ours], "bare": [vars(t) for t in theirs]}


def vm_helper_processes(lab: AgentLab) -> list[str]:
    """Processes other than the VMs' QEMUs that run for the lab's VMs: the agent's
    descendants, processes naming the lab's prefix or directory, strangers in VM cgroups."""
    assert lab.agent is not None
    qemus = set(lab.qemu_pids().values())
    found = dict.fromkeys(descendants(lab.agent.pid), "child of the agent")
    needles = (f":{lab.prefix}:", str(lab.directory))
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in qemus | {lab.agent.pid, os.getpid()}:
            continue
        argv = read_cmdline(int(entry.name)) or []
        if any(needle in argument for needle in needles for argument in argv):
            found[int(entry.name)] = "names the lab"
    hierarchy = find_cpu_hierarchy(Path("/proc/self/mountinfo").read_text())
    group = None if hierarchy is None else hierarchy.mount / f"nubes-{lab.prefix}"
    if group is not None and group.is_dir():
        for procs in group.glob("*/cgroup.procs"):
            for line in procs.read_text().split():
                if int(line) not in qemus:
                    found[int(line)] = f"in cgroup {procs.parent.name}"
    return [
        f"{pid} {' '.join(read_cmdline(pid) or ['?'])[:100]} ({why})"
        for pid, why in sorted(found.items())
    ]


async def restart_agent(lab: AgentLab, clock: StatusClock, vm_ids: Sequence[str]) -> dict[str, Any]:
    """(c) SIGKILL, start again, and read from the new agent's log when it was up: seconds
    from the new process's start to its "up" line, to its first line (interpreter and
    imports) and to its first adoption (QMP connection); and whether the VMs stayed intact."""
    pids = lab.qemu_pids()
    marks = {vm_id: clock.mark(vm_id) for vm_id in vm_ids}
    lab.stop_agent(signal.SIGKILL)
    offset = lab.agent_log.stat().st_size
    started = time.time()
    lab.start_agent()
    deadline = time.monotonic() + 60
    while True:
        lines = log_times(lab.agent_log.read_bytes()[offset:].decode(errors="replace"))
        up = [stamp for stamp, text in lines if f"agent {HOST} up" in text]
        if up:
            break
        if time.monotonic() > deadline or (lab.agent is not None and lab.agent.poll() is not None):
            raise BenchFailed(
                f"the restarted agent did not come up: {lab.agent_log_text()[-2000:]}"
            )
        await asyncio.sleep(0.05)
    connects = [stamp for stamp, text in lines if "Connecting with existing socket" in text]
    await asyncio.sleep(0.5)  # a status write after "up" would show now
    left = [
        vm_id
        for vm_id in vm_ids
        for _, status in clock.arrivals.get(vm_id, [])[marks[vm_id] :]
        if not isinstance(status, dict) or status.get("state") != "running"
    ]
    restarts = 0
    for vm_id in vm_ids:
        status = await lab.current_status(Kind.VM, vm_id)
        if isinstance(status, dict) and status.get("state") == "running":
            restarts += status.get("restarts", 0)
        else:
            left.append(vm_id)
    return {
        "seconds": up[0] - started,
        "first_line": lines[0][0] - started,
        "first_adoption": (connects[0] if connects else up[0]) - started,
        "adopted": sum("adopted QEMU" in text for _, text in lines),
        "left_running": sorted(set(left)),
        "pids_changed": lab.qemu_pids() != pids,
        "restarts": restarts,
    }


# -- the run -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    models = [
        line.partition(":")[2].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    ]
    qemu = run_tool(["qemu-system-x86_64", "--version"]).splitlines()[0]
    return {
        "cpus": os.cpu_count(),
        "cpu_model": models[0] if models else "?",
        "qemu": qemu.removeprefix("QEMU emulator version "),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


def host_busy(seconds: float = 1.0) -> float:
    """The share of all CPUs' time spent busy over the next `seconds` (from /proc/stat);
    unlike the load average it does not remember the last minute."""

    def sample() -> tuple[int, int]:
        fields = [int(field) for field in Path("/proc/stat").read_text().split()[1:11]]
        return sum(fields), fields[3] + fields[4]  # idle and iowait

    total, idle = sample()
    time.sleep(seconds)
    later_total, later_idle = sample()
    return 1 - (later_idle - idle) / max(1, later_total - total)


async def agent_memory(lab: AgentLab) -> dict[str, int]:
    """The agent's memory once it has been idle a moment."""
    await asyncio.sleep(1.0)
    assert lab.agent is not None
    return proc_memory_kib(lab.agent.pid)


async def measure(options: argparse.Namespace) -> dict[str, Any]:
    image = build_tiny_image(default_cache_directory())
    results: dict[str, Any] = {"machine": machine(), "busy_before": host_busy()}
    flavor = Flavor(name="bench", vcpus=1, memory_mb=options.memory_mb, disk_gb=0)
    results["flavor"] = flavor.model_dump()
    bare = BareQemus(image, flavor)
    try:
        async with AgentLab(resync_interval=RESYNC_INTERVAL) as lab, StatusClock(lab) as clock:
            print(
                f"lab {lab.directory} (prefix {lab.prefix}), bare {bare.directory} "
                f"(prefix {bare.prefix})",
                file=sys.stderr,
            )
            # Warm-up, not counted: the image cache, the page cache, lazy imports.
            await nubes_start(lab, clock, flavor, 1)
            await bare_start(bare, 1)
            results["single"] = await alternate(lab, clock, bare, 1, options.runs, "(a)")
            results["same_argv"] = await same_command_line(lab, clock, bare)
            memory = {"created_0": await agent_memory(lab)}
            results["batch"] = await alternate(
                lab, clock, bare, options.vms, options.batch_rounds, "(b)"
            )

            vm_ids, _ = await put_vms(lab, options.vms, flavor)
            for vm_id in vm_ids:
                await clock.arrival(vm_id, "running", timeout=BATCH_TIMEOUT)
            # Until every guest has booted, so that (c) and (d) see a steady host.
            settled = time.monotonic()
            await asyncio.gather(
                *(lab.wait_serial(vm, "ssh-ready", timeout=SETTLE_TIMEOUT) for vm in vm_ids)
            )
            results["settle_seconds"] = time.monotonic() - settled
            memory[f"created_{options.vms}"] = await agent_memory(lab)
            results["helpers"] = vm_helper_processes(lab)

            restarts = []
            for index in range(options.runs):
                restarts.append(await restart_agent(lab, clock, vm_ids))
                print(
                    f"(c) restart {index + 1}: up after {restarts[-1]['seconds']:.3f} s",
                    file=sys.stderr,
                )
            results["restarts"] = restarts
            memory[f"adopted_{options.vms}"] = await agent_memory(lab)

            await delete_vms(lab, vm_ids)
            await restart_agent(lab, clock, [])
            memory["fresh_0"] = await agent_memory(lab)
            results["memory_kib"] = memory
    finally:
        await bare.close()
    return results


async def same_command_line(lab: AgentLab, clock: StatusClock, bare: BareQemus) -> bool:
    """Whether the agent's launch.json and the bare argv differ only in ids and directories."""
    (vm_id,), _ = await put_vms(lab, 1, bare.flavor)
    await clock.arrival(vm_id, "running")
    launch = LaunchRecord.load(lab.agent_state / "vms" / vm_id / "launch.json")
    await delete_vms(lab, [vm_id])
    vm = bare.prepare()
    shutil.rmtree(vm.directory, ignore_errors=True)
    if launch is None:
        raise BenchFailed(f"{vm_id} has no launch record")
    ours = command_line_shape(launch.argv, vm_id=vm_id, prefix=lab.prefix)
    theirs = command_line_shape(vm.argv, vm_id=vm.vm_id, prefix=bare.prefix)
    if ours != theirs:
        print(f"command lines differ:\n  nubes {ours}\n  bare  {theirs}", file=sys.stderr)
    return ours == theirs


def ratios(pair: dict[str, list[dict[str, float]]]) -> list[float]:
    """nubes / bare, round by round."""
    return [
        ours["seconds"] / theirs["seconds"]
        for ours, theirs in zip(pair["nubes"], pair["bare"], strict=True)
    ]


def memory_per_vm(results: dict[str, Any], count: int, kind: str) -> dict[str, float]:
    """KiB per VM: the agent that created the VMs against itself before, and a restarted
    agent that adopted them against a fresh one with none."""
    memory = results["memory_kib"]
    return {
        "created": (memory[f"created_{count}"][kind] - memory["created_0"][kind]) / count,
        "adopted": (memory[f"adopted_{count}"][kind] - memory["fresh_0"][kind]) / count,
    }


def verdicts(results: dict[str, Any], count: int) -> list[tuple[str, str, bool]]:
    """(what, figure against target, met) for each target."""
    single_ratio = statistics.median(ratios(results["single"]))
    batch_ratio = statistics.median(ratios(results["batch"]))
    restarts = results["restarts"]
    restart_seconds = statistics.median(r["seconds"] for r in restarts)
    intact = all(
        r["adopted"] == count
        and not r["left_running"]
        and not r["pids_changed"]
        and r["restarts"] == 0
        for r in restarts
    )
    per_vm = max(memory_per_vm(results, count, "pss").values()) / 1024
    helpers = len(results["helpers"])
    return [
        (
            "(a) one VM, record to running",
            f"median ratio to bare {single_ratio:.2f}, target <= {TARGETS['single_ratio']}",
            single_ratio <= TARGETS["single_ratio"],
        ),
        (
            f"(b) {count} VMs at once",
            f"median ratio to bare {batch_ratio:.2f}, target <= {TARGETS['batch_ratio']}",
            batch_ratio <= TARGETS["batch_ratio"],
        ),
        (
            f"(c) agent restart with {count} VMs",
            f"all adopted after {restart_seconds:.2f} s (median, max "
            f"{max(r['seconds'] for r in restarts):.2f}), target <= "
            f"{TARGETS['restart_seconds']} s; no status left running, no pid changed, "
            f"no restart: {intact}",
            restart_seconds <= TARGETS["restart_seconds"] and intact,
        ),
        (
            "(d) agent memory per VM",
            f"{per_vm:.3f} MiB Pss (worse of created and adopted), target <= "
            f"{TARGETS['memory_mib_per_vm']} MiB; other processes for VMs {helpers}, target 0",
            per_vm <= TARGETS["memory_mib_per_vm"] and helpers == 0,
        ),
    ]


def report(results: dict[str, Any], count: int) -> None:
    info, flavor = results["machine"], results["flavor"]
    print(
        f"host agent vs bare QEMU with the same command line: q35, TCG, {flavor['vcpus']} vCPU, "
        f"{flavor['memory_mb']} MiB, kernel boot of the tiny image on a qcow2 overlay"
    )
    print(
        f"machine: {info['cpus']} CPUs ({info['cpu_model']}), QEMU {info['qemu']}, "
        f"Linux {info['kernel']}, Python {info['python']}, {info['date']}; CPUs "
        f"{results['busy_before']:.0%} busy before the run"
    )
    print(f"agent's launch.json and bare argv alike but for ids and paths: {results['same_argv']}")
    single, batch, restarts = results["single"], results["batch"], results["restarts"]

    def column(trials: list[dict[str, Any]], name: str = "seconds") -> list[float]:
        return [trial[name] for trial in trials]

    rows: list[tuple[str, list[float], str]] = [
        ("(a) nubes: record written -> running (s)", column(single["nubes"]), ""),
        ("(a) bare: spawn -> query-status answered (s)", column(single["bare"]), ""),
        ("(a) ratio nubes / bare, per pair", ratios(single), f"<= {TARGETS['single_ratio']}"),
        (f"(b) nubes: {count} records -> all running (s)", column(batch["nubes"]), ""),
        (f"(b) bare: {count} spawns -> all answered (s)", column(batch["bare"]), ""),
        ("(b) ratio nubes / bare, per round", ratios(batch), f"<= {TARGETS['batch_ratio']}"),
        (
            "(c) agent start -> 'up', all adopted (s)",
            column(restarts),
            f"<= {TARGETS['restart_seconds']}",
        ),
        ("(c) agent start -> first log line (s)", column(restarts, "first_line"), ""),
        ("(c) agent start -> first adoption (s)", column(restarts, "first_adoption"), ""),
    ]
    print("| figure | median | min | max | target |")
    print("|---|---:|---:|---:|---|")
    for label, values, target in rows:
        median = statistics.median(values)
        print(f"| {label} | {median:.3f} | {min(values):.3f} | {max(values):.3f} | {target} |")
    for name, pair in (("(a)", single), ("(b)", batch)):
        ours = statistics.median(t["cpu"] + t["tools_cpu"] for t in pair["nubes"])
        tools = statistics.median(t["tools_cpu"] for t in pair["nubes"])
        theirs = statistics.median(t["cpu"] + t["tools_cpu"] for t in pair["bare"])
        print(
            f"{name} CPU seconds of the starter and the children it waited for, median: "
            f"nubes agent {ours:.2f} (of which tools {tools:.2f}), bench for bare {theirs:.2f}"
        )
    print("| agent memory (KiB) | Pss | private | RSS |")
    print("|---|---:|---:|---:|")
    for name, figures in results["memory_kib"].items():
        print(
            f"| {name.replace('_', ', ')} VMs | {figures['pss']:,} | {figures['private']:,} "
            f"| {figures['rss']:,} |"
        )
    per_vm = {kind: memory_per_vm(results, count, kind) for kind in ("pss", "private", "rss")}
    print(
        "(d) agent memory per VM, created / adopted: "
        + ", ".join(
            f"{kind} {f['created']:.0f} / {f['adopted']:.0f} KiB" for kind, f in per_vm.items()
        )
    )
    print(f"(d) processes other than QEMU for VMs: {len(results['helpers'])}")
    for line in results["helpers"]:
        print(f"    {line}")
    print(f"guests all ssh-ready {results['settle_seconds']:.1f} s after all running")
    for what, figure, met in verdicts(results, count):
        print(f"{what}: {figure}: {'met' if met else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.compute", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="trials of (a), restarts of (c)")
    parser.add_argument("--vms", type=int, default=20)
    parser.add_argument(
        "--memory-mb",
        type=int,
        default=96,
        help="VM memory; the tiny image does not boot in less than 80 (64 resets in a loop)",
    )
    parser.add_argument("--batch-rounds", type=int, default=3, help="rounds of (b)")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (QEMU processes, cgroups)")
    try:
        results = asyncio.run(_main(options))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench.compute: interrupted; its VMs, QEMUs and files are gone", file=sys.stderr)
        return 130
    except BenchFailed as error:
        print(f"bench.compute: {error}", file=sys.stderr)
        return 2
    if options.json:
        print(json.dumps(results, indent=2))
    else:
        report(results, options.vms)
    return 0 if all(met for _, _, met in verdicts(results, options.vms)) else 1


async def _main(options: argparse.Namespace) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM ends the run like Ctrl-C does: through every cleanup on the way out.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await measure(options)


if __name__ == "__main__":
    sys.exit(main())
