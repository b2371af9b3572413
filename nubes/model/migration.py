"""Moving a VM to another host: the request in the VM's spec, and the progress record
(`/nubes/vms/<id>/migration`) the two agents write while they carry it out.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

from nubes.model.common import Model

HOST_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


class MigrationRequest(Model):
    """`spec.migration`: move the VM to `target`; set by the API, cleared by the switch
    (or by a rollback). `counter` tells one request from the next."""

    target: str = Field(pattern=HOST_NAME_PATTERN)
    source: str = Field(pattern=HOST_NAME_PATTERN)
    live: bool = True
    counter: int = Field(default=1, ge=1)


class MigrationState(StrEnum):
    PREPARING = "preparing"  # the target makes its incoming QEMU (or disk copies) ready
    READY = "ready"  # the target listens on `address`:`port`
    RUNNING = "running"  # the source streams its state (or the target copies the disks)
    COMPLETED = "completed"  # the VM is bound to the target
    FAILED = "failed"  # rolled back: the VM stays on the source

    @property
    def finished(self) -> bool:
        return self in (MigrationState.COMPLETED, MigrationState.FAILED)


class MigrationStatus(Model):
    """Written by the agents of both ends with compare-and-swap; the API makes it."""

    counter: int = Field(ge=1, description="the spec.migration.counter it reports on")
    state: MigrationState
    live: bool = True
    source: str
    target: str
    address: str | None = Field(default=None, description="underlay address of the incoming side")
    port: int | None = Field(default=None, ge=1, le=65535)
    disk_paths: list[str] = Field(
        default_factory=list, description="the target's disk files (equal paths: shared storage)"
    )
    transferred_bytes: int = 0
    remaining_bytes: int = 0
    total_bytes: int = 0
    downtime_ms: int | None = Field(default=None, description="as QEMU measured it")
    total_ms: int | None = None
    paused_at: datetime | None = Field(default=None, description="the source QEMU's STOP event")
    resumed_at: datetime | None = Field(
        default=None, description="the target QEMU's RESUME event (written after the switch)"
    )
    reason: str | None = Field(default=None, description="why it failed")
    started_at: datetime
    updated_at: datetime

    @property
    def paused_ms(self) -> int | None:
        """How long the guest stood still, from the two QEMUs' own event stamps."""
        if self.paused_at is None or self.resumed_at is None:
            return None
        return round((self.resumed_at - self.paused_at).total_seconds() * 1000)

    @property
    def percent(self) -> int:
        """How much of the state is across, 0 to 100 (an estimate while memory is dirtied)."""
        if self.state is MigrationState.COMPLETED:
            return 100
        if self.total_bytes <= 0:
            return 0
        done = self.total_bytes - self.remaining_bytes
        return max(0, min(99, done * 100 // self.total_bytes))
