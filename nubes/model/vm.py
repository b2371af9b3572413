"""The VM record: what the user wants (spec), what the agent sees (status), and the
one table of state transitions the status may take.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

from nubes.model.common import NAME_PATTERN, Model
from nubes.model.migration import MigrationRequest

MAX_VCPUS = 64
MAX_MEMORY_MB = 1024 * 1024


class Flavor(Model):
    """The size of a VM, copied into its spec when it is made (as Nova embeds it)."""

    name: str = Field(pattern=NAME_PATTERN)
    vcpus: int = Field(ge=1, le=MAX_VCPUS)
    memory_mb: int = Field(ge=32, le=MAX_MEMORY_MB)
    disk_gb: int = Field(ge=0, le=16 * 1024, description="root disk; 0 keeps the image's size")


class PowerState(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"


class RestartPolicy(StrEnum):
    """What the agent does when a VM ends without being asked to."""

    ALWAYS = "always"  # after a crash and after the guest powers itself off
    ON_FAILURE = "on-failure"  # after a crash only
    NEVER = "never"


class VmSpec(Model):
    name: str = Field(pattern=NAME_PATTERN)
    host: str | None = Field(default=None, description="bound by the scheduler")
    flavor: Flavor
    image: str | None = Field(default=None, description="img- id of the root disk")
    volumes: list[str] = Field(
        default_factory=list, max_length=16, description="vol- ids, attached in this order"
    )
    ports: list[str] = Field(default_factory=list, max_length=8)
    key_names: list[str] = Field(default_factory=list)
    user_data: str | None = Field(default=None, max_length=64 * 1024)
    power_state: PowerState = PowerState.RUNNING
    start_counter: int = Field(default=0, ge=0, description="bumped by every start request")
    reboot_counter: int = Field(default=0, ge=0, description="bumped by every reboot request")
    soft_stop_timeout: float | None = Field(
        default=None, ge=0, le=3600, description="seconds before a stop turns hard; 0 = force"
    )
    restart_policy: RestartPolicy = RestartPolicy.ON_FAILURE
    autostart: bool = Field(default=True, description="start again after the host reboots")
    cpu_weight: int = Field(default=100, ge=1, le=10_000, description="cgroup cpu.weight")
    vnc: bool = False
    host_labels: dict[str, str] = Field(
        default_factory=dict, description="the scheduler only picks hosts with these labels"
    )
    anti_affinity_group: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        description="never on a host that runs another VM of this group",
    )
    storage_pool: str = Field(
        default="local", pattern=NAME_PATTERN, description="the storage pool of the root disk"
    )
    ha: bool = Field(
        default=False,
        description="restart on another host when its host dies; needs every disk on a shared pool",
    )
    migration: MigrationRequest | None = Field(
        default=None, description="a move to another host under way (set by the API)"
    )


class VmRecord(Model):
    id: str
    project: str = "default"
    spec: VmSpec
    deleting: bool = False
    created_at: datetime


class VmState(StrEnum):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    BUILDING = "building"
    RUNNING = "running"
    STOPPED = "stopped"
    CRASHED = "crashed"
    MIGRATING = "migrating"
    DELETING = "deleting"
    ERROR = "error"


_S = VmState
TRANSITIONS: dict[VmState, frozenset[VmState]] = {
    _S.PENDING: frozenset({_S.SCHEDULED, _S.ERROR, _S.DELETING}),
    _S.SCHEDULED: frozenset({_S.PENDING, _S.BUILDING, _S.STOPPED, _S.ERROR, _S.DELETING}),
    _S.BUILDING: frozenset({_S.RUNNING, _S.STOPPED, _S.CRASHED, _S.ERROR, _S.DELETING}),
    _S.RUNNING: frozenset({_S.STOPPED, _S.CRASHED, _S.MIGRATING, _S.ERROR, _S.DELETING}),
    _S.STOPPED: frozenset({_S.BUILDING, _S.RUNNING, _S.ERROR, _S.DELETING}),
    _S.CRASHED: frozenset({_S.BUILDING, _S.RUNNING, _S.STOPPED, _S.ERROR, _S.DELETING}),
    _S.MIGRATING: frozenset({_S.RUNNING, _S.STOPPED, _S.CRASHED, _S.ERROR, _S.DELETING}),
    _S.ERROR: frozenset({_S.BUILDING, _S.RUNNING, _S.STOPPED, _S.DELETING}),
    _S.DELETING: frozenset({_S.ERROR}),
}


class IllegalTransition(ValueError):
    """A bug: code tried to move a VM's status along an edge the table does not have."""


def check_transition(current: VmState, target: VmState) -> None:
    """Refuses a status change the table does not allow (staying put is always allowed).

    Raises:
        IllegalTransition: `current` cannot become `target`.
    """
    if current != target and target not in TRANSITIONS[current]:
        raise IllegalTransition(f"a VM cannot go from {current} to {target}")


class VmStatus(Model):
    """Written by the agent of the VM's host, only by it, with compare-and-swap."""

    state: VmState
    reason: str | None = Field(default=None, description="why it is in error, crashed or waiting")
    host: str | None = None
    pid: int | None = None
    qemu_status: str | None = Field(default=None, description="QMP query-status: running, paused")
    flavor: Flavor | None = Field(default=None, description="the size the QEMU process runs with")
    attached_volumes: list[str] = Field(default_factory=list)
    reboot_counter: int = Field(default=0, description="the last reboot request carried out")
    halted_start_counter: int | None = Field(
        default=None,
        description="the guest powered off (or the host rebooted) during this start; "
        "it stays stopped until the next start request",
    )
    restarts: int = Field(default=0, description="restarts after crashes")
    cpu_weight: int | None = Field(default=None, description="applied through the cgroup")
    resize_pending: bool = Field(
        default=False, description="the spec's flavor differs; it applies at the next start"
    )
    last_event: str | None = Field(default=None, description="the last QMP event QEMU sent")
    last_event_at: datetime | None = Field(default=None, description="when QEMU sent it")
    updated_at: datetime
