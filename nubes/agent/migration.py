"""Live migration between two agents: the target starts an incoming QEMU and listens on
the underlay, the source streams its QEMU's state there, one transaction moves the VM.

The store decides who owns the VM: the source, until the switch transaction binds it to
the target. Every failure ends in a rollback transaction that clears the request; each
agent's controller then converges (the target tears its incoming QEMU down).
Both QEMUs run in VPC namespaces that cannot reach the underlay: the agents make the
TCP connection and hand the connected socket to QEMU over QMP (SCM_RIGHTS).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import socket
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from nubes.agent.cold_migration import ColdMigration
from nubes.agent.compute.process import launch_qemu
from nubes.agent.compute.qemu_cmdline import build_qemu_argv
from nubes.agent.compute.qmp import QmpSession
from nubes.agent.migration_records import (
    note_resumed,
    read_progress,
    roll_back,
    switch_host,
    update_progress,
)
from nubes.agent.network.nsutil import socket_in_netns
from nubes.agent.runtime import VmRuntime
from nubes.errors import NubesError, QemuError
from nubes.model.common import now
from nubes.model.host import HostRecord
from nubes.model.migration import MigrationRequest, MigrationState, MigrationStatus
from nubes.model.vm import VmRecord, VmState, VmStatus
from nubes.store.base import Store
from nubes.store.keys import (
    Kind,
    resource_key,
)

if TYPE_CHECKING:
    from nubes.agent.vm_controller import VmController

log = logging.getLogger(__name__)

DOWNTIME_LIMIT_MS = 100  # the longest pause QEMU may plan for the switch
BANDWIDTH_BYTES = 8 << 30  # QEMU's default (128 MiB/s) would make the copy the long part
PREPARE_TIMEOUT_SECONDS = 60.0  # for the target to be ready (image copy, QEMU start)
CONNECT_TIMEOUT_SECONDS = 10.0
ACCEPT_TIMEOUT_SECONDS = 30.0
MIGRATION_TIMEOUT_SECONDS = 600.0
POLL_SECONDS = 0.05
PROGRESS_WRITE_SECONDS = 0.5
FD_NAME = "migration"
# query-migrate states in which the stream is still under way
_ACTIVE = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug"})


def incoming_here(record: VmRecord, host: str) -> bool:
    """Whether this host is the target of a move of the VM that has not switched yet."""
    request = record.spec.migration
    return (
        request is not None
        and request.target == host
        and record.spec.host != host
        and not record.deleting
    )


def _age(moment: datetime) -> float:
    return (now() - moment).total_seconds()


# -- the agents' side ----------------------------------------------------------------------


class VmMigration:
    """The migration work of one VM controller, on either end."""

    def __init__(self, controller: VmController) -> None:
        self.controller = controller
        self._accepting: asyncio.Task[None] | None = None
        self._started: int | None = None  # the request this source started streaming
        self._last_write = 0.0
        self._holding = False  # this host's network keeps quiet about the VM's ports
        self._serving: int | None = None  # the request this agent listens (or listened) for
        self._cold = ColdMigration(self)

    @property
    def _store(self) -> Store:
        return self.controller.ctx.store

    @property
    def _vm_id(self) -> str:
        return self.controller.vm_id

    async def stop_incoming(self) -> None:
        """The request is gone (switched or rolled back): stop waiting for the source, and
        let this host's network speak for the VM's ports again (teardown ends the QEMU)."""
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
        self._cold.stop_receiving()
        if self._holding:
            self._holding = False
            self.controller.ctx.network.release_statuses(self.controller.vm_id)
        runtime = self.controller.runtime
        if self._serving is not None and (runtime is None or runtime.resumed_at is not None):
            # Its RESUME event may come after the switch: a later pass (it kicks) notes it.
            counter, self._serving = self._serving, None
            if runtime is not None and runtime.resumed_at is not None:
                await note_resumed(self._store, self._vm_id, counter, runtime.resumed_at)

    # -- target ----------------------------------------------------------------------------

    async def serve_incoming(self, record: VmRecord) -> None:
        """One pass on the target: start the incoming QEMU and listen, or watch it."""
        request = record.spec.migration
        assert request is not None
        ctx = self.controller.ctx
        _, progress = await read_progress(self._store, self._vm_id)
        if progress is None or progress.counter != request.counter or progress.state.finished:
            return  # the rollback that clears the request is on its way
        if not request.live:
            await self._cold.serve(record, request, progress)
            return
        runtime = self.controller.runtime
        if runtime is not None and not (runtime.connected and runtime.process_alive()):
            await self.controller._kill(runtime)
            await self.controller._forget(runtime)
            await self._fail(request, f"the incoming QEMU on host {ctx.host} ended")
            return
        if runtime is None:
            if progress.state is not MigrationState.PREPARING:
                await self._fail(request, f"the agent of host {ctx.host} lost its incoming QEMU")
                return
            try:
                await self._start_incoming(record, request)
            except (NubesError, OSError) as error:
                message = error.message if isinstance(error, NubesError) else str(error)
                await self._fail(request, f"host {ctx.host} cannot take the VM: {message}")
            return
        if progress.state is MigrationState.READY and self._serving != request.counter:
            # Its listener went with the agent that made it: the source cannot connect.
            await self._fail(request, f"the agent of host {ctx.host} restarted while waiting")

    async def _start_incoming(self, record: VmRecord, request: MigrationRequest) -> None:
        controller = self.controller
        ctx = controller.ctx
        pool = controller._pools.get(record.spec.storage_pool, host=ctx.host)
        # The ports' statuses (and so the overlay's forwarding) stay with the source until
        # the switch transaction moves them: traffic must reach the running copy.
        controller.ctx.network.hold_statuses(controller.vm_id)
        self._holding = True
        launch, plan = await controller._plan(record, pool)
        plan = dataclasses.replace(plan, incoming=True)
        launch = launch.model_copy(update={"argv": build_qemu_argv(plan)})
        run_dir = ctx.paths.vm_run_dir(self._vm_id)
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True, mode=0o700)
        launch.save(ctx.paths.launch_record(self._vm_id))
        pid = await launch_qemu(launch.argv, pidfile=plan.paths.pidfile, netns=launch.netns)
        runtime = VmRuntime(pid=pid, launch=launch)
        try:
            await controller._connect(runtime)
        except QemuError:
            await controller._kill(runtime)
            raise
        controller.runtime = runtime
        with contextlib.suppress(NubesError):
            await asyncio.to_thread(ctx.cpu_weights.apply, self._vm_id, pid, record.spec.cpu_weight)
        listener, port = self._underlay_listener()
        self._serving = request.counter
        self._accepting = asyncio.create_task(
            self._accept(listener, runtime, request), name=f"migration-in-{self._vm_id}"
        )
        ready = await update_progress(
            self._store,
            self._vm_id,
            request.counter,
            state=MigrationState.READY,
            address=str(ctx.config.underlay_address),
            port=port,
            disk_paths=[disk.path for disk in launch.disks],
        )
        if ready is None:
            await self.stop_incoming()

    async def _accept(
        self, listener: socket.socket, runtime: VmRuntime, request: MigrationRequest
    ) -> None:
        """Takes the source's one connection and hands it to the incoming QEMU."""
        loop = asyncio.get_running_loop()
        try:
            expected = await self._underlay_of(request.source)
            if expected is None:
                # Only the source may send the VM: refuse what cannot be checked.
                raise NubesError(
                    f"host {request.source} has published no underlay address",
                    hint="restart its agent: it writes its underlay_address at start",
                )
            async with asyncio.timeout(ACCEPT_TIMEOUT_SECONDS):
                while True:
                    connection, peer = await loop.sock_accept(listener)
                    if peer[0] == expected:
                        break
                    log.warning("%s: refused a migration stream from %s", self._vm_id, peer[0])
                    connection.close()
            listener.close()
            with connection:
                assert runtime.session is not None
                await runtime.session.pass_socket(connection, FD_NAME)
            await runtime.session.migrate_incoming(f"fd:{FD_NAME}")
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            await self._fail(
                request, f"the source did not connect within {ACCEPT_TIMEOUT_SECONDS} s"
            )
        except (NubesError, OSError) as error:
            await self._fail(request, f"receiving the VM failed: {error}")
        finally:
            listener.close()
            self._accepting = None

    async def _fail(self, request: MigrationRequest, reason: str) -> None:
        await roll_back(self._store, self._vm_id, request, reason)
        self.controller.kick()

    async def _underlay_of(self, host: str) -> str | None:
        kv = await self._store.get(resource_key(Kind.HOST, host))
        if kv is None:
            return None
        with contextlib.suppress(NubesError):
            return HostRecord.from_json(kv.value).underlay_address
        return None

    def _underlay_socket(self) -> socket.socket:
        netns = self.controller.ctx.config.underlay_netns
        if netns is None:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        return socket_in_netns(netns, socket.AF_INET)

    def _underlay_client(self) -> socket.socket:
        """A TCP socket that connects from this host's underlay address, the one the other
        host checks the stream comes from (the route may prefer another).

        Raises:
            OSError: the address cannot be bound.
        """
        connection = self._underlay_socket()
        try:
            connection.bind((str(self.controller.ctx.config.underlay_address), 0))
            connection.setblocking(False)
        except OSError:
            connection.close()
            raise
        return connection

    def _underlay_listener(self) -> tuple[socket.socket, int]:
        """A non-blocking TCP listener on this host's underlay address, and its port.

        Raises:
            OSError: the address cannot be bound.
        """
        listener = self._underlay_socket()
        try:
            listener.bind((str(self.controller.ctx.config.underlay_address), 0))
            listener.listen(1)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        return listener, int(listener.getsockname()[1])

    # -- source ----------------------------------------------------------------------------

    async def drive_outgoing(self, record: VmRecord, status: VmStatus | None) -> bool:
        """One pass on the source; True when it handled the pass (the VM is moving).

        A VM whose QEMU is not running cannot move live: the request is rolled back and
        the pass goes on as usual (False).
        """
        request = record.spec.migration
        assert request is not None
        if not request.live:
            return await self._drive_cold(record, request, status)
        runtime = self.controller.runtime
        if runtime is None or runtime.session is None:
            await roll_back(
                self._store, self._vm_id, request, "the VM stopped running on the source"
            )
            return False
        _, progress = await read_progress(self._store, self._vm_id)
        if progress is None or progress.counter != request.counter:
            await roll_back(self._store, self._vm_id, request, "its progress record is missing")
            return False
        if progress.state is MigrationState.FAILED:
            await roll_back(self._store, self._vm_id, request, progress.reason or "failed")
            return False
        session = runtime.session
        if progress.state is MigrationState.RUNNING:
            info = await session.query_migrate()
            await self._follow_stream(request, progress, status, session, info)
        elif progress.state is MigrationState.READY:
            await self._start_stream(record, request, progress, status, session)
        elif _age(progress.started_at) > PREPARE_TIMEOUT_SECONDS:
            await self._fail(
                request, f"host {request.target} was not ready within {PREPARE_TIMEOUT_SECONDS} s"
            )
        else:
            await self._say(status, f"preparing host {request.target}")
            self.controller.kick_later(1.0)
        return True

    async def _drive_cold(
        self, record: VmRecord, request: MigrationRequest, status: VmStatus | None
    ) -> bool:
        _, progress = await read_progress(self._store, self._vm_id)
        if progress is None or progress.counter != request.counter:
            await roll_back(self._store, self._vm_id, request, "its progress record is missing")
        elif progress.state is MigrationState.FAILED:
            await roll_back(self._store, self._vm_id, request, progress.reason or "failed")
        elif (
            progress.state is MigrationState.PREPARING
            and _age(progress.started_at) > PREPARE_TIMEOUT_SECONDS
        ):
            await self._fail(
                request, f"host {request.target} was not ready within {PREPARE_TIMEOUT_SECONDS} s"
            )
        else:
            await self._cold.drive(record, request, progress, status)
            self.controller.kick_later(1.0)
            return True
        return False

    async def _start_stream(
        self,
        record: VmRecord,
        request: MigrationRequest,
        progress: MigrationStatus,
        status: VmStatus | None,
        session: QmpSession,
    ) -> None:
        assert progress.address is not None
        assert progress.port is not None
        runtime = self.controller.runtime
        assert runtime is not None
        own_paths = [disk.path for disk in runtime.launch.disks]
        if own_paths != progress.disk_paths:
            # Different files on the two ends: nothing would carry the disks' contents.
            await self._fail(
                request,
                f"the VM's disks are not on storage both hosts share ({own_paths} here, "
                f"{progress.disk_paths} on {request.target}); move it stopped (cold), "
                "or put its root disk on a shared storage pool",
            )
            return
        loop = asyncio.get_running_loop()
        try:
            connection = self._underlay_client()
        except OSError as error:
            await self._fail(request, f"cannot bind the underlay address: {error}")
            return
        with connection:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                    await loop.sock_connect(connection, (progress.address, progress.port))
            except (OSError, TimeoutError) as error:
                reason = str(error) or "timed out"
                await self._fail(
                    request,
                    f"cannot reach host {request.target} at "
                    f"{progress.address}:{progress.port}: {reason}",
                )
                return
            running = await update_progress(
                self._store, self._vm_id, request.counter, state=MigrationState.RUNNING
            )
            if running is None:
                self.controller.kick()
                return
            try:
                await session.prepare_migration(
                    downtime_ms=DOWNTIME_LIMIT_MS, bandwidth=BANDWIDTH_BYTES
                )
                await session.pass_socket(connection, FD_NAME)
                runtime.migration_status = None  # events from now on are this stream's
                await session.migrate(f"fd:{FD_NAME}")
            except QemuError as error:
                await self._fail(request, f"QEMU could not start the migration: {error.message}")
                return
        self._started = request.counter
        log.info("%s: migrating to %s", self._vm_id, request.target)
        await self._say(status, f"migrating to {request.target}")
        self.controller.kick_later(POLL_SECONDS)

    async def _follow_stream(
        self,
        request: MigrationRequest,
        progress: MigrationStatus,
        status: VmStatus | None,
        session: QmpSession,
        info: dict[str, Any],
    ) -> None:
        figures = _figures(info)
        runtime = self.controller.runtime
        state = _outgoing_state(info, runtime.migration_status if runtime else None)
        if state == "completed":
            if runtime is not None and runtime.paused_at is not None:
                figures["paused_at"] = runtime.paused_at
            if await switch_host(self._store, self._vm_id, request, **figures):
                log.info(
                    "%s: moved to %s (downtime %s ms)",
                    self._vm_id,
                    request.target,
                    figures.get("downtime_ms"),
                )
            self.controller.kick()
            return
        if state not in _ACTIVE:
            why = info.get("error-desc") or f"QEMU's migration ended {state}"
            await self._fail(request, f"the migration failed: {why}")
            return
        if _age(progress.started_at) > MIGRATION_TIMEOUT_SECONDS:
            with contextlib.suppress(QemuError):
                await session.migrate_cancel()
            await self._fail(
                request, f"the migration did not finish within {MIGRATION_TIMEOUT_SECONDS} s"
            )
            return
        moment = time.monotonic()
        if moment - self._last_write >= PROGRESS_WRITE_SECONDS:
            self._last_write = moment
            updated = await update_progress(self._store, self._vm_id, request.counter, **figures)
            if updated is not None:
                await self._say(status, f"migrating to {request.target}: {updated.percent}%")
        self.controller.kick_later(POLL_SECONDS)

    async def _say(self, status: VmStatus | None, reason: str) -> None:
        await self.controller._write(status, state=VmState.MIGRATING, reason=reason)


def _figures(info: dict[str, Any]) -> dict[str, Any]:
    """Progress fields of MigrationStatus from a query-migrate answer (RAM plus disks)."""
    transferred = remaining = total = 0
    for part in ("ram", "disk"):
        numbers = info.get(part)
        if isinstance(numbers, dict):
            transferred += int(numbers.get("transferred", 0))
            remaining += int(numbers.get("remaining", 0))
            total += int(numbers.get("total", 0))
    figures: dict[str, Any] = {
        "transferred_bytes": transferred,
        "remaining_bytes": remaining,
        "total_bytes": total,
    }
    if "downtime" in info:
        figures["downtime_ms"] = int(info["downtime"])
    if "total-time" in info:
        figures["total_ms"] = int(info["total-time"])
    return figures


def _outgoing_state(info: dict[str, Any], event_status: str | None) -> str:
    """The state of this QEMU's outgoing migration.

    A QEMU that was itself the target of a migration answers query-migrate with that
    incoming migration's "completed" for the rest of its life; only the source side's
    own fields tell: `downtime` appears when the outgoing migration has completed. The
    MIGRATION events since `migrate` say the rest (None: none seen, after an agent
    restart; the answer's status is then taken when it cannot be the incoming one's).
    """
    if "downtime" in info:
        return "completed"
    if event_status is not None:
        return "active" if event_status == "completed" else event_status
    status = str(info.get("status", "none"))
    return "active" if status == "completed" else status
