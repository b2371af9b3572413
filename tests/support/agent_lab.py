"""A throwaway host for agent tests and benchmarks: a real `nubes agent` process on its own
SQLite store, directories and process prefix, booting the tiny image under TCG.

The lab talks to the agent only through the store, as the API will: it writes VM and
volume records and follows the status the agent writes (every version of it, so a
status that lasts a few milliseconds is still seen). On exit it stops the agent, ends
every QEMU carrying the lab's prefix (found by pid through the marker), and removes its
directories and cgroups, even when the test failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

from nubes.agent.compute.cgroup import CgroupError, CpuWeights
from nubes.agent.compute.process import scan_qemu_processes, signal_process, wait_exited
from nubes.agent.storage.images import import_image
from nubes.ids import IdKind, new_id
from nubes.model.common import now
from nubes.model.image import ImageRecord
from nubes.model.vm import Flavor, VmRecord, VmSpec, VmStatus
from nubes.model.volume import VolumeRecord, VolumeSpec, VolumeStatus
from nubes.store.keys import Kind, resource_key, status_key
from nubes.store.sqlite import SqliteStore
from nubes.tinyimage.builder import build_tiny_image, default_cache_directory
from tests.support.etcd import free_port
from tests.support.lab_store import LabTimeout, RecordEdits, StatusHistory
from tests.support.processes import stop_fencer

HOST = "lab-host"
# Set on a test's node by tests/integration/conftest.py when the test failed.
TEST_FAILED = pytest.StashKey[bool]()


def list_netns_names() -> list[str]:
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


TINY = Flavor(name="tiny", vcpus=1, memory_mb=96, disk_gb=0)


def qemu_cmdline(pid: int) -> list[str]:
    """The argv of a running process, as /proc shows it."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


class AgentLab(StatusHistory, RecordEdits):
    def __init__(
        self,
        *,
        soft_stop_timeout: float = 30.0,
        resync_interval: float = 2.0,
        agent_settings: str = "",
    ) -> None:
        """`agent_settings`: more [agent] lines; "{prefix}" in them becomes the lab's prefix."""
        self.directory = Path(tempfile.mkdtemp(prefix="nb-", dir="/tmp"))
        self.prefix = "t" + secrets.token_hex(2)
        self.state_dir = self.directory / "state"
        self.agent_state = self.state_dir / "agent"
        self.run_dir = self.directory / "run"
        self.config_path = self.directory / "nubes.toml"
        # Labs run side by side: each agent's /metrics gets its own port, not 8687.
        self.metrics_port = free_port()
        self.config_path.write_text(
            f'state_dir = "{self.state_dir}"\n'
            "[store]\n"
            f'path = "{self.directory / "nubes.db"}"\n'
            "[agent]\n"
            f'host = "{HOST}"\n'
            f'run_dir = "{self.run_dir}"\n'
            f'prefix = "{self.prefix}"\n'
            'accel = "tcg"\n'
            f"soft_stop_timeout = {soft_stop_timeout}\n"
            f"resync_interval = {resync_interval}\n"
            "heartbeat_ttl = 4\n"
            f"metrics_port = {self.metrics_port}\n"
            + agent_settings.replace("{prefix}", self.prefix)
        )
        self.agent_log = self.directory / "agent.log"
        self.agent: subprocess.Popen[bytes] | None = None
        self.store: SqliteStore | None = None
        super().__init__()
        self._follower: asyncio.Task[None] | None = None
        self.image: ImageRecord | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            self.store = await SqliteStore.open(self.directory / "nubes.db")
            self._follower = asyncio.create_task(self.follow(self.db))
            self.image = await self.register_tiny_image()
            self.start_agent()
            await self.wait_host_alive()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is not None:
            sys.stderr.write(
                f"--- agent log ({self.agent_log}) ---\n{self.agent_log_text()[-6000:]}\n"
            )
        await self.close()

    async def close(self) -> None:
        """Undoes everything, each step even when an earlier one failed."""
        try:
            self.stop_agent()
        finally:
            stop_fencer(self.agent_state, self.run_dir)
            try:
                for pid in scan_qemu_processes(self.prefix).values():
                    signal_process(pid, signal.SIGKILL)
                    await wait_exited(pid, 5.0)
                await self.remove_cgroups()
                self.remove_network_leftovers()
            finally:
                try:
                    if self._follower is not None:
                        self._follower.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await self._follower
                    if self.store is not None:
                        await self.store.close()
                finally:
                    shutil.rmtree(self.directory, ignore_errors=True)

    def lab_namespaces(self) -> list[str]:
        return [n for n in list_netns_names() if n.startswith(f"{self.prefix}-")]

    def lab_links(self) -> list[str]:
        """Links in this (the host's) namespace named with the lab's prefix."""
        return [n for n in os.listdir("/sys/class/net") if n.startswith(self.prefix)]

    def dnsmasq_pids(self) -> list[int]:
        pids = []
        for pidfile in self.run_dir.glob("vpcs/*/*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().split()[0])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"dnsmasq" in cmdline and str(self.run_dir).encode() in cmdline:
                    pids.append(pid)
        return pids

    def remove_network_leftovers(self) -> None:
        """What a failed test's agent may have left: dnsmasq, namespaces, host links."""
        for pid in self.dnsmasq_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for name in self.lab_namespaces():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        for name in self.lab_links():
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)

    async def remove_cgroups(self, timeout: float = 10.0) -> None:
        """Removes the lab's cgroups; a killed QEMU holds its group until init reaps it."""
        cgroups = CpuWeights(self.prefix)
        deadline = time.monotonic() + timeout
        while True:
            left = []
            for vm_id in cgroups.orphans(set()):
                try:
                    cgroups.remove(vm_id)
                except CgroupError:
                    left.append(vm_id)
            if not left or time.monotonic() > deadline:
                cgroups.remove_root()
                return
            await asyncio.sleep(0.2)

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NUBES_")}
        env["NUBES_CONFIG"] = str(self.config_path)
        return env

    def start_agent(self) -> None:
        assert self.agent is None or self.agent.poll() is not None
        with self.agent_log.open("ab") as log:
            self.agent = subprocess.Popen(
                [str(Path(sys.executable).parent / "nubes"), "agent", "--log-level", "debug"],
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop_agent(self, sig: int = signal.SIGTERM) -> None:
        if self.agent is None or self.agent.poll() is not None:
            return
        self.agent.send_signal(sig)
        try:
            self.agent.wait(15)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            self.agent.wait(5)

    def agent_log_text(self) -> str:
        try:
            return self.agent_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def nubes(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        """Runs the nubes CLI against the lab's configuration."""
        return subprocess.run(
            [str(Path(sys.executable).parent / "nubes"), *arguments],
            env=self.environment(),
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    # -- records ---------------------------------------------------------------------------

    @property
    def db(self) -> SqliteStore:
        assert self.store is not None
        return self.store

    async def register_tiny_image(self, extra_cmdline: str = "") -> ImageRecord:
        build = build_tiny_image(default_cache_directory())
        manifest = build.manifest
        directory = build.directory
        return await import_image(
            self.db,
            self.state_dir / "images",
            str(directory / manifest.disk.path),
            name="nubes-tiny-poweroff" if extra_cmdline else "nubes-tiny",
            kernel=str(directory / manifest.kernel.path),
            initrd=str(directory / manifest.initrd.path),
            cmdline=f"{manifest.cmdline} {extra_cmdline}".strip(),
        )

    async def create_vm(self, **spec: Any) -> str:
        vm_id = new_id(IdKind.VM)
        assert self.image is not None
        fields: dict[str, Any] = {
            "name": vm_id,
            "host": HOST,
            "flavor": TINY,
            "image": self.image.id,
        }
        fields.update(spec)
        record = VmRecord(id=vm_id, spec=VmSpec(**fields), created_at=now())
        await self.db.put(resource_key(Kind.VM, vm_id), record.to_json())
        return vm_id

    async def create_volume(self, size_gb: int = 1, **spec: Any) -> str:
        volume_id = new_id(IdKind.VOLUME)
        fields: dict[str, Any] = {"name": volume_id, "size_gb": size_gb, "host": HOST}
        fields.update(spec)
        record = VolumeRecord(id=volume_id, spec=VolumeSpec(**fields), created_at=now())
        await self.db.put(resource_key(Kind.VOLUME, volume_id), record.to_json())
        return volume_id

    async def wait_vm(
        self, vm_id: str, state: str, *, timeout: float = 30.0, since: int = 0
    ) -> VmStatus:
        return VmStatus.from_json(await self.wait_state(vm_id, state, timeout=timeout, since=since))

    async def wait_volume(
        self, volume_id: str, state: str, *, timeout: float = 30.0, since: int = 0
    ) -> VolumeStatus:
        document = await self.wait_state(volume_id, state, timeout=timeout, since=since)
        return VolumeStatus.from_json(document)

    async def wait_gone(self, name: str, *, timeout: float = 30.0) -> None:
        await self.wait_for(
            name, lambda v: v == "record-deleted", timeout=timeout, what="record deleted"
        )

    async def wait_host_alive(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while await self.db.get(f"{resource_key(Kind.HOST, HOST)}/alive") is None:
            if self.agent is not None and self.agent.poll() is not None:
                raise AssertionError(f"the agent exited: {self.agent_log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise LabTimeout("the agent did not register its host")
            await asyncio.sleep(0.05)

    async def current_status(self, kind: Kind, name: str) -> Any:
        kv = await self.db.get(status_key(kind, name))
        return None if kv is None else kv.value

    # -- looking at the host ---------------------------------------------------------------

    def qemu_pids(self) -> dict[str, int]:
        return scan_qemu_processes(self.prefix)

    def serial_log(self, vm_id: str) -> str:
        try:
            return (self.agent_state / "vms" / vm_id / "serial.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def wait_serial(self, vm_id: str, text: str, *, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.serial_log(vm_id):
            if time.monotonic() > deadline:
                raise LabTimeout(
                    f"{vm_id}: serial never said {text!r}; got {self.serial_log(vm_id)[-800:]!r}"
                )
            await asyncio.sleep(0.1)

    def leftovers(self) -> list[str]:
        """Every VM or volume file, run file or process of this lab still on the host."""
        found = [f"process {vm} ({pid})" for vm, pid in self.qemu_pids().items()]
        for directory in (
            self.agent_state / "vms",
            self.agent_state / "volumes",
            self.run_dir / "vms",
        ):
            if directory.exists():
                found += [str(path) for path in directory.iterdir()]
        found += [f"cgroup {vm}" for vm in CpuWeights(self.prefix).orphans(set())]
        found += [f"namespace {name}" for name in self.lab_namespaces()]
        found += [f"link {name}" for name in self.lab_links()]
        found += [f"dnsmasq {pid}" for pid in self.dnsmasq_pids()]
        if (self.run_dir / "vpcs").exists():
            found += [str(path) for path in (self.run_dir / "vpcs").iterdir()]
        return found


@contextlib.asynccontextmanager
async def lab_for_test(
    request: pytest.FixtureRequest, needs: str, **settings: Any
) -> AsyncIterator[AgentLab]:
    """An AgentLab for one test; the end of the agent's log is printed if the test failed."""
    if os.geteuid() != 0:
        pytest.fail(f"these tests need root ({needs})")
    async with AgentLab(**settings) as lab:
        yield lab
        if request.node.stash.get(TEST_FAILED, False):
            tail = lab.agent_log_text()[-8000:]
            sys.stderr.write(f"\n--- end of the agent log ({lab.agent_log}) ---\n{tail}\n")
