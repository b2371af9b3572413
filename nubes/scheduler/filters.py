"""Which hosts can take a VM: pure filters over a snapshot of hosts and what they run.

Each filter answers None (the host passes) or a short reason; the reasons of the hosts
that failed are counted, so a VM no host can take is told why in one line.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from nubes.config import SchedulerConfig
from nubes.model.host import HostCapacity
from nubes.model.vm import VmSpec


@dataclass(frozen=True)
class Overcommit:
    """How far the sum of the VMs' sizes may exceed a host's real capacity."""

    cpu: float = 4.0
    memory: float = 1.0
    disk: float = 1.0

    @classmethod
    def of(cls, config: SchedulerConfig) -> Overcommit:
        """The overcommit a scheduler configuration allows."""
        return cls(
            cpu=config.cpu_overcommit, memory=config.memory_overcommit, disk=config.disk_overcommit
        )


@dataclass(frozen=True)
class HostState:
    """One host as the scheduler sees it: its record, liveness and what is bound to it."""

    name: str
    alive: bool
    capacity: HostCapacity
    labels: Mapping[str, str] = field(default_factory=dict)
    used_vcpus: int = 0
    used_memory_mb: int = 0
    used_disk_gb: int = 0
    anti_affinity_groups: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PlacementRequest:
    """What one VM needs from its host."""

    vcpus: int
    memory_mb: int
    disk_gb: int
    labels: Mapping[str, str] = field(default_factory=dict)
    anti_affinity_group: str | None = None

    @classmethod
    def of(cls, spec: VmSpec) -> PlacementRequest:
        """What the VM `spec` describes needs: its flavor, host labels and anti-affinity."""
        return cls(
            vcpus=spec.flavor.vcpus,
            memory_mb=spec.flavor.memory_mb,
            disk_gb=spec.flavor.disk_gb,
            labels=spec.host_labels,
            anti_affinity_group=spec.anti_affinity_group,
        )


Filter = Callable[[HostState, PlacementRequest, Overcommit], str | None]


def host_alive(host: HostState, request: PlacementRequest, overcommit: Overcommit) -> str | None:
    return None if host.alive else "down"


def enough_vcpus(host: HostState, request: PlacementRequest, overcommit: Overcommit) -> str | None:
    limit = host.capacity.vcpus * overcommit.cpu
    return None if host.used_vcpus + request.vcpus <= limit else "not enough vCPUs"


def enough_memory(host: HostState, request: PlacementRequest, overcommit: Overcommit) -> str | None:
    limit = host.capacity.memory_mb * overcommit.memory
    return None if host.used_memory_mb + request.memory_mb <= limit else "not enough memory"


def enough_disk(host: HostState, request: PlacementRequest, overcommit: Overcommit) -> str | None:
    limit = host.capacity.disk_gb * overcommit.disk
    return None if host.used_disk_gb + request.disk_gb <= limit else "not enough disk"


def matching_labels(
    host: HostState, request: PlacementRequest, overcommit: Overcommit
) -> str | None:
    missing = [k for k, v in request.labels.items() if host.labels.get(k) != v]
    return None if not missing else "labels do not match"


def anti_affinity(host: HostState, request: PlacementRequest, overcommit: Overcommit) -> str | None:
    group = request.anti_affinity_group
    if group is None or group not in host.anti_affinity_groups:
        return None
    return f"runs a VM of anti-affinity group {group}"


DEFAULT_FILTERS: tuple[Filter, ...] = (
    host_alive,
    matching_labels,
    anti_affinity,
    enough_vcpus,
    enough_memory,
    enough_disk,
)


def passing_hosts(
    hosts: Iterable[HostState],
    request: PlacementRequest,
    overcommit: Overcommit,
    filters: tuple[Filter, ...] = DEFAULT_FILTERS,
) -> tuple[list[HostState], Counter[str]]:
    """The hosts every filter passes, and how many hosts each reason turned away (a
    host counts once, for the first filter it fails)."""
    passing: list[HostState] = []
    refused: Counter[str] = Counter()
    for host in hosts:
        reason = next((r for f in filters if (r := f(host, request, overcommit))), None)
        if reason is None:
            passing.append(host)
        else:
            refused[reason] += 1
    return passing, refused


def explain(refused: Counter[str], request: PlacementRequest) -> str:
    """One line saying why no host could take the VM."""
    if not refused:
        return "no host is registered; start an agent on a host first"
    parts = ", ".join(
        f"{count} host{'s' if count > 1 else ''}: {reason}"
        for reason, count in sorted(refused.items(), key=lambda item: (-item[1], item[0]))
    )
    size = f"{request.vcpus} vCPUs, {request.memory_mb} MiB, {request.disk_gb} GB"
    return f"no host can take this VM ({size}): {parts}"
