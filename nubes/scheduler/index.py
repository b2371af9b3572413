"""The scheduler's live picture of the hosts: capacity, liveness and what each runs,
indexed by free room so that a placement looks at a few hosts, not all of them.

Unlabelled requests take hosts from a heap ordered by free share (spread: most free
first; pack: least free first) and weigh the first `candidates` hosts that pass every
filter; labelled requests scan the hosts carrying their labels. Filters are the ones of
`filters.py`, so a chosen host always passes them all; only the weighing is bounded.
"""

from __future__ import annotations

import heapq
import logging
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from nubes.model.host import HostRecord
from nubes.scheduler.filters import (
    HostState,
    Overcommit,
    PlacementRequest,
    explain,
    passing_hosts,
)
from nubes.scheduler.weighers import Strategy, room_after
from nubes.store.base import JsonValue, KeyValue

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = 8
# The smallest VM a flavor allows (model/vm.py): a host without this much left is full.
MIN_VCPUS = 1
MIN_MEMORY_MB = 32

Usage = tuple[int, int, int, str | None]  # vCPUs, MiB, GB, anti-affinity group


def parse_allocations(value: JsonValue) -> dict[str, Usage]:
    """The VMs of an allocations document with their sizes (a fast, strict reader).

    Raises:
        ValueError: the document is not an allocations record.
    """
    if not isinstance(value, dict) or not isinstance(value.get("vms", {}), dict):
        raise ValueError("an allocations record is {'vms': {vm id: allocation}}")
    parsed: dict[str, Usage] = {}
    for vm_id, entry in value.get("vms", {}).items():
        try:
            vcpus, memory, disk = entry["vcpus"], entry["memory_mb"], entry["disk_gb"]
            group = entry.get("anti_affinity_group")
        except (TypeError, KeyError, AttributeError):
            raise ValueError(f"allocation of {vm_id} lacks its sizes") from None
        if not all(type(n) is int for n in (vcpus, memory, disk)) or not (
            group is None or isinstance(group, str)
        ):
            raise ValueError(f"allocation of {vm_id} has sizes that are not integers")
        parsed[vm_id] = (vcpus, memory, disk, group)
    return parsed


def allocation_document(usage: Usage) -> dict[str, JsonValue]:
    """The stored form of one VM's allocation (as `binding.Allocation` dumps it)."""
    vcpus, memory, disk, group = usage
    return {"vcpus": vcpus, "memory_mb": memory, "disk_gb": disk, "anti_affinity_group": group}


@dataclass(slots=True)
class HostEntry:
    """One host as the index knows it; `held` are VMs placed in a transaction in flight."""

    name: str
    record: HostRecord | None = None
    alive: bool = False
    allocations_kv: KeyValue | None = None
    stored: dict[str, Usage] = field(default_factory=dict)
    readable: bool = True
    held: dict[str, Usage] = field(default_factory=dict)
    used: list[int] = field(default_factory=lambda: [0, 0, 0])
    groups: Counter[str] = field(default_factory=Counter)
    version: int = 0
    limits: tuple[float, float, float] = (0.0, 0.0, 0.0)  # capacity times overcommit
    _state: HostState | None = None

    def recount(self) -> None:
        used = [0, 0, 0]
        groups: Counter[str] = Counter()
        held = [u for v, u in self.held.items() if v not in self.stored]
        for vcpus, memory, disk, group in [*self.stored.values(), *held]:
            used[0] += vcpus
            used[1] += memory
            used[2] += disk
            if group:
                groups[group] += 1
        self.used, self.groups = used, groups
        self.touch()

    def touch(self) -> None:
        self._state = None
        self.version += 1

    def state(self) -> HostState:
        """The host as the filters see it (cached until it changes)."""
        if self._state is None:
            assert self.record is not None
            self._state = HostState(
                name=self.name,
                alive=self.alive,
                capacity=self.record.capacity,
                labels=self.record.labels,
                used_vcpus=self.used[0],
                used_memory_mb=self.used[1],
                used_disk_gb=self.used[2],
                anti_affinity_groups=frozenset(g for g, n in self.groups.items() if n > 0),
            )
        return self._state


class HostIndex:
    """Hosts, their heartbeats and allocations, and the VM → host map the allocations give."""

    def __init__(
        self,
        overcommit: Overcommit,
        strategy: Strategy,
        *,
        salt: str | None = None,
        candidates: int = DEFAULT_CANDIDATES,
    ) -> None:
        self.overcommit = overcommit
        self.strategy = strategy
        self.candidates = candidates
        self.salt = salt
        self.hosts: dict[str, HostEntry] = {}
        self.vm_host: dict[str, str] = {}
        self.epoch = 0  # bumped by every change: cached explanations expire with it
        self._heap: list[tuple[float, int | str, int, str]] = []
        self._labels: dict[tuple[str, str], set[str]] = {}
        self._explained: dict[tuple[object, ...], str] = {}

    # -- what the store says ----------------------------------------------------------------

    def set_record(self, name: str, record: HostRecord | None) -> None:
        entry = self._entry(name)
        if entry.record is not None:
            for pair in entry.record.labels.items():
                self._labels.get(pair, set()).discard(name)
        entry.record = record
        if record is not None:
            for pair in record.labels.items():
                self._labels.setdefault(pair, set()).add(name)
            capacity, ratio = record.capacity, self.overcommit
            entry.limits = (
                capacity.vcpus * ratio.cpu,
                capacity.memory_mb * ratio.memory,
                capacity.disk_gb * ratio.disk,
            )
        self._changed(entry)

    def set_alive(self, name: str, alive: bool) -> None:
        entry = self._entry(name)
        if entry.alive != alive:
            entry.alive = alive
            self._changed(entry)

    def set_allocations(self, name: str, kv: KeyValue | None) -> set[str]:
        """Takes a newer allocations record (an older one is ignored); returns the VMs it
        no longer lists, whose room is free again."""
        entry = self._entry(name)
        known = entry.allocations_kv
        if kv is not None and known is not None and kv.mod_revision <= known.mod_revision:
            return set()
        try:
            stored = {} if kv is None else parse_allocations(kv.value)
            readable = True
        except ValueError as error:
            log.error("host %s: allocations unreadable, not placing there: %s", name, error)
            stored, readable = {}, False
        freed = set(entry.stored) - set(stored)
        for vm_id in freed:
            if self.vm_host.get(vm_id) == name:
                del self.vm_host[vm_id]
        for vm_id in stored:
            self.vm_host[vm_id] = name
        for vm_id in list(entry.held):
            if vm_id in stored:
                del entry.held[vm_id]
        entry.allocations_kv, entry.stored, entry.readable = kv, stored, readable
        self._changed(entry)
        return freed

    def forget(self, name: str) -> None:
        """The host's record, heartbeat and allocations are all gone."""
        entry = self.hosts.get(name)
        if entry is not None and entry.record is None and entry.allocations_kv is None:
            del self.hosts[name]
            self.epoch += 1

    # -- placements in flight ---------------------------------------------------------------

    def hold(self, name: str, vm_id: str, usage: Usage) -> None:
        """Counts a VM on a host before its binding is stored."""
        entry = self.hosts[name]
        if vm_id in entry.held or vm_id in entry.stored:
            return
        entry.held[vm_id] = usage
        vcpus, memory, disk, group = usage
        entry.used = [entry.used[0] + vcpus, entry.used[1] + memory, entry.used[2] + disk]
        if group:
            entry.groups[group] += 1
        self._changed(entry, recount=False)

    def commit(self, name: str, kv: KeyValue) -> None:
        """The held VMs of a host are stored now, as `kv` (written by this scheduler)."""
        entry = self.hosts[name]
        known = entry.allocations_kv
        if known is not None and kv.mod_revision <= known.mod_revision:
            return
        entry.stored.update(entry.held)
        for vm_id in entry.held:
            self.vm_host[vm_id] = name
        entry.held.clear()
        entry.allocations_kv = kv  # the usage counted is unchanged: no new heap item

    def drop_holds(self, names: Iterable[str]) -> None:
        for name in names:
            entry = self.hosts.get(name)
            if entry is not None and entry.held:
                entry.held.clear()
                self._changed(entry)

    def document(self, name: str) -> dict[str, JsonValue]:
        """The allocations record of a host with its held VMs added: what a bind writes."""
        entry = self.hosts[name]
        vms: dict[str, JsonValue] = {}
        if entry.allocations_kv is not None:
            vms.update(entry.allocations_kv.value.get("vms", {}))
        for vm_id, usage in entry.held.items():
            vms[vm_id] = allocation_document(usage)
        return {"vms": vms}

    # -- choosing ---------------------------------------------------------------------------

    def choose(self, request: PlacementRequest) -> HostEntry | None:
        """The host the strategy prefers among those every filter passes; None when no
        host passes (ask `explain` why)."""
        if request.labels:
            return self._choose_labelled(request)
        sign = -1.0 if self.strategy is Strategy.SPREAD else 1.0
        heap, popped = self._heap, []
        best: HostEntry | None = None
        best_key: tuple[float, int | str] | None = None
        found = 0
        while heap and found < self.candidates:
            item = heapq.heappop(heap)
            entry = self.hosts.get(item[3])
            if entry is None or item[2] != entry.version:
                continue  # stale: the host changed since this item was pushed
            popped.append(item)
            room = self._room_after(entry, request)
            if room is None:
                continue
            found += 1
            key = (sign * room, item[1])
            if best_key is None or key < best_key:
                best, best_key = entry, key
        for item in popped:
            heapq.heappush(heap, item)
        return best

    def _room_after(self, entry: HostEntry, request: PlacementRequest) -> float | None:
        """`weighers.room_after` of a host the filters pass, else None: the same
        arithmetic as the filters and the weigher, inlined (this runs for every candidate).
        Only for hosts in the heap: alive, readable, and asked for no labels."""
        group = request.anti_affinity_group
        if group is not None and entry.groups.get(group, 0) > 0:
            return None
        shares = []
        for used, asked, limit in zip(
            entry.used,
            (request.vcpus, request.memory_mb, request.disk_gb),
            entry.limits,
            strict=True,
        ):
            if used + asked > limit:
                return None
            shares.append(1.0 - (used + asked) / limit if limit > 0 else 0.0)
        return min(shares)

    def explain(self, request: PlacementRequest) -> str:
        """Why no host can take `request`: each host's first failing filter, counted."""
        signature = (
            request.vcpus,
            request.memory_mb,
            request.disk_gb,
            tuple(sorted(request.labels.items())),
            request.anti_affinity_group,
            self.epoch,
        )
        reason = self._explained.get(signature)
        if reason is None:
            states = [e.state() for e in self.hosts.values() if e.record is not None]
            _, refused = passing_hosts(states, request, self.overcommit)
            if len(self._explained) > 1024:
                self._explained.clear()
            reason = self._explained[signature] = explain(refused, request)
        return reason

    def states(self) -> list[HostState]:
        return [e.state() for e in self.hosts.values() if e.record is not None]

    def _choose_labelled(self, request: PlacementRequest) -> HostEntry | None:
        names: set[str] | None = None
        for pair in request.labels.items():
            having = self._labels.get(pair, set())
            names = set(having) if names is None else names & having
        usable = [self.hosts[n] for n in sorted(names or ()) if self._usable(self.hosts[n])]
        passing, _ = passing_hosts([e.state() for e in usable], request, self.overcommit)
        if not passing:
            return None
        sign = -1.0 if self.strategy is Strategy.SPREAD else 1.0
        chosen = min(
            passing,
            key=lambda s: (sign * room_after(s, request, self.overcommit), self._tie(s.name)),
        )
        return self.hosts[chosen.name]

    # -- keeping the heap -------------------------------------------------------------------

    def _entry(self, name: str) -> HostEntry:
        entry = self.hosts.get(name)
        if entry is None:
            entry = self.hosts[name] = HostEntry(name=name)
        return entry

    def _usable(self, entry: HostEntry) -> bool:
        if entry.record is None or not entry.alive or not entry.readable:
            return False
        capacity, ratio = entry.record.capacity, self.overcommit
        return (
            capacity.vcpus * ratio.cpu - entry.used[0] >= MIN_VCPUS
            and capacity.memory_mb * ratio.memory - entry.used[1] >= MIN_MEMORY_MB
        )

    def _free_share(self, entry: HostEntry) -> float:
        assert entry.record is not None
        capacity, ratio = entry.record.capacity, self.overcommit
        shares = []
        for used, size in (
            (entry.used[0], capacity.vcpus * ratio.cpu),
            (entry.used[1], capacity.memory_mb * ratio.memory),
            (entry.used[2], capacity.disk_gb * ratio.disk),
        ):
            shares.append(1.0 - used / size if size > 0 else 0.0)
        return min(shares)

    def _tie(self, name: str) -> int | str:
        """Ties between equal hosts go to the first name, or, with a salt, to an order of
        the names of this scheduler's own, so that two schedulers pick different hosts."""
        if self.salt is None:
            return name
        return zlib.crc32(f"{self.salt}/{name}".encode())

    def _changed(self, entry: HostEntry, *, recount: bool = True) -> None:
        if recount:
            entry.recount()
        else:
            entry.touch()
        self.epoch += 1
        if self._usable(entry):
            share = self._free_share(entry)
            key = -share if self.strategy is Strategy.SPREAD else share
            heapq.heappush(self._heap, (key, self._tie(entry.name), entry.version, entry.name))
        if len(self._heap) > 4 * len(self.hosts) + 64:
            self._rebuild()

    def _rebuild(self) -> None:
        sign = -1.0 if self.strategy is Strategy.SPREAD else 1.0
        self._heap = [
            (sign * self._free_share(e), self._tie(e.name), e.version, e.name)
            for e in self.hosts.values()
            if self._usable(e)
        ]
        heapq.heapify(self._heap)
