"""The usage report: a project's usage intervals clipped to a period and added up (pure).

VMs count in minutes per flavor (with vCPU-minutes and GiB-of-memory-minutes), volumes
in GiB-hours, floating IPs in hours. An open interval counts up to the earlier of the
period's end and now; nothing counts before the period's start or from its end on.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, time
from enum import StrEnum

from pydantic import Field

from nubes.errors import InvalidInput
from nubes.metering.interval import MeteredKind, UsageInterval
from nubes.model.common import Model


class Unit(StrEnum):
    VM_MINUTES = "vm-minutes"
    GIB_HOURS = "gib-hours"
    HOURS = "hours"


class FlavorUsage(Model):
    flavor: str
    vcpus: int
    memory_mb: int
    minutes: float


class VmUsage(Model):
    minutes: float = 0.0
    vcpu_minutes: float = 0.0
    memory_gib_minutes: float = 0.0
    flavors: list[FlavorUsage] = Field(default_factory=list, description="by flavor name")


class VolumeUsage(Model):
    gib_hours: float = 0.0


class FloatingIpUsage(Model):
    hours: float = 0.0


class ResourceUsage(Model):
    """One resource on one set of terms (a resized volume has a line per size)."""

    resource: str
    kind: MeteredKind
    flavor: str | None = None
    size_gb: int | None = None
    seconds: float
    quantity: float = Field(description="in `unit`")
    unit: Unit
    running: bool = Field(description="still counting at the end of the period or now")


class UsageReport(Model):
    project: str
    start: datetime = Field(description="the period's start (`from`), included")
    end: datetime = Field(description="the period's end (`to`), excluded")
    vms: VmUsage
    volumes: VolumeUsage
    floating_ips: FloatingIpUsage
    resources: list[ResourceUsage]


def summarize(
    project: str,
    intervals: Iterable[UsageInterval],
    start: datetime,
    end: datetime,
    now: datetime,
) -> UsageReport:
    """Adds up `intervals` within [start, end), open ones up to min(end, now)."""
    flavors: dict[tuple[str, int, int], float] = {}
    lines: dict[tuple[str, MeteredKind, str | None, int | None], list[float]] = {}
    running: set[tuple[str, MeteredKind, str | None, int | None]] = set()
    vm_seconds = vcpu_seconds = memory_gib_seconds = gib_seconds = fip_seconds = 0.0
    for interval in intervals:
        finish = interval.ended_at if interval.ended_at is not None else min(end, now)
        seconds = (min(finish, end) - max(interval.started_at, start)).total_seconds()
        if seconds <= 0:
            continue
        flavor = interval.flavor
        line = (
            interval.resource,
            interval.kind,
            flavor.name if flavor else None,
            interval.size_gb,
        )
        if interval.kind is MeteredKind.VM and flavor is not None:
            size = (flavor.name, flavor.vcpus, flavor.memory_mb)
            flavors[size] = flavors.get(size, 0.0) + seconds
            vm_seconds += seconds
            vcpu_seconds += seconds * flavor.vcpus
            memory_gib_seconds += seconds * flavor.memory_mb / 1024
            lines.setdefault(line, [0.0, 1 / 60])
        elif interval.kind is MeteredKind.VOLUME:
            gib_seconds += seconds * (interval.size_gb or 0)
            lines.setdefault(line, [0.0, (interval.size_gb or 0) / 3600])
        else:
            fip_seconds += seconds
            lines.setdefault(line, [0.0, 1 / 3600])
        lines[line][0] += seconds
        if interval.ended_at is None and finish > start:
            running.add(line)
    units = {
        MeteredKind.VM: Unit.VM_MINUTES,
        MeteredKind.VOLUME: Unit.GIB_HOURS,
        MeteredKind.FLOATING_IP: Unit.HOURS,
    }
    return UsageReport(
        project=project,
        start=start,
        end=end,
        vms=VmUsage(
            minutes=_round(vm_seconds / 60),
            vcpu_minutes=_round(vcpu_seconds / 60),
            memory_gib_minutes=_round(memory_gib_seconds / 60),
            flavors=[
                FlavorUsage(flavor=name, vcpus=vcpus, memory_mb=memory, minutes=_round(s / 60))
                for (name, vcpus, memory), s in sorted(flavors.items())
            ],
        ),
        volumes=VolumeUsage(gib_hours=_round(gib_seconds / 3600)),
        floating_ips=FloatingIpUsage(hours=_round(fip_seconds / 3600)),
        resources=[
            ResourceUsage(
                resource=resource,
                kind=kind,
                flavor=flavor_name,
                size_gb=size_gb,
                seconds=_round(seconds),
                quantity=_round(seconds * per_second),
                unit=units[kind],
                running=(resource, kind, flavor_name, size_gb) in running,
            )
            for (resource, kind, flavor_name, size_gb), (seconds, per_second) in sorted(
                lines.items(), key=lambda item: (item[0][1], item[0][0], str(item[0][2:]))
            )
        ],
    )


def _round(value: float) -> float:
    return round(value, 6)


def month_start(moment: datetime) -> datetime:
    """Midnight UTC of the first day of `moment`'s month: the default start of a period."""
    return datetime(moment.year, moment.month, 1, tzinfo=UTC)


def parse_moment(text: str, now: datetime, what: str) -> datetime:
    """A moment a user wrote: `now`, a date (`2026-11-01`: its midnight, UTC) or an ISO
    8601 time (UTC unless it names an offset).

    Raises:
        InvalidInput: it is none of these; `what` names the option in the message.
    """
    text = text.strip()
    if text.lower() == "now":
        return now
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time(), tzinfo=UTC)
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise InvalidPeriod(
            f"{what} {text!r} is not a date or time",
            hint="write a date (2026-11-01), an ISO 8601 time (2026-11-01T08:00:00Z) or `now`",
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def check_period(start: datetime, end: datetime) -> None:
    """Raises InvalidPeriod unless `start` comes before `end`."""
    if start >= end:
        raise InvalidPeriod(
            f"the period's start ({start.isoformat()}) is not before its end ({end.isoformat()})",
            hint="give `from` earlier than `to` (by default `from` is the first of this month)",
        )


class InvalidPeriod(InvalidInput):
    """A usage period a user wrote is not a date, or ends before it starts (a field error)."""

    http_status = 422
