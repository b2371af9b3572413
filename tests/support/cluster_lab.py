"""A throwaway cluster on this one machine: a 3-member etcd on loopback, and hosts that are
each a network namespace with its own underlay address, agent process and directories.

The hosts' underlay namespaces hang on one bridge the lab makes (no address in the
machine's own namespace: nothing leaves the lab). Each agent runs in the machine's
namespace with `underlay_netns` naming its host's namespace, so its VXLAN tunnels (and
migration sockets) live on that host's underlay. Records are written straight into the
store, as AgentLab does; every version of every status is kept for the test to wait on.
On exit everything is undone by PID and by name, even when the test failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

from nubes.agent.compute.cgroup import CgroupError, CpuWeights
from nubes.agent.compute.process import scan_qemu_processes, signal_process, wait_exited
from nubes.agent.network.names import netns_name
from nubes.agent.storage.images import import_image
from nubes.ids import IdKind, new_id
from nubes.model.common import now
from nubes.model.image import ImageRecord
from nubes.model.vm import VmRecord, VmSpec, VmStatus
from nubes.store.etcd import EtcdStore
from nubes.store.keys import Kind, host_alive_key, resource_key, status_key
from nubes.tinyimage.builder import build_tiny_image, default_cache_directory
from tests.support.agent_lab import TEST_FAILED, TINY, list_netns_names
from tests.support.etcd import EtcdCluster, free_port
from tests.support.lab_store import LabTimeout, RecordEdits, StatusHistory
from tests.support.processes import stop_fencer, stop_process

UNDERLAY = ipaddress.IPv4Network("198.18.64.0/24")
UNDERLAY_LINK = "ul0"


@dataclass
class LabHost:
    """One host of the lab: its name in the store, its agent's prefix and files."""

    name: str
    prefix: str
    netns: str  # the host's underlay namespace
    underlay: ipaddress.IPv4Address
    host_link: str  # the underlay veth's end on the lab bridge, in the machine's namespace
    directory: Path
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def state_dir(self) -> Path:
        return self.directory / "agent"

    @property
    def run_dir(self) -> Path:
        return self.directory / "run"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _run(argv: list[str]) -> None:
    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {completed.returncode}: {completed.stderr}")


class ClusterLab(StatusHistory, RecordEdits):
    def __init__(
        self,
        hosts: int = 3,
        *,
        shared_pool: bool = False,
        scheduler: bool = False,
        agent_settings: str = "",
        scheduler_settings: str = "",
        resync_interval: float = 2.0,
        soft_stop_timeout: float = 20.0,
        heartbeat_ttl: int = 4,
    ) -> None:
        """`agent_settings`: more [agent] lines ("{prefix}" becomes each host's prefix)."""
        self.directory = Path(tempfile.mkdtemp(prefix="nb-", dir="/tmp"))
        self.tag = "c" + secrets.token_hex(2)  # 5 characters: host prefixes add a digit
        self.bridge = f"{self.tag}ub"
        self.shared_state = self.directory / "shared-state"  # the image store, by all hosts
        self.shared_pool = self.directory / "shared-pool" if shared_pool else None
        self.etcd = EtcdCluster(self.directory / "etcd")
        self.hosts = [
            LabHost(
                name=f"h{index}",
                prefix=f"{self.tag}{index}",
                netns=f"{self.tag}-h{index}",
                underlay=UNDERLAY.network_address + index,
                host_link=f"{self.tag}u{index}",
                directory=self.directory / f"h{index}",
                config_path=self.directory / f"h{index}" / "nubes.toml",
                log_path=self.directory / f"h{index}" / "agent.log",
            )
            for index in range(1, hosts + 1)
        ]
        self._want_scheduler = scheduler
        self._agent_settings = agent_settings
        self._scheduler_settings = scheduler_settings
        self._resync_interval = resync_interval
        self._soft_stop_timeout = soft_stop_timeout
        self._heartbeat_ttl = heartbeat_ttl
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.scheduler_log = self.directory / "scheduler.log"
        self.store: EtcdStore | None = None
        self.image: ImageRecord | None = None
        super().__init__()
        self._follower: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            await asyncio.to_thread(self.etcd.start)
            self.store = await EtcdStore.connect(self.etcd.endpoints)
            self._follower = asyncio.create_task(self.follow(self.db))
            self._make_underlay()
            for host in self.hosts:
                self._write_config(host)
            if self.shared_pool is not None:
                self.shared_pool.mkdir()
            self.image = await self.register_tiny_image()
            for host in self.hosts:
                self.start_agent(host)
            for host in self.hosts:
                await self.wait_host_alive(host)
            if self._want_scheduler:
                self.start_scheduler()
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
            self.print_logs()
        await self.close()

    def print_logs(self, size: int = 5000) -> None:
        for host in self.hosts:
            sys.stderr.write(f"\n--- agent {host.name} ({host.log_path}) ---\n")
            sys.stderr.write(host.log_text()[-size:] + "\n")
        with contextlib.suppress(OSError):
            tail = self.scheduler_log.read_text(errors="replace")[-size:]
            sys.stderr.write(f"\n--- scheduler ---\n{tail}\n")

    async def close(self) -> None:
        """Undoes everything, each step even when an earlier one failed."""
        try:
            self.stop_scheduler()
            for host in self.hosts:
                self.stop_agent(host)
        finally:
            for host in self.hosts:
                stop_fencer(host.state_dir, host.run_dir)
            try:
                for host in self.hosts:
                    for pid in scan_qemu_processes(host.prefix).values():
                        signal_process(pid, signal.SIGKILL)
                        await wait_exited(pid, 5.0)
                for host in self.hosts:
                    await _remove_cgroups(host.prefix)
                self._remove_network_leftovers()
            finally:
                try:
                    if self._follower is not None:
                        self._follower.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await self._follower
                    if self.store is not None:
                        await self.store.close()
                finally:
                    self.etcd.close()
                    shutil.rmtree(self.directory, ignore_errors=True)

    def _make_underlay(self) -> None:
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "link", "set", self.bridge, "up"])
        for host in self.hosts:
            _run(["ip", "netns", "add", host.netns])
            _run(["ip", "-n", host.netns, "link", "set", "lo", "up"])
            _run(["ip", "link", "add", host.host_link, "type", "veth", "peer", "name",
                  UNDERLAY_LINK, "netns", host.netns])  # fmt: skip
            _run(["ip", "link", "set", host.host_link, "master", self.bridge, "up"])
            _run(["ip", "-n", host.netns, "addr", "add",
                  f"{host.underlay}/{UNDERLAY.prefixlen}", "dev", UNDERLAY_LINK])  # fmt: skip
            _run(["ip", "-n", host.netns, "link", "set", UNDERLAY_LINK, "up"])

    def _remove_network_leftovers(self) -> None:
        prefixes = tuple(f"{host.prefix}-" for host in self.hosts)
        for host in self.hosts:
            for pid in _dnsmasq_pids(host.run_dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for name in list_netns_names():
            if name.startswith(prefixes) or name in {h.netns for h in self.hosts}:
                subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        for name in os.listdir("/sys/class/net"):
            if name.startswith(self.tag):
                subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)

    def _write_config(self, host: LabHost) -> None:
        # Each agent's /metrics on a port of its own (not 8687): agents run side by side.
        host.directory.mkdir(parents=True)
        pools = (
            f'storage_pools = {{ shared = "{self.shared_pool}" }}\n'
            if self.shared_pool is not None
            else ""
        )
        host.config_path.write_text(
            f'state_dir = "{self.shared_state}"\n'
            "[store]\n"
            'engine = "etcd"\n'
            f"endpoints = {self.etcd.endpoints!r}\n".replace("'", '"')
            + "[agent]\n"
            f'host = "{host.name}"\n'
            f'state_dir = "{host.state_dir}"\n'
            f'run_dir = "{host.run_dir}"\n'
            f'prefix = "{host.prefix}"\n'
            'accel = "tcg"\n'
            f"soft_stop_timeout = {self._soft_stop_timeout}\n"
            f"resync_interval = {self._resync_interval}\n"
            f"heartbeat_ttl = {self._heartbeat_ttl}\n"
            f'underlay_address = "{host.underlay}"\n'
            f'underlay_netns = "{host.netns}"\n'
            f"metrics_port = {free_port()}\n"
            + pools
            + self._agent_settings.replace("{prefix}", host.prefix)
            + "[scheduler]\n"
            "resync_interval = 2\n" + self._scheduler_settings
        )

    # -- processes -------------------------------------------------------------------------

    def host(self, name: str) -> LabHost:
        return next(host for host in self.hosts if host.name == name)

    def environment(self, host: LabHost | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NUBES_")}
        env["NUBES_CONFIG"] = str((host or self.hosts[0]).config_path)
        return env

    def start_agent(self, host: LabHost) -> None:
        assert host.process is None or host.process.poll() is not None
        with host.log_path.open("ab") as log:
            host.process = subprocess.Popen(
                [str(Path(sys.executable).parent / "nubes"), "agent", "--log-level", "debug"],
                env=self.environment(host),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop_agent(self, host: LabHost, sig: int = signal.SIGTERM) -> None:
        """Stops the host's agent (SIGKILL: as if the host died; its QEMUs stay)."""
        process = host.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def cut(self, host: LabHost) -> None:
        """The host's underlay link goes down: nothing reaches it or leaves it any more."""
        _run(["ip", "-n", host.netns, "link", "set", UNDERLAY_LINK, "down"])

    def mend(self, host: LabHost) -> None:
        _run(["ip", "-n", host.netns, "link", "set", UNDERLAY_LINK, "up"])

    def start_scheduler(self) -> None:
        assert self.scheduler is None or self.scheduler.poll() is not None
        with self.scheduler_log.open("ab") as log:
            self.scheduler = subprocess.Popen(
                [str(Path(sys.executable).parent / "nubes"), "scheduler", "--log-level", "debug"],
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop_scheduler(self) -> None:
        if self.scheduler is not None:
            stop_process(self.scheduler)
            self.scheduler = None

    async def wait_host_alive(self, host: LabHost, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while await self.db.get(host_alive_key(host.name)) is None:
            if host.process is not None and host.process.poll() is not None:
                raise AssertionError(f"agent {host.name} exited: {host.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise LabTimeout(f"agent {host.name} did not register its host")
            await asyncio.sleep(0.05)

    # -- records ---------------------------------------------------------------------------

    @property
    def db(self) -> EtcdStore:
        assert self.store is not None
        return self.store

    async def register_tiny_image(self) -> ImageRecord:
        build = await asyncio.to_thread(build_tiny_image, default_cache_directory())
        manifest, directory = build.manifest, build.directory
        return await import_image(
            self.db,
            self.shared_state / "images",
            str(directory / manifest.disk.path),
            name="nubes-tiny",
            kernel=str(directory / manifest.kernel.path),
            initrd=str(directory / manifest.initrd.path),
            cmdline=manifest.cmdline,
        )

    async def create_vm(self, host: str | None = None, **spec: Any) -> str:
        """A VM of the tiny image, bound to `host` (None: left for the scheduler)."""
        vm_id = new_id(IdKind.VM)
        assert self.image is not None
        fields: dict[str, Any] = {
            "name": vm_id,
            "host": host,
            "flavor": TINY,
            "image": self.image.id,
        }
        fields.update(spec)
        record = VmRecord(id=vm_id, spec=VmSpec(**fields), created_at=now())
        await self.db.put(resource_key(Kind.VM, vm_id), record.to_json())
        return vm_id

    async def vm_record(self, vm_id: str) -> VmRecord:
        kv = await self.db.get(resource_key(Kind.VM, vm_id))
        assert kv is not None, f"VM {vm_id} has no record"
        return VmRecord.from_json(kv.value)

    # -- following status ------------------------------------------------------------------

    async def wait_vm(
        self,
        vm_id: str,
        state: str,
        *,
        host: str | None = None,
        timeout: float = 60.0,
        since: int = 0,
    ) -> VmStatus:
        """The first status of the VM in `state` (on `host`, when given)."""
        document = await self.wait_for(
            vm_id,
            lambda v: (
                isinstance(v, dict)
                and v.get("state") == state
                and (host is None or v.get("host") == host)
            ),
            timeout=timeout,
            since=since,
            what=f"state={state}" + (f" host={host}" if host else ""),
        )
        return VmStatus.from_json(document)

    async def current_status(self, kind: Kind, name: str) -> Any:
        kv = await self.db.get(status_key(kind, name))
        return None if kv is None else kv.value

    # -- looking at the hosts --------------------------------------------------------------

    def vpc_netns(self, vpc_id: str, host: LabHost | str) -> str:
        """The namespace of VPC `vpc_id` on `host`."""
        lab_host = self.host(host) if isinstance(host, str) else host
        return netns_name(lab_host.prefix, vpc_id)

    def qemu_pids(self, host: LabHost | str) -> dict[str, int]:
        lab_host = self.host(host) if isinstance(host, str) else host
        return scan_qemu_processes(lab_host.prefix)

    def serial_log(self, host: LabHost | str, vm_id: str) -> str:
        lab_host = self.host(host) if isinstance(host, str) else host
        with contextlib.suppress(FileNotFoundError):
            return (lab_host.state_dir / "vms" / vm_id / "serial.log").read_text(errors="replace")
        return ""

    async def wait_serial(
        self, host: LabHost | str, vm_id: str, text: str, *, timeout: float = 90.0
    ) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.serial_log(host, vm_id):
            if time.monotonic() > deadline:
                tail = self.serial_log(host, vm_id)[-800:]
                raise LabTimeout(f"{vm_id}: serial never said {text!r}; got {tail!r}")
            await asyncio.sleep(0.1)

    def leftovers(self) -> list[str]:
        """Every QEMU, namespace or link of this lab's agents still on the machine."""
        found: list[str] = []
        for host in self.hosts:
            found += [f"process {vm} ({pid})" for vm, pid in self.qemu_pids(host).items()]
            found += [f"dnsmasq {pid}" for pid in _dnsmasq_pids(host.run_dir)]
            found += [
                f"namespace {n}" for n in list_netns_names() if n.startswith(f"{host.prefix}-")
            ]
            found += [
                f"link {n}" for n in os.listdir("/sys/class/net") if n.startswith(host.prefix)
            ]
        return found


def _dnsmasq_pids(run_dir: Path) -> list[int]:
    pids = []
    for pidfile in run_dir.glob("vpcs/*/*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"dnsmasq" in cmdline and str(run_dir).encode() in cmdline:
                pids.append(pid)
    return pids


async def _remove_cgroups(prefix: str, timeout: float = 10.0) -> None:
    """Removes a prefix's cgroups; a killed QEMU holds its group until init reaps it."""
    cgroups = CpuWeights(prefix)
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


@contextlib.asynccontextmanager
async def cluster_for_test(
    request: pytest.FixtureRequest, **settings: Any
) -> AsyncIterator[ClusterLab]:
    """A ClusterLab for one test; the agents' logs are printed if the test failed."""
    if os.geteuid() != 0:
        pytest.fail("cluster tests need root (namespaces, QEMU, etcd)")
    async with ClusterLab(**settings) as lab:
        yield lab
        if request.node.stash.get(TEST_FAILED, False):
            lab.print_logs(8000)
