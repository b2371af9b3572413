"""The host's fencer: a small process that outlives the agent and SIGKILLs this host's QEMUs
the cluster has given to another host, or will restart elsewhere once the store is lost.

The agent starts it (its own session, a pidfile in the run dir) and a SIGKILL of the agent
leaves it running. It lives while an agent or a QEMU of this host's prefix does. While the
agent is stopped cleanly it also keeps the host's `stopped` key alive: a host that dies then
still loses that key and has its VMs evacuated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from nubes.agent.compute.process import (
    ProcessState,
    marker_of,
    process_state,
    read_cmdline,
    read_pidfile,
    scan_qemu_processes,
)
from nubes.agent.paths import AgentPaths
from nubes.agent.runtime import LaunchRecord
from nubes.config import NubesConfig
from nubes.errors import InvalidInput, StoreError
from nubes.model.vm import VmRecord
from nubes.store.base import Store
from nubes.store.keys import Kind, host_stopped_key, resource_key

log = logging.getLogger(__name__)

FENCE_INTERVAL = 1.0
FENCE_MODULE = "nubes.agent.fence"


@dataclass(frozen=True)
class Fencing:
    """One QEMU to end, and why (for the log)."""

    vm_id: str
    pid: int
    reason: str


def involves_host_in_migration(record: VmRecord, host: str) -> bool:
    """A move to or from `host` is under way: its agents own both QEMUs until the switch."""
    request = record.spec.migration
    return request is not None and host in (request.source, request.target)


# The agent renews its lease every third of the TTL, so a host cut off from the store
# loses its lease at the earliest two thirds of a TTL later: fencing after half of one
# ends its QEMUs before any other host may be told to start them.
SILENCE_SHARE = 0.5


def choose_fencing(
    host: str,
    running: Mapping[str, int],
    records: Mapping[str, VmRecord | None] | None,
    *,
    last_known: Mapping[str, VmRecord],
    restartable: Collection[str],
    store_silent_seconds: float,
    heartbeat_ttl: float,
) -> list[Fencing]:
    """Which of this host's QEMUs (`running`: vm id -> pid) to kill.

    `records` is what the store said this tick (None: it could not be read; a VM absent
    from it or None has no readable record and is left to the agent). With the store
    read, a QEMU of a VM bound to another host is killed, unless a move involving this
    host is under way. With the store silent for longer than half the heartbeat TTL, the
    cluster is about to take this host for dead: a QEMU whose disks are all on shared pools
    (`restartable`) and whose VM was last seen `ha` (or never seen) is killed, since
    another host restarts it.
    """
    chosen = []
    for vm_id, pid in sorted(running.items()):
        if records is not None:
            record = records.get(vm_id)
            if record is None or record.spec.host in (None, host):
                continue
            if involves_host_in_migration(record, host):
                continue
            chosen.append(Fencing(vm_id, pid, f"the VM is bound to host {record.spec.host}"))
        elif store_silent_seconds > heartbeat_ttl * SILENCE_SHARE and vm_id in restartable:
            seen = last_known.get(vm_id)
            if seen is not None and (not seen.spec.ha or involves_host_in_migration(seen, host)):
                continue
            chosen.append(
                Fencing(
                    vm_id,
                    pid,
                    f"the store has been unreachable for {store_silent_seconds:.0f} s "
                    f"(half the heartbeat TTL is {heartbeat_ttl * SILENCE_SHARE:g} s): the cluster "
                    "restarts it elsewhere",
                )
            )
    return chosen


def all_disks_on_shared_pools(launch: LaunchRecord | None, pools: Iterable[Path]) -> bool:
    """Whether every disk the QEMU was launched with lies under a shared pool directory."""
    roots = [pool.resolve() for pool in pools]
    if launch is None or not launch.disks or not roots:
        return False
    return all(
        any(Path(disk.path).resolve().is_relative_to(root) for root in roots)
        for disk in launch.disks
    )


# -- who runs: the agent's and the fencer's pidfiles ------------------------------------------


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot: a pid reused later has another."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def agent_pidfile(paths: AgentPaths) -> Path:
    return paths.run_dir / "agent.pid"


def fencer_pidfile(paths: AgentPaths) -> Path:
    return paths.run_dir / "fence.pid"


def fencer_config_file(paths: AgentPaths) -> Path:
    return paths.run_dir / "fence-config.json"


def write_agent_pidfile(paths: AgentPaths) -> None:
    """Says this process is the host's agent (pid and start time, so reuse cannot fool it)."""
    pid = os.getpid()
    temporary = agent_pidfile(paths).with_suffix(".tmp")
    temporary.write_text(f"{pid} {_start_time(pid)}\n")
    os.replace(temporary, agent_pidfile(paths))


def remove_agent_pidfile(paths: AgentPaths) -> None:
    with contextlib.suppress(OSError):
        if agent_pidfile(paths).read_text().split()[0] == str(os.getpid()):
            agent_pidfile(paths).unlink()


def agent_running(paths: AgentPaths) -> bool:
    try:
        pid_text, started = agent_pidfile(paths).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    return process_state(pid) is ProcessState.RUNNING and _start_time(pid) == started


def _fencer_argv(paths: AgentPaths) -> list[str]:
    return [sys.executable, "-m", FENCE_MODULE, str(fencer_config_file(paths))]


def running_fencer(paths: AgentPaths) -> int | None:
    """The pid of this host's fencer, checked against /proc/<pid>/cmdline; None if none."""
    pid = read_pidfile(fencer_pidfile(paths))
    if pid is None or process_state(pid) is not ProcessState.RUNNING:
        return None
    argv = read_cmdline(pid)
    return pid if argv is not None and argv[1:] == _fencer_argv(paths)[1:] else None


def ensure_fencer(config: NubesConfig, paths: AgentPaths) -> int:
    """Adopts the host's running fencer, or starts one in its own session; its pid.

    Raises:
        OSError: its files cannot be written or the Python interpreter cannot be run.
    """
    temporary = fencer_config_file(paths).with_suffix(".tmp")
    temporary.write_text(config.model_dump_json())
    os.replace(temporary, fencer_config_file(paths))  # a running fencer reads it at start only
    pid = running_fencer(paths)
    if pid is not None:
        return pid
    log_path = paths.state_dir / "fence.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            _fencer_argv(paths),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a signal to the agent's group does not reach it
            close_fds=True,
        )
    fencer_pidfile(paths).write_text(f"{process.pid}\n")
    log.info("fencer started (pid %d, log %s)", process.pid, log_path)
    return process.pid


# -- the fencer process -----------------------------------------------------------------------


class Fencer:
    """Every second: look at this host's QEMUs and the store, kill what must not run here."""

    def __init__(self, config: NubesConfig) -> None:
        self.config = config
        agent = config.agent
        self.host = agent.host
        self.prefix = agent.prefix
        self.paths = AgentPaths(state_dir=config.agent_state_dir, run_dir=agent.run_dir)
        self.ttl = float(agent.heartbeat_ttl)
        self.read_timeout = max(0.5, min(2.0, self.ttl / 2))
        self.store: Store | None = None
        self.last_read = time.monotonic()
        self.last_known: dict[str, VmRecord] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`, or until neither an agent nor a QEMU of this host runs."""
        try:
            while not stop.is_set():
                running = scan_qemu_processes(self.prefix)
                agent = agent_running(self.paths)
                if not running and not agent:
                    log.info("no agent and no QEMU of prefix %s left: fencer exits", self.prefix)
                    return
                await self.tick(running, agent)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), FENCE_INTERVAL)
        finally:
            if self.store is not None:
                with contextlib.suppress(Exception):
                    await self.store.close()

    async def tick(self, running: dict[str, int], agent: bool) -> list[Fencing]:
        records = await self._read(running, agent)
        if records is not None or not running:
            self.last_read = time.monotonic()
        restartable = {
            vm_id
            for vm_id in running
            if all_disks_on_shared_pools(
                LaunchRecord.load(self.paths.launch_record(vm_id)),
                self.config.agent.storage_pools.values(),
            )
        }
        chosen = choose_fencing(
            self.host,
            running,
            records,
            last_known=self.last_known,
            restartable=restartable,
            store_silent_seconds=time.monotonic() - self.last_read,
            heartbeat_ttl=self.ttl,
        )
        for fencing in chosen:
            if kill_qemu(fencing, self.prefix):
                log.warning(
                    "fenced %s: SIGKILL to QEMU %d: %s", fencing.vm_id, fencing.pid, fencing.reason
                )
        return chosen

    async def _read(
        self, running: dict[str, int], agent: bool
    ) -> dict[str, VmRecord | None] | None:
        """The records of the VMs running here; None when the store did not answer in time."""
        try:
            async with asyncio.timeout(self.read_timeout):
                if self.store is None:
                    from nubes.store import open_store

                    self.store = await open_store(self.config)
                records: dict[str, VmRecord | None] = {}
                for vm_id in running:
                    kv = await self.store.get(resource_key(Kind.VM, vm_id))
                    records[vm_id] = None
                    if kv is not None:
                        with contextlib.suppress(InvalidInput):
                            records[vm_id] = self.last_known[vm_id] = VmRecord.from_json(kv.value)
                if not agent:
                    await self._keep_stopped_key()
                return records
        except (StoreError, TimeoutError, OSError) as error:
            log.debug("store unreadable: %s", error)
            return None

    async def _keep_stopped_key(self) -> None:
        """While the agent is stopped cleanly, this host still runs: say so for it."""
        assert self.store is not None
        kv = await self.store.get(host_stopped_key(self.host))
        if kv is not None and kv.lease:
            with contextlib.suppress(StoreError):
                await self.store.lease_keepalive(kv.lease)


def kill_qemu(fencing: Fencing, prefix: str) -> bool:
    """SIGKILLs the QEMU if that pid still runs this VM's QEMU; False when it does not."""
    argv = read_cmdline(fencing.pid)
    if argv is None or marker_of(argv) != (prefix, fencing.vm_id):
        return False
    if process_state(fencing.pid) is not ProcessState.RUNNING:
        return False
    try:
        os.kill(fencing.pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    """`python -m nubes.agent.fence <config.json>`: the agent starts it so."""
    arguments = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s fence: %(message)s")
    if len(arguments) != 1:
        sys.exit("usage: python -m nubes.agent.fence <config.json written by the agent>")
    config = NubesConfig.model_validate_json(Path(arguments[0]).read_text())
    paths = AgentPaths(state_dir=config.agent_state_dir, run_dir=config.agent.run_dir)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info("fencer of host %s up (pid %d)", config.agent.host, os.getpid())
        await Fencer(config).run(stop)

    try:
        asyncio.run(run())
    finally:
        if read_pidfile(fencer_pidfile(paths)) == os.getpid():
            fencer_pidfile(paths).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
