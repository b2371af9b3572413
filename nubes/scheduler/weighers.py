"""Which of the passing hosts gets the VM: spread (the emptiest) or pack (the fullest)."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from nubes.scheduler.filters import HostState, Overcommit, PlacementRequest


class Strategy(StrEnum):
    SPREAD = "spread"  # balance load: the host with the most room left after the VM
    PACK = "pack"  # keep hosts free: the host with the least room left that still fits


def room_after(host: HostState, request: PlacementRequest, overcommit: Overcommit) -> float:
    """The smallest share of vCPUs, memory and disk the host has left after taking the VM."""
    shares = []
    for used, asked, capacity, ratio in (
        (host.used_vcpus, request.vcpus, host.capacity.vcpus, overcommit.cpu),
        (host.used_memory_mb, request.memory_mb, host.capacity.memory_mb, overcommit.memory),
        (host.used_disk_gb, request.disk_gb, host.capacity.disk_gb, overcommit.disk),
    ):
        limit = capacity * ratio
        shares.append(1.0 - (used + asked) / limit if limit > 0 else 0.0)
    return min(shares)


def best_host(
    hosts: Sequence[HostState],
    request: PlacementRequest,
    overcommit: Overcommit,
    strategy: Strategy,
) -> HostState | None:
    """The passing host the strategy prefers; ties go to the first name, so a decision
    is the same for the same snapshot."""
    if not hosts:
        return None
    sign = -1.0 if strategy is Strategy.SPREAD else 1.0
    return min(hosts, key=lambda h: (sign * room_after(h, request, overcommit), h.name))
