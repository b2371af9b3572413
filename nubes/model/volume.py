"""The volume record: a qcow2 disk on one host, its snapshots, and what its agent sees."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

from nubes.model.common import NAME_PATTERN, Model

MAX_VOLUME_GB = 16 * 1024


class VolumeRevert(Model):
    """A request to roll the volume back to a snapshot; `counter` makes each request distinct."""

    snapshot: str = Field(pattern=NAME_PATTERN)
    counter: int = Field(ge=1)


class VolumeSpec(Model):
    name: str = Field(pattern=NAME_PATTERN)
    size_gb: int = Field(ge=1, le=MAX_VOLUME_GB, description="grows only")
    image: str | None = Field(default=None, description="img- id the volume starts from")
    host: str | None = Field(
        default=None,
        description="the host that keeps the file (on a shared pool: the host whose agent "
        "manages it, the host of its VM)",
    )
    pool: str = Field(default="local", pattern=NAME_PATTERN, description="its storage pool")
    snapshots: list[str] = Field(
        default_factory=list, description="snapshot names wanted; the agent makes it so"
    )
    revert: VolumeRevert | None = None


class VolumeRecord(Model):
    id: str
    project: str = "default"
    spec: VolumeSpec
    deleting: bool = False
    created_at: datetime


class VolumeState(StrEnum):
    CREATING = "creating"
    AVAILABLE = "available"
    IN_USE = "in-use"
    DELETING = "deleting"
    ERROR = "error"


class SnapshotInfo(Model):
    name: str
    created_at: datetime
    vm_state: bool = Field(default=False, description="holds a running VM's memory too")


class VolumeStatus(Model):
    state: VolumeState
    reason: str | None = None
    host: str
    size_gb: int = 0
    attached_to: str | None = None
    snapshots: list[SnapshotInfo] = Field(default_factory=list)
    revert_counter: int = 0
    updated_at: datetime
