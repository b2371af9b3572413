"""A QMP session with one VM's QEMU: commands, events followed in the background, and a
prompt signal when the connection ends (QEMU exited or was killed).

Built on `qemu.qmp.QMPClient`. QEMU's QMP socket serves one client at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import (
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    Message,
    QMPClient,
    QMPError,
    Runstate,
    StateError,
)

from nubes.agent.compute.qemu_cmdline import DiskPlan, disk_device_id
from nubes.errors import QemuError

log = logging.getLogger(__name__)

_CONNECT_RETRY_INTERVAL = 0.02


class QmpCommandError(QemuError):
    """QEMU answered a command with an error; `error_class` is QEMU's (DeviceNotFound...)."""

    def __init__(self, command: str, description: str, error_class: str) -> None:
        super().__init__(f"QEMU refused {command}: {description}")
        self.command = command
        self.description = description
        self.error_class = error_class


class QmpDisconnected(QemuError):
    """The QMP connection is gone: QEMU exited, or the session was closed."""


@dataclass(frozen=True)
class QmpEvent:
    """An event QEMU sent: SHUTDOWN, RESET, STOP, RESUME, GUEST_PANICKED, DEVICE_DELETED..."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0  # seconds since the epoch, as QEMU stamped it

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> QmpEvent:
        stamp = message.get("timestamp") or {}
        return cls(
            name=str(message["event"]),
            data=dict(message.get("data") or {}),
            timestamp=stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1_000_000,
        )


class QmpSession:
    """One connection to a QEMU's QMP socket; make it with `QmpSession.connect`.

    Events go to `on_event` in the order QEMU sent them, as qemu.qmp's reader task reads
    them. When the connection ends without `close()` being called, `on_close` runs
    exactly once, after the last event; `closed` is set in every case.
    """

    def __init__(
        self,
        *,
        name: str,
        on_event: Callable[[QmpEvent], None] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._client = QMPClient(name)
        self._on_event = on_event
        self._on_close = on_close
        self._closed = asyncio.Event()
        self._closed_by_us = False
        self._ending: asyncio.Future[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        # The client's default listener queues every event and keeps all of them in its
        # history, which would grow for as long as the VM runs: a forwarder replaces it.
        default = self._client.events
        self._client.events = _EventForwarder(self._deliver)
        self._client.register_listener(self._client.events)
        self._client.remove_listener(default)

    @classmethod
    async def connect(
        cls,
        socket_path: Path,
        *,
        name: str,
        on_event: Callable[[QmpEvent], None] | None = None,
        on_close: Callable[[], None] | None = None,
        timeout: float = 5.0,
        alive: Callable[[], bool] | None = None,
    ) -> QmpSession:
        """Connects to a QMP socket, waiting up to `timeout` seconds for it to appear.

        `alive` says whether the QEMU is still there: a killed QEMU leaves a socket file
        nobody listens on, which would otherwise look like one not made yet.

        Raises:
            QemuError: nothing answered QMP there in time (no QEMU, or another client holds
                the socket), QEMU exited (per `alive`), or the handshake failed.
        """
        session = cls(name=name, on_event=on_event, on_close=on_close)
        try:
            async with asyncio.timeout(timeout):
                connected = await _connected_socket(socket_path, alive)
                await session._client.connect(connected)
        except TimeoutError as error:
            raise QemuError(
                f"no QMP answer from {name} on {socket_path} within {timeout} s",
                hint="QEMU is not running, or another client holds its QMP socket",
            ) from error
        except QMPError as error:
            raise QemuError(
                f"QMP handshake with {name} on {socket_path} failed: {error}"
            ) from error
        session._watch_task = asyncio.create_task(
            session._watch_connection(), name=f"qmp-watch-{name}"
        )
        return session

    @property
    def closed(self) -> asyncio.Event:
        """Set once the connection has ended, whoever ended it."""
        return self._closed

    async def close(self) -> None:
        """Ends the connection (QEMU keeps running); `on_close` is not called."""
        if self._ending is None:
            self._closed_by_us = True
        await self._end()
        if self._watch_task is not None:
            # The watcher ends by itself once the client is idle; this is for certainty.
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task

    async def __aenter__(self) -> QmpSession:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # Commands

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Runs a QMP command and returns what QEMU answered.

        Raises:
            QmpCommandError: QEMU answered with an error (its description is the message).
            QmpDisconnected: the connection is closed, or closed before the answer came.
        """
        if self._closed.is_set() or self._client.runstate is not Runstate.RUNNING:
            raise QmpDisconnected(f"QMP connection to {self.name} is closed ({command})")
        try:
            return await self._client.execute(command, arguments)
        except ExecuteError as error:
            raise QmpCommandError(command, str(error), error.error_class) from error
        except (ExecInterruptedError, StateError) as error:
            raise QmpDisconnected(
                f"QMP connection to {self.name} closed during {command}"
            ) from error
        except QMPError as error:
            raise QemuError(f"QMP {command} to {self.name} failed: {error}") from error

    async def query_status(self) -> str:
        """QEMU's run state: running, paused, shutdown, internal-error, inmigrate..."""
        result = await self.execute("query-status")
        return str(result["status"])

    async def system_powerdown(self) -> None:
        """Presses the ACPI power button; the guest decides what to do about it."""
        await self.execute("system_powerdown")

    async def system_reset(self) -> None:
        await self.execute("system_reset")

    async def stop(self) -> None:
        await self.execute("stop")

    async def cont(self) -> None:
        await self.execute("cont")

    async def quit(self) -> None:
        """Ends QEMU. QEMU may close the connection before it answers: that is success too,
        and so is a connection QEMU has already closed.

        Raises:
            QmpDisconnected: this session was closed with `close()`.
        """
        if self._closed.is_set() and not self._closed_by_us:
            return
        try:
            await self.execute("quit")
        except QmpDisconnected:
            if self._closed_by_us:
                raise

    # Migration

    async def pass_socket(self, connection: socket.socket, name: str) -> None:
        """Hands a connected socket to QEMU as fd `name` (SCM_RIGHTS, then `getfd`).

        QEMU may run in a network namespace that cannot reach where the socket leads; the
        descriptor works wherever it was made. Our copy stays open: close it after.

        Raises:
            QmpCommandError: QEMU refused the descriptor.
            QmpDisconnected: the connection is closed.
        """
        if self._closed.is_set() or self._client.runstate is not Runstate.RUNNING:
            raise QmpDisconnected(f"QMP connection to {self.name} is closed (getfd)")
        with contextlib.suppress(QmpCommandError):
            await self.execute("closefd", {"fdname": name})  # left by an earlier attempt
        try:
            self._client.send_fd_scm(connection.fileno())
        except (QMPError, OSError) as error:
            raise QemuError(f"passing a socket to {self.name} failed: {error}") from error
        await self.execute("getfd", {"fdname": name})

    async def prepare_migration(self, *, downtime_ms: int, bandwidth: int) -> None:
        """Sets what a migration from this QEMU may do: the longest pause the guest may
        see at the switch and the bandwidth (bytes/s); MIGRATION events on.

        Disks do not travel: both ends must open the same files (a shared pool). QEMU's
        old `block` capability cannot serve: it names disks by their BlockBackend, and
        -blockdev disks have anonymous ones (the target fails "unknown block device").
        """
        await self.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "events", "state": True}]},
        )
        parameters = {"downtime-limit": downtime_ms, "max-bandwidth": bandwidth}
        await self.execute("migrate-set-parameters", parameters)

    async def migrate(self, uri: str) -> None:
        """Starts sending the VM's state to `uri` (`fd:<name>` after `pass_socket`)."""
        await self.execute("migrate", {"uri": uri})

    async def migrate_incoming(self, uri: str) -> None:
        """Starts receiving a VM's state on a QEMU started with `-incoming defer`."""
        await self.execute("migrate-incoming", {"uri": uri})

    async def migrate_cancel(self) -> None:
        await self.execute("migrate_cancel")

    async def query_migrate(self) -> dict[str, Any]:
        """QEMU's `query-migrate`: status (none, setup, active, completed, failed,
        cancelled...), ram/disk byte counts, downtime and total-time in ms."""
        result = await self.execute("query-migrate")
        return dict(result) if isinstance(result, Mapping) else {}

    # Volumes

    async def attach_disk(self, disk: DiskPlan, port: str | None) -> None:
        """Hotplugs a disk as a virtio-blk device; nothing stays half-made.

        `port` is a free root port of a q35 machine (`qemu_cmdline.hotplug_port`); None
        lets QEMU choose a slot, which is what a `pc` machine (no root ports) needs.
        Attaching a disk that is already attached with the same file does nothing.

        Raises:
            QmpCommandError: QEMU refused (file missing or locked, port taken...).
            QemuError: the node is attached with another file.
        """
        attached = await self.attached_disks()
        if disk.node in attached:
            if attached[disk.node] == str(disk.path):
                return
            raise QemuError(
                f"disk {disk.node} of {self.name} is attached with {attached[disk.node]}, "
                f"not {disk.path}"
            )
        if disk.node in await self.block_nodes():
            # Left by an attach that was interrupted between its two steps.
            await self.execute("blockdev-del", {"node-name": disk.node})
        device = {
            "driver": "virtio-blk-pci",
            "drive": disk.node,
            "id": disk_device_id(disk.node),
            "serial": disk.serial,
        }
        if port is not None:
            device["bus"] = port
        await self.execute("blockdev-add", _blockdev_arguments(disk))
        try:
            await self.execute("device_add", device)
        except QemuError:
            with contextlib.suppress(QemuError):
                await self.execute("blockdev-del", {"node-name": disk.node})
            raise

    async def detach_disk(self, node: str, timeout: float) -> None:
        """Unplugs a disk: the guest must release the device, then its block node goes.

        Detaching a disk that is not attached does nothing; after a timeout the unplug
        request stays with the guest and calling this again waits for it anew.

        Raises:
            QemuError: the guest did not release the disk within `timeout` seconds.
            QmpCommandError, QmpDisconnected: as for `execute`.
        """
        device = disk_device_id(node)
        deleted = EventListener("DEVICE_DELETED", _for_device(device))
        with self._client.listen(deleted):
            if await self._request_unplug(device):
                try:
                    await self._next_event(deleted, timeout)
                except TimeoutError:
                    raise QemuError(
                        f"the guest of {self.name} did not release disk {node} within {timeout} s",
                        hint="the guest must support hotplug and not hold the disk busy; "
                        "the unplug request stays pending",
                    ) from None
        if node in await self.block_nodes():
            await self.execute("blockdev-del", {"node-name": node})

    async def attached_disks(self) -> dict[str, str]:
        """Block node -> file of every disk a guest device uses."""
        disks: dict[str, str] = {}
        for device in await self.execute("query-block"):
            inserted = device.get("inserted")
            if inserted and inserted.get("node-name"):
                disks[inserted["node-name"]] = inserted["file"]
        return disks

    async def block_nodes(self) -> set[str]:
        """The names of the named block nodes (QEMU's own `#block...` names left out)."""
        nodes = await self.execute("query-named-block-nodes", {"flat": True})
        return {node["node-name"] for node in nodes if not node["node-name"].startswith("#")}

    async def block_resize(self, node: str, size_bytes: int) -> None:
        """Grows a disk while the guest runs (qcow2 and raw)."""
        await self.execute("block_resize", {"node-name": node, "size": size_bytes})

    async def snapshot_create(self, node: str, name: str) -> None:
        """An internal snapshot of a qcow2 disk the VM holds open."""
        await self.execute("blockdev-snapshot-internal-sync", {"device": node, "name": name})

    async def snapshot_delete(self, node: str, name: str) -> None:
        await self.execute("blockdev-snapshot-delete-internal-sync", {"device": node, "name": name})

    async def snapshots(self, node: str) -> list[str]:
        """The names of the internal snapshots of a disk, oldest first."""
        for info in await self.execute("query-named-block-nodes", {"flat": True}):
            if info["node-name"] == node:
                return [snapshot["name"] for snapshot in info["image"].get("snapshots", [])]
        raise QemuError(f"{self.name} has no block node {node}")

    # Internals

    async def _request_unplug(self, device: str) -> bool:
        """Asks for a device's removal; False when it is already gone."""
        try:
            await self.execute("device_del", {"id": device})
        except QmpCommandError as error:
            if error.error_class == "DeviceNotFound":
                return False
            # PCIe native hotplug refuses a second request while the first is pending.
            if "in the process of unplug" not in error.description:
                raise
        return True

    async def _next_event(self, listener: EventListener, timeout: float) -> QmpEvent:
        """The next event of `listener`, unless the connection ends first.

        Raises:
            TimeoutError: none came within `timeout` seconds.
            QmpDisconnected: the connection ended first.
        """
        async with asyncio.timeout(timeout):
            waiting = asyncio.ensure_future(listener.get())
            closing = asyncio.ensure_future(self._closed.wait())
            try:
                await asyncio.wait((waiting, closing), return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiting.cancel()
                closing.cancel()
            if not waiting.cancelled() and waiting.done():
                return QmpEvent.from_message(waiting.result())
        raise QmpDisconnected(f"QMP connection to {self.name} closed while waiting for an event")

    def _deliver(self, message: Mapping[str, Any]) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(QmpEvent.from_message(message))
        except Exception:
            log.exception("QMP event handler of %s failed", self.name)

    async def _watch_connection(self) -> None:
        # The reader gets EOF the moment QEMU's end of the socket closes; qemu.qmp then
        # leaves RUNNING (for DISCONNECTING) until someone calls disconnect().
        while self._client.runstate is Runstate.RUNNING:
            await self._client.runstate_changed()
        await self._end()

    async def _end(self) -> None:
        if self._ending is None:
            self._ending = asyncio.ensure_future(self._shut_down())
        await asyncio.shield(self._ending)

    async def _shut_down(self) -> None:
        by_us = self._closed_by_us
        with contextlib.suppress(Exception):
            # Re-raises what ended the reader: EOFError, ConnectionResetError...
            await self._client.disconnect()
        self._closed.set()
        if not by_us and self._on_close is not None:
            try:
                self._on_close()
            except Exception:
                log.exception("QMP close handler of %s failed", self.name)


class _EventForwarder(EventListener):
    """Hands each event to a callback as it is read: nothing queued, no history kept."""

    def __init__(self, deliver: Callable[[Message], None]) -> None:
        super().__init__()
        self._deliver = deliver

    async def put(self, event: Message) -> None:
        if self.accept(event):
            self._deliver(event)


async def _connected_socket(path: Path, alive: Callable[[], bool] | None) -> socket.socket:
    """A socket connected to `path`, retried while QEMU has not created it yet.

    Connecting ourselves keeps qemu.qmp from logging an error for every early attempt.
    """
    loop = asyncio.get_running_loop()
    while True:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.setblocking(False)
        try:
            await loop.sock_connect(connection, str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            connection.close()
            if alive is not None and not alive():
                raise QemuError(f"QEMU exited before its QMP socket at {path} answered") from None
            await asyncio.sleep(_CONNECT_RETRY_INTERVAL)
            continue
        except BaseException:
            connection.close()
            raise
        return connection


def _for_device(device: str) -> Callable[[Message], bool]:
    def matches(event: Message) -> bool:
        data = event.get("data")
        return isinstance(data, Mapping) and data.get("device") == device

    return matches


def _blockdev_arguments(disk: DiskPlan) -> dict[str, Any]:
    """blockdev-add's form of `qemu_cmdline.blockdev_options`: the same fields, as JSON."""
    return {
        "driver": disk.format.value,
        "node-name": disk.node,
        "file": {"driver": "file", "filename": str(disk.path), "aio": "threads"},
        "cache": {"direct": False},
        "read-only": disk.read_only,
        "discard": "unmap",
    }
