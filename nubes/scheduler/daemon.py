"""The scheduler daemon: follows the store, binds every new VM within milliseconds, and
cleans up after deleted ones (the janitor), with a periodic resync behind the watches.

One task places: it takes a batch of pending VMs, chooses a host for each on the live
index (holding the room it takes), and binds the batch in one transaction guarded by
each VM record and each touched host's allocations. A batch that loses a race reads the
winners' records from the failed transaction itself and goes on one VM at a time, then
grows again. A VM no host can take is put in `error` with the reason and waits for a
host to appear, wake up or free room.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nubes.config import EventsConfig, MeteringConfig, SchedulerConfig
from nubes.errors import CompactedError, InvalidInput, StoreError
from nubes.events.recorder import EventRecorder
from nubes.metering.meter import Meter
from nubes.model.host import HostRecord
from nubes.model.vm import VmRecord
from nubes.scheduler.binding import bind_batch, report_unschedulable
from nubes.scheduler.filters import Overcommit, PlacementRequest
from nubes.scheduler.hosts import HostMonitor
from nubes.scheduler.index import HostIndex, Usage
from nubes.scheduler.janitor import Janitor, PortDeletion, delete_port_records
from nubes.scheduler.weighers import Strategy
from nubes.store.base import (
    MAX_TXN_OPERATIONS,
    EventType,
    JsonValue,
    KeyValue,
    Store,
    WatchEvent,
)
from nubes.store.keys import Kind, host_allocations_key, kind_prefix
from nubes.store.listing import range_all

log = logging.getLogger(__name__)

DEFAULT_BATCH = 64
RETRY_SECONDS = 1.0
_VMS, _HOSTS = kind_prefix(Kind.VM), kind_prefix(Kind.HOST)
_PORTS, _FIPS = kind_prefix(Kind.PORT), kind_prefix(Kind.FLOATING_IP)
Job = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class PendingVm:
    """A VM without a host, as read (its KeyValue guards the binding)."""

    kv: KeyValue
    request: PlacementRequest
    usage: Usage
    order: tuple[int, int | str]

    @property
    def id(self) -> str:
        return self.kv.key[len(_VMS) :]


def _event_kv(event: WatchEvent) -> KeyValue | None:
    if event.type is EventType.DELETE:
        return None
    return KeyValue(event.key, event.value, event.create_revision, event.revision, event.version)


class SchedulerDaemon:
    """Run with `await daemon.run(stop)`; `ready` is set once the first listing is in."""

    def __init__(
        self,
        store: Store,
        config: SchedulerConfig | None = None,
        *,
        batch_size: int = DEFAULT_BATCH,
        salt: str | None = None,
        port_deletion: PortDeletion = delete_port_records,
    ) -> None:
        self.store = store
        self.config = config or SchedulerConfig()
        self.overcommit = Overcommit.of(self.config)
        # Each daemon orders equal hosts and VMs its own way, so that two at once seldom
        # reach for the same records.
        self.salt = os.urandom(6).hex() if salt is None else salt
        self.max_batch = max(1, min(batch_size, MAX_TXN_OPERATIONS // 2))
        self.janitor = Janitor(store, port_deletion)
        self.monitor = HostMonitor(store, self.overcommit, Strategy(self.config.strategy))
        self.ready = asyncio.Event()
        self.bound = 0  # VMs this daemon bound
        self.lost_races = 0  # batches that lost a race
        self._reset()

    def _reset(self) -> None:
        self.index = HostIndex(self.overcommit, Strategy(self.config.strategy), salt=self.salt)
        self.janitor.clear()
        self._pending: dict[str, PendingVm] = {}
        self._queue: list[tuple[tuple[int, int | str], str]] = []
        self._waiting: dict[str, PendingVm] = {}
        self._in_flight: set[str] = set()  # in the binding transaction being awaited
        self._reported: dict[str, str] = {}
        self._vm_seen: dict[str, tuple[str | None, tuple[str, ...]]] = {}  # host, ports
        self._batch = self.max_batch
        self._wake = asyncio.Event()
        self._jobs: asyncio.Queue[Job] = asyncio.Queue()

    @property
    def idle(self) -> bool:
        """Nothing to place (VMs no host can take excepted) and no cleanup queued."""
        return not self._pending and self._jobs.empty()

    # -- the main loop ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Schedules and cleans up until `stop` is set. Store outages and compacted
        watches are survived by listing everything again; nothing is raised."""
        while not stop.is_set():
            try:
                revisions = await self._list_everything()
                self.ready.set()
                await self._follow(revisions, stop)
            except CompactedError:
                log.warning("scheduler: a watch fell behind compaction; listing everything again")
            except StoreError as error:
                log.warning(
                    "scheduler: store trouble (%s); listing again in %s s", error, RETRY_SECONDS
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RETRY_SECONDS)

    async def _follow(self, revisions: dict[str, int], stop: asyncio.Event) -> None:
        tasks = [
            asyncio.create_task(self._watch(prefix, revision + 1, handler))
            for prefix, revision, handler in (
                (_VMS, revisions[_VMS], self._on_vm_event),
                (_HOSTS, revisions[_HOSTS], self._on_host_event),
                (_PORTS, revisions[_PORTS], self._on_port_event),
                (_FIPS, revisions[_FIPS], self._on_fip_event),
            )
        ]
        tasks += [
            asyncio.create_task(self._place_forever()),
            asyncio.create_task(self._clean_forever()),
            asyncio.create_task(self._resync_forever()),
        ]
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [stopping, *tasks]:
                task.cancel()
            for task in [stopping, *tasks]:
                with contextlib.suppress(asyncio.CancelledError):
                    await task  # re-raises a task's StoreError for run() to handle

    async def _watch(
        self, prefix: str, from_revision: int, handler: Callable[[WatchEvent], None]
    ) -> None:
        async with self.store.watch(prefix, from_revision=from_revision) as events:
            async for event in events:
                try:
                    handler(event)
                except Exception:  # one bad record must not stop the scheduler
                    log.exception("scheduler: cannot handle the change of %s; skipped", event.key)

    async def _list_everything(self) -> dict[str, int]:
        self._reset()
        revisions = {}
        # Hosts before VMs: an allocation of a VM the later VM listing lacks is stale.
        hosts = await range_all(self.store, _HOSTS)
        vms = await range_all(self.store, _VMS)
        ports = await range_all(self.store, _PORTS)
        fips = await range_all(self.store, _FIPS)
        for listed, prefix, handler in (
            (hosts, _HOSTS, self._on_host),
            (vms, _VMS, self._on_vm),
            (ports, _PORTS, self._on_port),
            (fips, _FIPS, self._on_fip),
        ):
            revisions[prefix] = listed.revision
            for kv in listed.kvs:
                try:
                    handler(kv.key, kv)
                except Exception:
                    log.exception("scheduler: cannot read %s; skipped", kv.key)
        self._queue_sweep(hosts.kvs, vms.kvs, ports.kvs, fips.kvs)
        log.info(
            "scheduler: %d hosts, %d VMs to place, %d waiting",
            sum(1 for e in self.index.hosts.values() if e.record is not None),
            len(self._pending),
            len(self._waiting),
        )
        return revisions

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.resync_interval)
            await self.resync()

    async def resync(self) -> None:
        """Looks at everything again: unbound VMs are queued (those waiting too), and
        what deleted VMs and ports left behind is cleaned."""
        hosts = await range_all(self.store, _HOSTS)
        vms = await range_all(self.store, _VMS)
        ports = await range_all(self.store, _PORTS)
        fips = await range_all(self.store, _FIPS)
        for kv in vms.kvs:
            vm_id = kv.key[len(_VMS) :]
            if "/" in vm_id or vm_id in self._pending or vm_id in self._in_flight:
                continue
            with contextlib.suppress(Exception):
                if (
                    _field(kv.value, "spec", "host") is None
                    and kv.value.get("deleting") is not True
                ):
                    self._waiting.pop(vm_id, None)
                    self._queue_vm(kv)
        self._queue_sweep(hosts.kvs, vms.kvs, ports.kvs, fips.kvs)

    def _queue_sweep(
        self,
        hosts: list[KeyValue],
        vms: list[KeyValue],
        ports: list[KeyValue],
        fips: list[KeyValue],
    ) -> None:
        allocations: dict[str, set[str]] = {}
        for kv in hosts:
            name, _, rest = kv.key[len(_HOSTS) :].partition("/")
            if rest == "allocations" and isinstance(_field(kv.value, "vms"), dict):
                allocations[name] = set(kv.value["vms"])
        vm_ids = {kv.key[len(_VMS) :] for kv in vms if "/" not in kv.key[len(_VMS) :]}
        port_kvs = [kv for kv in ports if "/" not in kv.key[len(_PORTS) :]]
        fip_kvs = [kv for kv in fips if "/" not in kv.key[len(_FIPS) :]]
        self._jobs.put_nowait(lambda: self.janitor.sweep(vm_ids, allocations, port_kvs, fip_kvs))
        self._jobs.put_nowait(self._sweep_hosts)

    async def _sweep_hosts(self) -> None:
        await self.monitor.sweep()

    def _check_host(self, name: str) -> Job:
        async def job() -> None:
            await self.monitor.check_host(name)

        return job

    # -- following the store ------------------------------------------------------------

    def _on_vm_event(self, event: WatchEvent) -> None:
        self._on_vm(event.key, _event_kv(event))

    def _on_host_event(self, event: WatchEvent) -> None:
        self._on_host(event.key, _event_kv(event))
        if event.key.endswith(("/alive", "/stopped")):
            # Up or down: the monitor writes the host's status and deals with its VMs.
            self._jobs.put_nowait(self._check_host(event.key[len(_HOSTS) : -len("/alive")]))

    def _on_port_event(self, event: WatchEvent) -> None:
        self._on_port(event.key, _event_kv(event))

    def _on_fip_event(self, event: WatchEvent) -> None:
        self._on_fip(event.key, _event_kv(event))

    def _on_vm(self, key: str, kv: KeyValue | None) -> None:
        vm_id = key[len(_VMS) :]
        if "/" in vm_id:
            return  # a status: the agent's
        if kv is None:
            self._pending.pop(vm_id, None)
            self._waiting.pop(vm_id, None)
            self._reported.pop(vm_id, None)
            host, ports = self._vm_seen.pop(vm_id, (None, ()))
            host = self.index.vm_host.get(vm_id, host)
            self._jobs.put_nowait(lambda: self.janitor.vm_gone(vm_id, host, ports))
            return
        host = _field(kv.value, "spec", "host")
        ports = _field(kv.value, "spec", "ports")
        self._vm_seen[vm_id] = (
            host if isinstance(host, str) else None,
            tuple(p for p in ports if isinstance(p, str)) if isinstance(ports, list) else (),
        )
        if host is None and _field(kv.value, "deleting") is not True:
            self._waiting.pop(vm_id, None)
            self._queue_vm(kv)
            return
        self._pending.pop(vm_id, None)
        self._waiting.pop(vm_id, None)
        self._reported.pop(vm_id, None)
        if host is None:
            self._jobs.put_nowait(lambda: self.janitor.delete_unbound(kv))

    def _queue_vm(self, kv: KeyValue) -> None:
        try:
            record = VmRecord.from_json(kv.value)
        except InvalidInput as error:
            log.error("scheduler: %s is not a valid VM record, not placing it: %s", kv.key, error)
            return
        spec = record.spec
        request = PlacementRequest.of(spec)
        usage = (request.vcpus, request.memory_mb, request.disk_gb, request.anti_affinity_group)
        tie = zlib.crc32(f"{self.salt}/{record.id}".encode())
        pending = PendingVm(kv, request, usage, (int(record.created_at.timestamp()), tie))
        if record.id not in self._pending:
            heapq.heappush(self._queue, (pending.order, record.id))
        self._pending[record.id] = pending
        self._wake.set()

    def _on_host(self, key: str, kv: KeyValue | None) -> None:
        name, _, rest = key[len(_HOSTS) :].partition("/")
        room_grew = False
        if rest == "":
            record = None
            if kv is not None:
                try:
                    record = HostRecord.from_json(kv.value)
                except InvalidInput as error:
                    log.error("scheduler: host %s has an invalid record, skipped: %s", name, error)
            self.index.set_record(name, record)
            room_grew = record is not None
        elif rest == "alive":
            self.index.set_alive(name, kv is not None)
            room_grew = kv is not None
        elif rest == "allocations":
            room_grew = bool(self.index.set_allocations(name, kv))
        else:
            return
        if kv is None:
            self.index.forget(name)
        if room_grew:
            self._retry_waiting()

    def _on_port(self, key: str, kv: KeyValue | None) -> None:
        port_id = key[len(_PORTS) :]
        if "/" in port_id:
            return
        self.janitor.on_port(port_id, None if kv is None else kv.value)
        if kv is None:
            self._jobs.put_nowait(lambda: self.janitor.port_gone(port_id))

    def _on_fip(self, key: str, kv: KeyValue | None) -> None:
        fip_id = key[len(_FIPS) :]
        if "/" not in fip_id:
            self.janitor.on_floating_ip(fip_id, None if kv is None else kv.value)

    def _retry_waiting(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for pending in waiting.values():
            self._queue_vm(pending.kv)

    # -- placing ------------------------------------------------------------------------

    async def _place_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._place_batch()
                await asyncio.sleep(0)  # let the watches bring news between batches

    def _next_pending(self) -> PendingVm | None:
        while self._queue:
            order, vm_id = heapq.heappop(self._queue)
            pending = self._pending.get(vm_id)
            if pending is not None and pending.order == order:
                del self._pending[vm_id]
                return pending
        return None

    async def _place_batch(self) -> None:
        planned: list[tuple[PendingVm, str]] = []
        touched: dict[str, KeyValue | None] = {}
        unplaced: list[PendingVm] = []
        while len(planned) < self._batch and len(planned) + len(touched) + 2 <= MAX_TXN_OPERATIONS:
            pending = self._next_pending()
            if pending is None:
                break
            chosen = self.index.choose(pending.request)
            if chosen is None:
                unplaced.append(pending)
                continue
            touched.setdefault(chosen.name, chosen.allocations_kv)
            self.index.hold(chosen.name, pending.id, pending.usage)
            planned.append((pending, chosen.name))
        won = True
        if planned:
            won = await self._bind(planned, touched)
        for pending in unplaced:
            if not won:  # room held for the lost batch may have been what it lacked
                self._queue_vm(pending.kv)
                continue
            self._waiting[pending.id] = pending
            reason = self.index.explain(pending.request)
            if self._reported.get(pending.id) != reason:
                await report_unschedulable(self.store, pending.id, reason)
                self._reported[pending.id] = reason
                log.info("scheduler: %s waits: %s", pending.id, reason)

    async def _bind(
        self, planned: list[tuple[PendingVm, str]], touched: dict[str, KeyValue | None]
    ) -> bool:
        documents = {host: (kv, self.index.document(host)) for host, kv in touched.items()}
        self._in_flight = {pending.id for pending, _ in planned}
        try:
            outcome = await bind_batch(self.store, [(p.kv, host) for p, host in planned], documents)
        except BaseException:
            self._in_flight = set()
            self.index.drop_holds(touched)
            for pending, _ in planned:
                self._queue_vm(pending.kv)
            raise
        self._in_flight = set()
        if outcome.succeeded:
            for host, (kv, document) in documents.items():
                stored = KeyValue(
                    key=host_allocations_key(host),
                    value=document,
                    create_revision=kv.create_revision if kv else outcome.revision,
                    mod_revision=outcome.revision,
                    version=(kv.version if kv else 0) + 1,
                )
                self.index.commit(host, stored)
            for pending, host in planned:
                self._reported.pop(pending.id, None)
                seen = self._vm_seen.get(pending.id)
                self._vm_seen[pending.id] = (host, seen[1] if seen else ())
            self.bound += len(planned)
            self._batch = min(self.max_batch, self._batch * 2)
            return True
        # Lost a race: take the winners' records from the failed transaction, and go on
        # one VM at a time until batches win again.
        self.lost_races += 1
        self._batch = 1
        self.index.drop_holds(touched)
        for host in touched:
            current = outcome.current[host_allocations_key(host)]
            if current is not None:
                self.index.set_allocations(host, current)
        for pending, _ in planned:
            current = outcome.current[pending.kv.key]
            if current is None:
                continue  # deleted meanwhile; its watch event does the rest
            if current.mod_revision == pending.kv.mod_revision:
                self._queue_vm(pending.kv)
            else:
                self._on_vm(current.key, current)
        return False

    # -- cleaning -----------------------------------------------------------------------

    async def _clean_forever(self) -> None:
        while True:
            job = await self._jobs.get()
            try:
                await job()
            except StoreError:
                raise
            except Exception:
                log.exception("scheduler: a cleanup failed; the next resync tries again")


def _field(value: JsonValue, *path: str) -> JsonValue:
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


async def run_scheduler(
    store: Store,
    config: SchedulerConfig | None,
    stop: asyncio.Event,
    *,
    port_deletion: PortDeletion | None = None,
    events: EventsConfig | None = None,
    metering: MeteringConfig | None = None,
) -> None:
    """Runs one scheduler daemon on `store` until `stop` is set. Ports are deleted as
    the API deletes them (record, status, address/MAC/name claims) unless told otherwise.
    The event recorder runs beside it, keeping the log within `events`' limits, and the
    usage meter, keeping usage intervals for `metering`'s retention."""
    if port_deletion is None:
        from nubes.api.netops import port_deletion_operations  # the API owns the claims

        port_deletion = port_deletion_operations
    daemon = SchedulerDaemon(store, config, port_deletion=port_deletion)
    # The cluster-wide controllers that are not placement run beside the daemon.
    async with asyncio.TaskGroup() as controllers:
        controllers.create_task(daemon.run(stop))
        controllers.create_task(EventRecorder(store, events).run(stop))
        controllers.create_task(Meter(store, metering).run(stop))
    log.info("scheduler: stopped; bound %d VMs (%d lost races)", daemon.bound, daemon.lost_races)
