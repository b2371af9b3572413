"""The reconciler of one VM on this host: reads its spec, looks at its QEMU process, makes
the smallest change that brings one to the other, and writes what it sees.

Each pass is idempotent and never waits long: a soft stop sends the power button and
comes back at its deadline; the end of a QEMU process is learnt from QMP (its
SHUTDOWN event and the socket closing) and explained from the events that came before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import time
from collections.abc import Awaitable, Callable

from nubes.agent.compute.cgroup import CgroupError
from nubes.agent.compute.process import (
    find_vm_process,
    launch_qemu,
    signal_process,
    wait_exited,
)
from nubes.agent.compute.qemu_cmdline import (
    QemuPlan,
    hotplug_port,
)
from nubes.agent.compute.qmp import QmpDisconnected, QmpEvent, QmpSession
from nubes.agent.context import AgentContext
from nubes.agent.controller import Controller
from nubes.agent.launch_plan import LaunchPlanner, WaitingFor
from nubes.agent.migration import VmMigration, incoming_here
from nubes.agent.runtime import LaunchedDisk, LaunchRecord, VmRuntime
from nubes.agent.status import differs
from nubes.agent.storage.pools import (
    StoragePool,
    UnknownPool,
    remove_vm_files,
)
from nubes.errors import InvalidInput, NubesError, QemuError
from nubes.model.common import now
from nubes.model.vm import (
    Flavor,
    PowerState,
    RestartPolicy,
    VmRecord,
    VmSpec,
    VmState,
    VmStatus,
    check_transition,
)
from nubes.store.base import Compare, Delete
from nubes.store.keys import Kind, migration_key

log = logging.getLogger(__name__)

QUIT_GRACE_SECONDS = 5.0
HOST_REBOOTED_REASON = "the host rebooted and autostart is off; start the VM to run it again"
DETACH_TIMEOUT_SECONDS = 20.0
# A disk another QEMU still holds (the VM's old host, on a shared pool) is tried again soon.
DISK_LOCK_RETRY_SECONDS = 2.0
CRASH_WINDOW_SECONDS = 600.0
MAX_RESTART_DELAY_SECONDS = 60.0
# QMP events that change what the status says.
_STATUS_EVENTS = frozenset({"SHUTDOWN", "RESET", "STOP", "RESUME", "GUEST_PANICKED", "MIGRATION"})


class VmController(Controller):
    """Owns one VM id on this host for as long as the VM is bound here or has leftovers."""

    def __init__(self, context: AgentContext, vm_id: str) -> None:
        super().__init__(context, Kind.VM, vm_id)
        self.vm_id = vm_id
        self.runtime: VmRuntime | None = None
        self._adoption_tried = False
        self._crash_times: list[float] = []
        self._failed_revision: int | None = None
        self._first_pass = True
        self.migration = VmMigration(self)
        self._planner = LaunchPlanner(context, vm_id)
        self._pools = self._planner.pools

    def busy(self) -> bool:
        """Whether a pass is running or asked for (the agent waits for first passes)."""
        return super().busy() or not self._adoption_tried

    # -- one pass --------------------------------------------------------------------------

    async def reconcile(self, *, resync: bool = False) -> None:
        kv = await self.ctx.store.get(self.key)
        record: VmRecord | None = None
        if kv is not None:
            try:
                record = VmRecord.from_json(kv.value)
            except InvalidInput as error:
                await self._write_invalid(str(error))
                return
        status = await self._read_status()
        if record is None:
            self.ctx.vms.pop(self.vm_id, None)
        else:
            self.ctx.vms[self.vm_id] = record
        if not self._adoption_tried:
            self._adoption_tried = True
            await self._adopt()

        if record is not None and incoming_here(record, self.ctx.host):
            await self.migration.serve_incoming(record)  # the VM moves here: not ours yet
            return
        await self.migration.stop_incoming()
        if record is None or record.deleting or record.spec.host != self.ctx.host:
            await self._finish(record, kv.mod_revision if kv else 0, status)
            return
        assert kv is not None
        await self._converge(record, kv.mod_revision, status, resync=resync)
        self._first_pass = False

    async def _converge(
        self, record: VmRecord, revision: int, status: VmStatus | None, *, resync: bool
    ) -> None:
        spec = record.spec
        runtime = self.runtime
        if runtime is not None and not (runtime.connected and runtime.process_alive()):
            status = await self._handle_exit(runtime, spec, status)
            runtime = self.runtime  # not None when QMP came back: QEMU was alive after all
        elif runtime is None and status is not None and status.state is VmState.RUNNING:
            status = await self._died_unseen(spec, status)
        if spec.migration is not None and await self.migration.drive_outgoing(record, status):
            return

        if runtime is not None:
            if self._wants_running(spec, status):
                await self._apply_live_changes(runtime, spec, status)
            else:
                await self._stop(runtime, spec, status)
            return

        if not self._wants_running(spec, status):
            await self._settle_stopped(spec, status)
            return
        if status is not None and status.state is VmState.CRASHED:
            if spec.restart_policy is RestartPolicy.NEVER:
                return
            delay = self._restart_delay()
            if delay > 0:
                self.kick_later(delay)
                return
        if (
            status is not None
            and status.state is VmState.ERROR
            and self._failed_revision == revision
            and not resync
        ):
            return  # same spec, same failure: wait for a change or the next resync
        await self._start(record, revision, status)

    def _wants_running(self, spec: VmSpec, status: VmStatus | None) -> bool:
        if spec.power_state is not PowerState.RUNNING:
            return False
        halted = status is not None and status.halted_start_counter == spec.start_counter
        return not halted

    # -- starting --------------------------------------------------------------------------

    async def _start(self, record: VmRecord, revision: int, status: VmStatus | None) -> None:
        spec = record.spec
        if self._first_pass and self.ctx.host_rebooted and not spec.autostart:
            await self._halt(status, spec, HOST_REBOOTED_REASON)
            return
        with self.ctx.launch_gate.preparing() as prepared:
            if status is None or status.state is not VmState.BUILDING:
                status = await self._write(status, state=VmState.BUILDING, reason=None, pid=None)
            # The volumes stay locked until the runtime is known: until then the volume
            # controllers would take QEMU's disks for idle ones and open them with qemu-img.
            async with contextlib.AsyncExitStack() as locks:
                for volume_id in sorted(set(spec.volumes)):
                    await locks.enter_async_context(self.ctx.volume_lock(volume_id))
                await self._launch(record, revision, status, prepared)

    async def _launch(
        self,
        record: VmRecord,
        revision: int,
        status: VmStatus,
        prepared: Callable[[], Awaitable[None]],
    ) -> None:
        """Prepares the start, waits at the launch gate (`prepared`), spawns QEMU."""
        spec = record.spec
        run_dir = self.ctx.paths.vm_run_dir(self.vm_id)
        try:
            pool = self._pools.get(spec.storage_pool, host=self.ctx.host)
        except UnknownPool as error:
            self._failed_revision = revision
            await self._write(status, state=VmState.ERROR, reason=str(error), pid=None)
            return
        root = pool.root_disk(self.vm_id)
        root_existed = root.exists()
        if not root_existed and status.flavor is not None:
            # It ran before, so its disk held the guest's data: never replace it silently.
            self._failed_revision = revision
            await self._write(
                status,
                state=VmState.ERROR,
                reason=f"the root disk of VM {self.vm_id} is gone from host {self.ctx.host}; "
                "restore it, or delete the VM",
            )
            return
        try:
            launch, plan = await self._plan(record, pool)
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True, mode=0o700)
            launch.save(self.ctx.paths.launch_record(self.vm_id))
            await prepared()
            pid = await launch_qemu(launch.argv, pidfile=plan.paths.pidfile, netns=launch.netns)
        except WaitingFor as waiting:
            await self._write(status, reason=waiting.message)  # the volume's change wakes us
            return
        except NubesError as error:
            shutil.rmtree(run_dir, ignore_errors=True)
            self.ctx.network.release(self.vm_id)
            if _disk_locked(error):
                # Another QEMU holds a disk: on a shared pool, the VM's old host still runs
                # it (it went down or was cut off). Start once that QEMU is gone.
                await self._write(
                    status,
                    reason="a disk of the VM is still held by another QEMU (its old host's?); "
                    "starting as soon as it is released",
                    pid=None,
                )
                self.kick_later(DISK_LOCK_RETRY_SECONDS)
                return
            if not root_existed:
                shutil.rmtree(self.ctx.paths.vm_state_dir(self.vm_id), ignore_errors=True)
                if pool.shared:
                    remove_vm_files(pool, self.vm_id)
            self._failed_revision = revision
            await self._write(status, state=VmState.ERROR, reason=error.message, pid=None)
            return
        runtime = VmRuntime(pid=pid, launch=launch)
        self._failed_revision = None
        # QEMU daemonizes only once it is fully set up, and it was not started paused:
        # the guest runs now. Say so first; QMP (and the cgroup) follow at once.
        status = await self._write(
            status,
            state=VmState.RUNNING,
            reason=None,
            pid=pid,
            qemu_status="running",
            flavor=launch.flavor,
            attached_volumes=launch.attached_volumes(),
            reboot_counter=spec.reboot_counter,
            cpu_weight=None,
            resize_pending=False,
            last_event=None,
            last_event_at=None,
        )
        try:
            await self._connect(runtime)
        except QemuError as error:
            if await wait_exited(runtime.pid, 1.0):  # it ended at once: a crash like any other
                await self._forget(runtime)
                await self._crashed(spec, status, "QEMU exited unexpectedly right after it started")
                return
            await self._kill(runtime)
            shutil.rmtree(run_dir, ignore_errors=True)
            self._failed_revision = revision
            await self._write(status, state=VmState.ERROR, reason=error.message, pid=None)
            return
        self.runtime = runtime
        self.kick()  # the next pass queries QEMU and applies the CPU weight

    async def _plan(
        self, record: VmRecord, pool: StoragePool | None = None
    ) -> tuple[LaunchRecord, QemuPlan]:
        """The disks and command line of the VM's next start (see LaunchPlanner.plan).

        Raises:
            NubesError: the image or a volume is missing or unusable, or the VM asks for
                something this host cannot give; the message says which.
        """
        return await self._planner.plan(record, pool)

    async def _volume_disk(self, volume_id: str, *, port: str | None) -> LaunchedDisk:
        """The disk of a volume ready on this host and used by no other VM.

        Raises:
            NubesError: the volume is missing, elsewhere, not ready, or in use.
        """
        return await self._planner.volume_disk(volume_id, port=port)

    async def _connect(self, runtime: VmRuntime) -> None:
        def on_event(event: QmpEvent) -> None:
            runtime.record_event(event)
            if event.name in _STATUS_EVENTS:
                self.kick()

        def on_close() -> None:
            runtime.closed.set()
            self.kick()

        runtime.closed = asyncio.Event()
        runtime.session = await QmpSession.connect(
            self.ctx.paths.runtime(self.vm_id).qmp_socket,
            name=self.vm_id,
            on_event=on_event,
            on_close=on_close,
            alive=runtime.process_alive,
        )

    # -- while running ---------------------------------------------------------------------

    async def _apply_live_changes(
        self,
        runtime: VmRuntime,
        spec: VmSpec,
        status: VmStatus | None,
    ) -> None:
        assert runtime.session is not None
        reason: str | None = None
        reboot_counter = spec.reboot_counter
        try:
            if status is not None and status.reboot_counter != spec.reboot_counter:
                await runtime.session.system_reset()
            reason = await self._sync_hotplug(runtime, spec)
            if reason is None and runtime.launch.ports != spec.ports:
                reason = "the ports changed; the change applies at the next start"
            qemu_status: str | None = await runtime.session.query_status()
        except QemuError as error:
            if isinstance(error, QmpDisconnected) or not runtime.connected:
                self.kick()  # it ended under us: the next pass explains how
                return
            reason = error.message
            qemu_status = status.qemu_status if status else None
        weight = None if status is None else status.cpu_weight
        if weight != spec.cpu_weight:
            try:
                weight = await asyncio.to_thread(
                    self.ctx.cpu_weights.apply, self.vm_id, runtime.pid, spec.cpu_weight
                )
            except CgroupError as error:
                reason = reason or error.message
        if not runtime.connected:
            self.kick()  # it ended while we looked: the next pass explains how
            return
        await self._write(
            status,
            state=VmState.RUNNING,
            reason=reason,
            pid=runtime.pid,
            qemu_status=qemu_status,
            flavor=runtime.launch.flavor,
            attached_volumes=runtime.launch.attached_volumes(),
            reboot_counter=reboot_counter,
            cpu_weight=weight,
            resize_pending=runtime.launch.flavor != spec.flavor,
            last_event=runtime.last_event,
            last_event_at=runtime.last_event_at,
        )

    async def _sync_hotplug(self, runtime: VmRuntime, spec: VmSpec) -> str | None:
        """Plugs and unplugs volumes to match the spec; returns why it could not, if so."""
        assert runtime.session is not None
        launch = runtime.launch
        launch_path = self.ctx.paths.launch_record(self.vm_id)
        for volume_id in [v for v in launch.attached_volumes() if v not in spec.volumes]:
            async with self.ctx.volume_lock(volume_id):
                try:
                    await runtime.session.detach_disk(volume_id, timeout=DETACH_TIMEOUT_SECONDS)
                except QemuError as error:
                    self.kick_later(5.0)
                    return f"detaching {volume_id}: {error.message}"
            launch = launch.model_copy(
                update={"disks": [d for d in launch.disks if d.volume != volume_id]}
            )
            runtime.launch = launch
            launch.save(launch_path)
            self.ctx.kick_volume(volume_id)
        for volume_id in [v for v in spec.volumes if v not in launch.attached_volumes()]:
            used = {disk.port for disk in launch.disks}
            free = [
                hotplug_port(index)
                for index in range(self.ctx.config.hotplug_slots)
                if hotplug_port(index) not in used
            ]
            if not free or not self.ctx.config.machine.startswith("q35"):
                return (
                    f"no free hotplug slot for {volume_id}; stop the VM to attach it at next start"
                )
            try:
                disk = await self._volume_disk(volume_id, port=free[0])
                async with self.ctx.volume_lock(volume_id):
                    await runtime.session.attach_disk(disk.plan(), free[0])
            except NubesError as error:
                return f"attaching {volume_id}: {error.message}"
            launch = launch.model_copy(update={"disks": [*launch.disks, disk]})
            runtime.launch = launch
            launch.save(launch_path)
            self.ctx.kick_volume(volume_id)
        return None

    async def _stop(self, runtime: VmRuntime, spec: VmSpec, status: VmStatus | None) -> None:
        """One step of stopping: power button, then quit at the deadline, then SIGKILL."""
        assert runtime.session is not None
        timeout = (
            spec.soft_stop_timeout
            if spec.soft_stop_timeout is not None
            else self.ctx.config.soft_stop_timeout
        )
        moment = time.monotonic()
        with contextlib.suppress(QemuError):
            if runtime.stop_requested_at is None:
                runtime.stop_requested_at = moment
                if timeout == 0:
                    runtime.quit_sent_at = moment
                    await runtime.session.quit()
                    self.kick_later(QUIT_GRACE_SECONDS)
                else:
                    await runtime.session.system_powerdown()
                    self.kick_later(timeout)
                await self._write(status, reason="stopping")
            elif runtime.quit_sent_at is None and moment - runtime.stop_requested_at >= timeout:
                runtime.quit_sent_at = moment
                await runtime.session.quit()
                self.kick_later(QUIT_GRACE_SECONDS)
            elif (
                runtime.quit_sent_at is not None
                and moment - runtime.quit_sent_at >= QUIT_GRACE_SECONDS
            ):
                signal_process(runtime.pid, signal.SIGKILL)
                self.kick_later(0.5)

    # -- when QEMU has ended ---------------------------------------------------------------

    async def _handle_exit(
        self, runtime: VmRuntime, spec: VmSpec, status: VmStatus | None
    ) -> VmStatus | None:
        """Explains why the process ended, records it, and forgets the runtime."""
        if runtime.process_alive() and not await wait_exited(runtime.pid, 3.0):
            # QMP is gone but QEMU is not: try to speak to it again before giving up on it.
            await runtime.close()
            try:
                await self._connect(runtime)
                return status
            except QemuError:
                log.warning("%s: QEMU %d lost its QMP socket; killing it", self.vm_id, runtime.pid)
                await self._kill(runtime)
        await self._forget(runtime)
        seen: dict[str, object] = {
            "last_event": runtime.last_event,
            "last_event_at": runtime.last_event_at,
        }
        if runtime.stop_requested_at is not None:
            return await self._write(
                status, state=VmState.STOPPED, reason=None, pid=None, qemu_status=None, **seen
            )
        if runtime.guest_powered_off():
            if spec.restart_policy is RestartPolicy.ALWAYS:
                return await self._write(
                    status,
                    state=VmState.STOPPED,
                    reason="the guest powered itself off; restarting (restart policy always)",
                    pid=None,
                    qemu_status=None,
                    **seen,
                )
            return await self._halt(
                status, spec, "the guest powered itself off; start the VM to run it again", **seen
            )
        why = "the guest panicked" if runtime.panicked else "QEMU exited unexpectedly"
        if runtime.last_event and not runtime.panicked:
            why += f" (last QMP event: {runtime.last_event})"
        return await self._crashed(spec, status, why, **seen)

    async def _died_unseen(self, spec: VmSpec, status: VmStatus) -> VmStatus | None:
        """The status says running but no process is left: it died while we were away."""
        if self.ctx.host_rebooted and self._first_pass:
            if not spec.autostart:
                return await self._halt(status, spec, HOST_REBOOTED_REASON)
            return await self._write(
                status, state=VmState.STOPPED, reason="the host rebooted", pid=None
            )
        return await self._crashed(spec, status, "QEMU ended while the agent was not running")

    async def _halt(
        self, status: VmStatus | None, spec: VmSpec, reason: str, **seen: object
    ) -> VmStatus:
        """Stopped, and staying so until the next start request."""
        return await self._write(
            status,
            state=VmState.STOPPED,
            reason=reason,
            halted_start_counter=spec.start_counter,
            pid=None,
            qemu_status=None,
            **seen,
        )

    async def _crashed(
        self, spec: VmSpec, status: VmStatus | None, why: str, **seen: object
    ) -> VmStatus | None:
        restarts = status.restarts if status else 0
        if spec.restart_policy is not RestartPolicy.NEVER:
            self._crash_times.append(time.monotonic())
            restarts += 1
            why += "; restarting"
        self.kick()
        return await self._write(
            status,
            state=VmState.CRASHED,
            reason=why,
            pid=None,
            qemu_status=None,
            restarts=restarts,
            **seen,
        )

    def _restart_delay(self) -> float:
        """No delay for the first crash in ten minutes, then doubling up to a minute."""
        moment = time.monotonic()
        self._crash_times = [t for t in self._crash_times if moment - t < CRASH_WINDOW_SECONDS]
        if len(self._crash_times) <= 1:
            return 0.0
        delay = min(MAX_RESTART_DELAY_SECONDS, 2.0 ** (len(self._crash_times) - 2))
        return max(0.0, self._crash_times[-1] + delay - moment)

    async def _settle_stopped(self, spec: VmSpec, status: VmStatus | None) -> None:
        """No process and none wanted: say so (a crash or an error keeps its reason)."""
        if (
            status is not None
            and status.state in (VmState.CRASHED, VmState.ERROR)
            and spec.power_state is PowerState.RUNNING
        ):
            return  # not running by policy or after a failure: the reason stays readable
        reason = status.reason if status and status.state is VmState.STOPPED else None
        await self._write(
            status,
            state=VmState.STOPPED,
            reason=reason,
            pid=None,
            qemu_status=None,
            attached_volumes=list(spec.volumes),
            reboot_counter=spec.reboot_counter,
            resize_pending=False,
        )

    # -- adoption, teardown ----------------------------------------------------------------

    async def _adopt(self) -> None:
        """Finds a QEMU left running by an earlier agent and takes it over, untouched."""
        await self._take_over()
        if self.runtime is None:
            # Its ports were claimed for it at the agent's start; without QEMU they are
            # claimed again only when it starts.
            self.ctx.network.release(self.vm_id)

    async def _take_over(self) -> None:
        runtime_paths = self.ctx.paths.runtime(self.vm_id)
        pid = find_vm_process(runtime_paths.pidfile, self.ctx.config.prefix, self.vm_id)
        if pid is None:
            return
        launch = LaunchRecord.load(self.ctx.paths.launch_record(self.vm_id))
        if launch is None:
            log.warning("%s: QEMU %d runs without its launch record; ending it", self.vm_id, pid)
            signal_process(pid, signal.SIGKILL)
            return
        runtime = VmRuntime(pid=pid, launch=launch, adopted=True)
        try:
            await self._connect(runtime)
        except QemuError as error:
            log.warning("%s: cannot reach QMP of QEMU %d (%s); ending it", self.vm_id, pid, error)
            await self._kill(runtime)
            return
        self.runtime = runtime
        if launch.network is not None:
            self.ctx.network.adopt(self.vm_id, launch.network, tuple(launch.ports))
        log.info("%s: adopted QEMU %d", self.vm_id, pid)

    async def _finish(
        self, record: VmRecord | None, revision: int, status: VmStatus | None
    ) -> None:
        """The VM is deleted or no longer bound here: tear down what this host holds."""
        if record is not None and record.deleting and self.runtime is not None:
            status = await self._write(status, state=VmState.DELETING, reason=None)
        # Bound to another host (moved by HA while this host was away): the store decides,
        # this host obeys at once. SIGKILL, no quit: a flush now could write over the disk
        # its new host already runs on.
        moved = (
            record is not None
            and not record.deleting
            and record.spec.host not in (None, self.ctx.host)
        )
        await self._teardown(fence=moved)
        if record is not None and record.deleting and record.spec.host in (None, self.ctx.host):
            with contextlib.suppress(UnknownPool):
                pool = self._pools.get(record.spec.storage_pool, host=self.ctx.host)
                if pool.shared:
                    remove_vm_files(pool, self.vm_id)
        if record is None:
            if status is not None and status.host == self.ctx.host:
                await self.status_writer.delete()
        elif record.deleting:
            result = await self.ctx.store.txn(
                [Compare.mod_revision(self.key, "==", revision)],
                [
                    Delete(self.key),
                    Delete(self.status_writer.key),
                    Delete(migration_key(self.vm_id)),
                ],
            )
            if not result.succeeded:
                self.kick()  # the record changed meanwhile: look again
                return
        if self._wake.is_set():
            return  # kicked during the teardown (the VM may be moving back here): look again
        self.ctx.vms.pop(self.vm_id, None)
        self.finished = True

    async def _teardown(self, *, fence: bool = False) -> None:
        """Ends the VM's QEMU here (`fence`: at once, with SIGKILL) and removes this host's
        files of it; its files on a shared pool stay (another host may run it now)."""
        runtime = self.runtime
        if runtime is None:
            pid = find_vm_process(
                self.ctx.paths.runtime(self.vm_id).pidfile, self.ctx.config.prefix, self.vm_id
            )
            if pid is not None:
                runtime = VmRuntime(pid=pid, launch=_unknown_launch(self.vm_id))
        if runtime is not None:
            if fence:
                log.warning("%s: bound elsewhere now; killing QEMU %d", self.vm_id, runtime.pid)
            elif runtime.connected and runtime.session is not None:
                with contextlib.suppress(QemuError):
                    await runtime.session.quit()
                await wait_exited(runtime.pid, QUIT_GRACE_SECONDS)
            await self._kill(runtime)
            await self._forget(runtime)
        self.ctx.network.release(self.vm_id)
        shutil.rmtree(self.ctx.paths.vm_run_dir(self.vm_id), ignore_errors=True)
        shutil.rmtree(self.ctx.paths.vm_state_dir(self.vm_id), ignore_errors=True)
        self._release_cgroup()

    def _release_cgroup(self) -> None:
        # A QEMU that has not fully exited still holds its group; the resync sweeps it later.
        with contextlib.suppress(CgroupError):
            self.ctx.cpu_weights.remove(self.vm_id)

    async def _kill(self, runtime: VmRuntime) -> None:
        if runtime.process_alive():
            signal_process(runtime.pid, signal.SIGKILL)
            await wait_exited(runtime.pid, QUIT_GRACE_SECONDS)

    async def _forget(self, runtime: VmRuntime) -> None:
        await runtime.close()
        if self.runtime is runtime:
            self.runtime = None
        shutil.rmtree(self.ctx.paths.vm_run_dir(self.vm_id), ignore_errors=True)
        self._release_cgroup()
        for volume_id in runtime.launch.attached_volumes():
            self.ctx.kick_volume(volume_id)

    # -- status ----------------------------------------------------------------------------

    async def _read_status(self) -> VmStatus | None:
        kv = await self.status_writer.read()
        if kv is None:
            return None
        try:
            return VmStatus.from_json(kv.value)
        except InvalidInput:
            return None

    async def _write(self, base: VmStatus | None, **changes: object) -> VmStatus:
        """Writes `base` with `changes` when that says something new; returns the result."""
        current = base.state if base is not None else VmState.SCHEDULED
        if current is VmState.PENDING:
            current = VmState.SCHEDULED  # bound to this host: the scheduler has done its part
        fields: dict[str, object] = (
            base.model_dump() if base is not None else {"state": VmState.SCHEDULED}
        )
        fields.update(changes)
        fields["host"] = self.ctx.host
        fields["updated_at"] = now()
        new = VmStatus.model_validate(fields)
        check_transition(current, new.state)
        if differs(base, new) and not await self.status_writer.write(new):
            self.kick()  # someone else wrote it meanwhile: look again
        return new

    async def _write_invalid(self, reason: str) -> None:
        status = await self._read_status()
        if status is not None and status.state is VmState.ERROR and status.reason == reason:
            return
        fields = {"state": VmState.ERROR, "reason": reason, "host": self.ctx.host}
        await self.status_writer.write(VmStatus.model_validate({**fields, "updated_at": now()}))


def _disk_locked(error: NubesError) -> bool:
    """Whether QEMU refused to start because another process holds a disk's lock."""
    return "Failed to get" in error.message and "lock" in error.message


def _unknown_launch(vm_id: str) -> LaunchRecord:
    """A placeholder plan for a QEMU found by pidfile that is about to be ended."""

    return LaunchRecord(
        vm_id=vm_id,
        flavor=Flavor(name="unknown", vcpus=1, memory_mb=32, disk_gb=0),
        disks=[],
        argv=[],
    )
