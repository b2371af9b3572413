"""The scheduler's work: every VM without a host gets one, or an error that says why.

A pass reads the hosts (records, heartbeats, allocations) and the unbound VMs, then
places each VM in turn on the snapshot it keeps up to date as it binds; a binding that
loses a race re-reads the host and the VM and tries again. The snapshot is only an
optimisation: compare-and-swap on the host's allocations is what prevents overbooking.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace

from nubes.errors import InvalidInput
from nubes.model.host import HostRecord
from nubes.model.vm import VmRecord
from nubes.scheduler.binding import bind, read_allocations, report_unschedulable
from nubes.scheduler.filters import (
    HostState,
    Overcommit,
    PlacementRequest,
    explain,
    passing_hosts,
)
from nubes.scheduler.weighers import Strategy, best_host
from nubes.store.base import KeyValue, Store
from nubes.store.keys import Kind, host_allocations_key, kind_prefix
from nubes.store.listing import range_all

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 8


@dataclass
class PassResult:
    bound: dict[str, str]  # VM id -> host
    unschedulable: dict[str, str]  # VM id -> reason


class Scheduler:
    def __init__(
        self,
        store: Store,
        *,
        overcommit: Overcommit | None = None,
        strategy: Strategy = Strategy.SPREAD,
    ) -> None:
        self.store = store
        self.overcommit = overcommit or Overcommit()
        self.strategy = strategy
        self._hosts: dict[str, HostState] = {}
        self._allocations: dict[str, KeyValue | None] = {}

    async def schedule_pending(self) -> PassResult:
        """One pass over every VM that has no host."""
        await self.refresh_hosts()
        result = PassResult(bound={}, unschedulable={})
        for kv, record in await self._unbound():
            host, reason = await self.place(kv, record)
            if host is not None:
                result.bound[record.id] = host
            elif reason is not None:
                result.unschedulable[record.id] = reason
                await report_unschedulable(self.store, record.id, reason)
        return result

    async def place(self, kv: KeyValue, record: VmRecord) -> tuple[str | None, str | None]:
        """Binds one VM; (host, None), or (None, why no host can take it), or (None, None)
        when the VM changed meanwhile (deleted, or bound by another scheduler)."""
        request = PlacementRequest.of(record.spec)
        for _ in range(MAX_ATTEMPTS):
            passing, refused = passing_hosts(self._hosts.values(), request, self.overcommit)
            chosen = best_host(passing, request, self.overcommit, self.strategy)
            if chosen is None:
                return None, explain(refused, request)
            allocations_kv = self._allocations.get(chosen.name)
            stored = await bind(self.store, kv, record, chosen.name, allocations_kv)
            if stored is not None:
                self._remember(chosen.name, stored)
                return chosen.name, None
            # Lost a race: on the host, the VM, or both. Look again at each.
            await self._refresh_host(chosen.name)
            fresh = await self.store.get(kv.key)
            if fresh is None:
                return None, None
            try:
                fresh_record = VmRecord.from_json(fresh.value)
            except InvalidInput:
                return None, None
            if fresh_record.spec.host is not None or fresh_record.deleting:
                return None, None
            kv, record = fresh, fresh_record
        log.warning("%s: gave up after %d lost races", record.id, MAX_ATTEMPTS)
        return None, None

    async def _unbound(self) -> list[tuple[KeyValue, VmRecord]]:
        found = []
        for kv in (await range_all(self.store, kind_prefix(Kind.VM))).kvs:
            if kv.key.count("/") != 3:
                continue
            try:
                record = VmRecord.from_json(kv.value)
            except InvalidInput:
                continue
            if record.spec.host is None and not record.deleting:
                found.append((kv, record))
        found.sort(key=lambda item: (item[1].created_at, item[1].id))
        return found

    async def refresh_hosts(self) -> None:
        """Reads every host's record, heartbeat and allocations into the snapshot."""
        listed = (await range_all(self.store, kind_prefix(Kind.HOST))).kvs
        records: dict[str, HostRecord] = {}
        alive: set[str] = set()
        allocations: dict[str, KeyValue] = {}
        for kv in listed:
            parts = kv.key.rstrip("/").split("/")
            name = parts[3]
            if len(parts) == 4:
                try:
                    records[name] = HostRecord.from_json(kv.value)
                except InvalidInput:
                    continue
            elif parts[4:] == ["alive"]:
                alive.add(name)
            elif parts[4:] == ["allocations"]:
                allocations[name] = kv
        self._allocations = {name: allocations.get(name) for name in records}
        self._hosts = {
            name: self._state(record, name in alive, allocations.get(name))
            for name, record in records.items()
        }

    async def _refresh_host(self, name: str) -> None:
        self._remember(name, await self.store.get(host_allocations_key(name)))

    def _remember(self, name: str, kv: KeyValue | None) -> None:
        self._allocations[name] = kv
        allocations = read_allocations(kv)
        self._hosts[name] = replace(
            self._hosts[name],
            used_vcpus=allocations.vcpus,
            used_memory_mb=allocations.memory_mb,
            used_disk_gb=allocations.disk_gb,
            anti_affinity_groups=allocations.groups,
        )

    @staticmethod
    def _state(record: HostRecord, alive: bool, kv: KeyValue | None) -> HostState:
        allocations = read_allocations(kv)
        return HostState(
            name=record.name,
            alive=alive,
            capacity=record.capacity,
            labels=record.labels,
            used_vcpus=allocations.vcpus,
            used_memory_mb=allocations.memory_mb,
            used_disk_gb=allocations.disk_gb,
            anti_affinity_groups=allocations.groups,
        )

    def hosts(self) -> Iterable[HostState]:
        return self._hosts.values()
