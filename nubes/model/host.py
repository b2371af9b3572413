"""The host record: what an agent tells the cluster about the machine it runs on."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

from nubes.model.common import Model


class HostCapacity(Model):
    vcpus: int = Field(ge=1)
    memory_mb: int = Field(ge=1)
    disk_gb: int = Field(ge=0)


class HostRecord(Model):
    """Written by the host's agent at start; its lease-bound `alive` key says it still runs."""

    name: str
    capacity: HostCapacity
    accel: str
    labels: dict[str, str] = Field(default_factory=dict)
    underlay_address: str | None = None
    storage_pools: list[str] = Field(
        default_factory=list, description="the shared storage pools this host mounts"
    )
    agent_version: str
    boot_id: str
    started_at: datetime


class HostLiveness(StrEnum):
    UP = "up"
    DOWN = "down"


class HostStatus(Model):
    """Written by the scheduler's host monitor at `/nubes/hosts/<name>/status`: whether
    the host's heartbeat is there, since when, and why it is down."""

    state: HostLiveness
    since: datetime
    reason: str | None = None
