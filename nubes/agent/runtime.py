"""A VM's running QEMU as the agent knows it: its pid, its QMP session, the plan it was
started with (kept on disk so a restarted agent can adopt it) and what QMP told us.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydantic import Field

from nubes.agent.compute.process import ProcessState, process_state
from nubes.agent.compute.qemu_cmdline import DiskFormat, DiskPlan
from nubes.agent.compute.qmp import QmpEvent, QmpSession
from nubes.model.common import Model, now
from nubes.model.vm import Flavor


class LaunchedDisk(Model):
    node: str
    volume: str | None = Field(default=None, description="vol- id; None for the root disk")
    path: str
    format: DiskFormat
    serial: str
    port: str | None = Field(default=None, description="the hotplug port it was plugged into")

    def plan(self) -> DiskPlan:
        return DiskPlan(
            node=self.node, path=Path(self.path), format=self.format, serial=self.serial
        )


class LaunchRecord(Model):
    """What a QEMU process was started with; rewritten after each hotplug."""

    vm_id: str
    flavor: Flavor
    disks: list[LaunchedDisk]
    vnc: bool = False
    network: str | None = Field(default=None, description="vpc- id of its ports")
    netns: str | None = Field(default=None, description="the namespace QEMU runs in")
    ports: list[str] = Field(default_factory=list)
    argv: list[str]
    started_at: datetime = Field(default_factory=now)

    def attached_volumes(self) -> list[str]:
        return [disk.volume for disk in self.disks if disk.volume is not None]

    def save(self, path: Path) -> None:
        temporary = path.with_suffix(".tmp")
        temporary.write_text(self.model_dump_json(indent=2))
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: Path) -> LaunchRecord | None:
        try:
            return cls.model_validate_json(path.read_text())
        except (OSError, ValueError):
            return None


@dataclass
class VmRuntime:
    """One live QEMU process of a VM, and the events that explain how it ended."""

    pid: int
    launch: LaunchRecord
    session: QmpSession | None = None
    adopted: bool = False
    shutdown_event: QmpEvent | None = None
    panicked: bool = False
    last_event: str | None = None
    last_event_at: datetime | None = None
    # The status of the last MIGRATION event; query-migrate is no guide on a QEMU that
    # came by migration itself (it reports that incoming migration "completed" for ever).
    migration_status: str | None = None
    # When QEMU last paused (STOP) and last resumed (RESUME), as QEMU stamped them.
    paused_at: datetime | None = None
    resumed_at: datetime | None = None
    stop_requested_at: float | None = None
    quit_sent_at: float | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    started_monotonic: float = field(default_factory=time.monotonic)

    def record_event(self, event: QmpEvent) -> None:
        self.last_event = event.name
        self.last_event_at = datetime.fromtimestamp(event.timestamp, UTC)
        if event.name == "SHUTDOWN":
            self.shutdown_event = event
        elif event.name == "GUEST_PANICKED":
            self.panicked = True
        elif event.name == "STOP":
            self.paused_at = self.last_event_at
        elif event.name == "RESUME":
            self.resumed_at = self.last_event_at
        elif event.name == "MIGRATION":
            self.migration_status = str(event.data.get("status"))

    def process_alive(self) -> bool:
        return process_state(self.pid) is ProcessState.RUNNING

    @property
    def connected(self) -> bool:
        return self.session is not None and not self.closed.is_set()

    def guest_powered_off(self) -> bool:
        """The guest itself asked to power off (not QEMU killed, not us quitting it)."""
        event = self.shutdown_event
        return event is not None and bool(event.data.get("guest")) and not self.panicked

    async def close(self) -> None:
        if self.session is not None:
            with contextlib.suppress(Exception):
                await self.session.close()
