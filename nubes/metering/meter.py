"""The meter: follows VMs, volumes and floating IPs and keeps each project's usage
intervals in the store (see interval.py) for the usage report to add up.

A VM is billed while its QEMU runs: status `running` or `migrating` (not `building`,
which is nubes preparing disks and networks before QEMU starts), from the status's
`updated_at` (when its agent saw the change) to that of the status that ends it. A
volume is billed from its creation to its deletion (or delete request) at its size, a
floating IP from allocation to release. Writes are compare-and-swap with opening ids
taken from store revisions, so a restarted meter, or two at once, never count twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from nubes.config import MeteringConfig
from nubes.errors import CompactedError, InvalidInput, StoreError
from nubes.metering.interval import MeteredFlavor, MeteredKind, UsageInterval, opening_id
from nubes.metering.plan import Change, Observation, batches, plan
from nubes.model.common import now
from nubes.model.network import FloatingIpRecord
from nubes.model.vm import VmRecord, VmState, VmStatus
from nubes.model.volume import VolumeRecord
from nubes.store.base import (
    MAX_TXN_OPERATIONS,
    Compare,
    Delete,
    EventType,
    KeyValue,
    RangeResult,
    Store,
    WatchEvent,
)
from nubes.store.keys import (
    METER_CURSOR_KEY,
    METER_PREFIX,
    OPEN_METER_PREFIX,
    Kind,
    kind_prefix,
    open_meter_key,
    status_key,
)
from nubes.store.listing import LIST_PAGE, range_all

log = logging.getLogger(__name__)

BILLED_VM_STATES = frozenset({VmState.RUNNING, VmState.MIGRATING})
RETRY_SECONDS = 1.0
RESYNC_SECONDS = 600.0  # a full listing behind the watches
PRUNE_SECONDS = 24 * 3600.0
EVENTS_PER_ROUND = 1024
QUEUE_SIZE = 4 * EVENTS_PER_ROUND  # changes read ahead; a full queue holds the watches back
CURSOR_SECONDS = 5.0  # how stale the saved cursor may be (a stale one replays a little more)
REPLAY_IDLE_SECONDS = 2.0  # a replay waiting this long for a change has caught up
"""The revision up to which every VM change has been metered: a restarted meter replays
the VM history from there, so what happened while no meter ran is billed at its times."""
_VMS, _VOLUMES = kind_prefix(Kind.VM), kind_prefix(Kind.VOLUME)
_FIPS = kind_prefix(Kind.FLOATING_IP)
_PREFIXES = (_VMS, _VOLUMES, _FIPS)
Clock = Callable[[], datetime]


@dataclass(frozen=True, slots=True)
class _Vm:
    project: str
    flavor: MeteredFlavor


class Meter:
    """Run with `await meter.run(stop)`; `ready` is set once the first reconciliation is
    written. `run` never raises: store trouble is waited out and everything listed again."""

    def __init__(
        self,
        store: Store,
        config: MeteringConfig | None = None,
        *,
        clock: Clock = now,
        resync_seconds: float = RESYNC_SECONDS,
    ) -> None:
        self.store = store
        self.config = config or MeteringConfig()
        self.clock = clock
        self.resync_seconds = resync_seconds
        self.ready = asyncio.Event()
        self.lost_races = 0  # changes another meter (or a newer record) got to first
        self._vm_cursor = 0  # every VM change up to this revision is metered
        self._cursor_saved_at = 0.0
        self._reset()

    def _reset(self) -> None:
        self._vms: dict[str, _Vm] = {}
        self._vm_statuses: dict[str, tuple[VmStatus, int]] = {}
        self._projects: dict[str, str] = {}
        self._open: dict[str, UsageInterval] = {}
        self._latest: dict[str, Observation] = {}

    # -- the main loop ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Meters until `stop` is set."""
        pruning = asyncio.create_task(self._prune_forever(stop))
        try:
            while not stop.is_set():
                try:
                    revisions = await self.reconcile()
                    self.ready.set()
                    await self._follow(revisions, stop)
                except CompactedError:
                    log.warning("meter: a watch fell behind compaction; listing everything again")
                except Exception as error:  # beside the scheduler: never take it down
                    if isinstance(error, StoreError):
                        log.warning(
                            "meter: store trouble (%s); again in %s s", error, RETRY_SECONDS
                        )
                    else:
                        log.exception("meter: failed; starting over in %s s", RETRY_SECONDS)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), RETRY_SECONDS)
        finally:
            pruning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pruning

    async def reconcile(self) -> dict[str, int]:
        """Lists the open intervals and every metered resource, then opens what is billed
        without an open interval and closes what is open but no longer billed. Returns the
        revision of each listing (its watch goes on from there).

        Raises:
            StoreError: the store cannot be reached.
        """
        cursor = await self._read_cursor()
        self._reset()
        for kv in (await range_all(self.store, OPEN_METER_PREFIX)).kvs:
            try:
                interval = UsageInterval.from_json(kv.value)
            except InvalidInput as error:
                log.error("meter: %s is not a usage interval, ignored: %s", kv.key, error)
                continue
            self._open[interval.resource] = interval
            self._projects[interval.resource] = interval.project
        listings = {prefix: await range_all(self.store, prefix) for prefix in _PREFIXES}
        if cursor is not None and cursor < listings[_VMS].revision:
            await self._replay_vms(cursor, listings[_VMS])
        seen: set[str] = set()
        observations: list[Observation] = []
        for kv in listings[_VMS].kvs:
            self._on_vm_key(kv.key, kv, kv.mod_revision)
        for vm_id in self._vms:
            seen.add(vm_id)
            observations.append(self._observe_vm(vm_id, listings[_VMS].revision))
        for prefix, observe in (
            (_VOLUMES, self._observe_volume),
            (_FIPS, self._observe_floating_ip),
        ):
            for kv in listings[prefix].kvs:
                resource = kv.key[len(prefix) :]
                if "/" in resource:
                    continue
                seen.add(resource)
                try:
                    observations.append(observe(resource, kv, kv.mod_revision))
                except InvalidInput as error:
                    log.error("meter: %s is not a valid record, not metered: %s", kv.key, error)
        latest = max(listing.revision for listing in listings.values())
        gone = [resource for resource in self._open if resource not in seen]
        observations += [Observation(resource, latest) for resource in gone]
        await self._apply(observations)
        await self._save_cursor(listings[_VMS].revision)
        log.info("meter: %d resources billed now", len(self._open))
        return {prefix: listing.revision for prefix, listing in listings.items()}

    async def _follow(self, revisions: dict[str, int], stop: asyncio.Event) -> None:
        queue: asyncio.Queue[WatchEvent] = asyncio.Queue(maxsize=QUEUE_SIZE)
        tasks = [
            asyncio.create_task(self._watch(prefix, revision + 1, queue))
            for prefix, revision in revisions.items()
        ]
        tasks.append(asyncio.create_task(self._process(queue)))
        tasks.append(asyncio.create_task(asyncio.sleep(self.resync_seconds)))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [stopping, *tasks]:
                task.cancel()
            for task in [stopping, *tasks]:
                with contextlib.suppress(asyncio.CancelledError):
                    await task  # re-raises a task's error for run() to handle

    async def _watch(
        self, prefix: str, from_revision: int, queue: asyncio.Queue[WatchEvent]
    ) -> None:
        async with self.store.watch(prefix, from_revision=from_revision) as events:
            async for event in events:
                await queue.put(event)  # waits while the meter is behind: nothing dropped

    async def _process(self, queue: asyncio.Queue[WatchEvent]) -> None:
        """Turns the changes into intervals, a round of waiting changes at a time, so a
        burst of thousands is written in a few transactions."""
        while True:
            events = [await queue.get()]
            while len(events) < EVENTS_PER_ROUND and not queue.empty():
                events.append(queue.get_nowait())
            observations = []
            for event in events:
                try:
                    observation = self._observe_event(event)
                except Exception:  # one bad record must not stop the meter
                    log.exception("meter: cannot read the change of %s; skipped", event.key)
                    continue
                if observation is not None:
                    observations.append(observation)
            await self._apply(observations)
            vm_revisions = [event.revision for event in events if event.key.startswith(_VMS)]
            if vm_revisions and time.monotonic() - self._cursor_saved_at >= CURSOR_SECONDS:
                await self._save_cursor(max(vm_revisions))

    # -- what happened while no meter ran ------------------------------------------------

    async def _replay_vms(self, cursor: int, listing: RangeResult) -> None:
        """Meters the VM statuses written since `cursor` (up to the listing), in order, so
        a VM stopped and started again, or deleted, while no meter ran is billed by its
        agent's times rather than as if it ran on until now. A history compacted away
        meanwhile leaves the listing alone to go by (logged).

        Raises:
            StoreError: the store cannot be reached.
        """
        for kv in listing.kvs:  # records only: a status counts from the history
            if "/" not in kv.key[len(_VMS) :]:
                self._on_vm_key(kv.key, kv, kv.mod_revision)
        listed = {kv.key[len(_VMS) :].partition("/")[0] for kv in listing.kvs}
        for interval in self._open.values():  # deleted meanwhile: as it was billed
            flavor = interval.flavor
            if flavor is not None and interval.resource not in listed:
                self._vms[interval.resource] = _Vm(interval.project, flavor)
        # The history is read until it holds every listed change and every deletion of
        # a VM still billed, or (a history without them) goes quiet.
        unseen = {(kv.key, kv.mod_revision) for kv in listing.kvs if kv.mod_revision > cursor}
        deleted_unseen = {vm_id for vm_id in self._vms if vm_id not in listed}
        observations: list[Observation] = []
        try:
            async with self.store.watch(_VMS, from_revision=cursor + 1) as events:
                while unseen or deleted_unseen:
                    event = await asyncio.wait_for(anext(events), REPLAY_IDLE_SECONDS)
                    if event.revision > listing.revision:
                        break
                    unseen.discard((event.key, event.revision))
                    if event.type is EventType.DELETE:
                        deleted_unseen.discard(event.key[len(_VMS) :].partition("/")[0])
                    observation = self._replayed(event)
                    if observation is not None:
                        observations.append(observation)
        except TimeoutError:
            log.warning("meter: the VM history since revision %d ends early", cursor)
        except CompactedError:
            log.warning("meter: the VM history since revision %d is compacted away", cursor)
        await self._apply(observations)
        self._vms.clear()  # the listing says how things are now
        self._vm_statuses.clear()

    def _replayed(self, event: WatchEvent) -> Observation | None:
        """A status change as the meter would have seen it; a record change only updates
        what the meter knows (its status is that of the history, not of now)."""
        kv = None
        if event.type is EventType.PUT:
            kv = KeyValue(
                event.key, event.value, event.create_revision, event.revision, event.version
            )
        vm_id = self._on_vm_key(event.key, kv, event.revision)
        if vm_id is None or not event.key.endswith("/status"):
            return None
        return self._observe_vm(vm_id, event.revision)

    async def _read_cursor(self) -> int | None:
        kv = await self.store.get(METER_CURSOR_KEY)
        if kv is None or not isinstance(kv.value, int) or isinstance(kv.value, bool):
            return None
        return kv.value

    async def _save_cursor(self, revision: int) -> None:
        """Saves how far VM changes are metered (a second meter may save an older one:
        that only replays more, and a replay never counts twice)."""
        if revision > self._vm_cursor:
            self._vm_cursor = revision
            await self.store.put(METER_CURSOR_KEY, revision)
        self._cursor_saved_at = time.monotonic()

    # -- reading the records ------------------------------------------------------------

    def _observe_event(self, event: WatchEvent) -> Observation | None:
        kv = None
        if event.type is EventType.PUT:
            kv = KeyValue(
                event.key, event.value, event.create_revision, event.revision, event.version
            )
        if event.key.startswith(_VMS):
            vm_id = self._on_vm_key(event.key, kv, event.revision)
            return None if vm_id is None else self._observe_vm(vm_id, event.revision)
        prefix, observe = (
            (_VOLUMES, self._observe_volume)
            if event.key.startswith(_VOLUMES)
            else (_FIPS, self._observe_floating_ip)
        )
        resource = event.key[len(prefix) :]
        return None if "/" in resource else observe(resource, kv, event.revision)

    def _on_vm_key(self, key: str, kv: KeyValue | None, revision: int) -> str | None:
        """Keeps a VM's record or status as read; returns the VM's id (None: neither)."""
        vm_id, _, rest = key[len(_VMS) :].partition("/")
        if rest == "":
            if kv is None:
                self._vms.pop(vm_id, None)
                self._vm_statuses.pop(vm_id, None)
                return vm_id
            try:
                record = VmRecord.from_json(kv.value)
            except InvalidInput as error:
                log.error("meter: %s is not a valid VM record, not metered: %s", key, error)
                return None
            flavor = record.spec.flavor
            metered = MeteredFlavor(
                name=flavor.name, vcpus=flavor.vcpus, memory_mb=flavor.memory_mb
            )
            self._vms[vm_id] = _Vm(record.project, metered)
            self._projects[vm_id] = record.project
            return vm_id
        if rest != "status":
            return None
        if kv is None:
            self._vm_statuses.pop(vm_id, None)
            return vm_id
        try:
            self._vm_statuses[vm_id] = (VmStatus.from_json(kv.value), kv.mod_revision)
        except InvalidInput as error:
            log.error("meter: %s is not a valid VM status, ignored: %s", key, error)
            self._vm_statuses.pop(vm_id, None)
        return vm_id

    def _observe_vm(self, vm_id: str, revision: int) -> Observation:
        vm = self._vms.get(vm_id)
        status, status_revision = self._vm_statuses.get(vm_id, (None, 0))
        if vm is None or status is None or status.state not in BILLED_VM_STATES:
            until = status.updated_at if status is not None else None
            return Observation(vm_id, revision, until=until)
        flavor = vm.flavor
        if status.flavor is not None:  # what QEMU really runs with
            ran = status.flavor
            flavor = MeteredFlavor(name=ran.name, vcpus=ran.vcpus, memory_mb=ran.memory_mb)
        wanted = UsageInterval(
            project=vm.project,
            resource=vm_id,
            kind=MeteredKind.VM,
            opening=opening_id(status_revision),
            flavor=flavor,
            started_at=status.updated_at,
        )
        guard = Compare.mod_revision(status_key(Kind.VM, vm_id), "==", status_revision)
        return Observation(vm_id, status_revision, wanted, guard=guard)

    def _observe_volume(self, volume_id: str, kv: KeyValue | None, revision: int) -> Observation:
        if kv is None:
            return Observation(volume_id, revision)
        record = VolumeRecord.from_json(kv.value)
        kind, size = MeteredKind.VOLUME, record.spec.size_gb
        return self._observe_record(kv, volume_id, record, kind, size)

    def _observe_floating_ip(self, fip_id: str, kv: KeyValue | None, revision: int) -> Observation:
        if kv is None:
            return Observation(fip_id, revision)
        record = FloatingIpRecord.from_json(kv.value)
        return self._observe_record(kv, fip_id, record, MeteredKind.FLOATING_IP, None)

    def _observe_record(
        self,
        kv: KeyValue,
        resource: str,
        record: VolumeRecord | FloatingIpRecord,
        kind: MeteredKind,
        size_gb: int | None,
    ) -> Observation:
        """A volume or floating IP: billed from creation until deleted or asked to be."""
        project, created_at = record.project, record.created_at
        self._projects[resource] = project
        if record.deleting:
            return Observation(resource, kv.mod_revision)
        # Its first interval starts at its creation; a later one (a resize) now: the
        # record keeps no time of the change.
        started_at = created_at if resource not in self._open else self.clock()
        wanted = UsageInterval(
            project=project,
            resource=resource,
            kind=kind,
            opening=opening_id(kv.mod_revision),
            size_gb=size_gb,
            started_at=started_at,
        )
        guard = Compare.mod_revision(kv.key, "==", kv.mod_revision)
        return Observation(resource, kv.mod_revision, wanted, guard=guard)

    # -- writing the intervals ----------------------------------------------------------

    async def _apply(self, observations: list[Observation]) -> None:
        """Plans every observation in order on the open intervals as they will be, writes
        the changes in batches, and looks again at the resources whose writes lost."""
        moment = self.clock()
        changes: list[Change] = []
        for observation in observations:
            observation = self._continued(observation)
            self._latest[observation.resource] = observation
            change = plan(observation, self._open.get(observation.resource), moment)
            if change is not None:
                changes.append(change)
                self._set_open(observation.resource, change.open_after)
            elif observation.wanted is None and observation.resource not in self._open:
                self._forget(observation.resource)
        lost = await self._write(changes)
        for resource in lost:
            await self._retry(resource)

    def _continued(self, observation: Observation) -> Observation:
        """Billed on the same terms as the news before: the same run, so it keeps the
        opening and start of the change that began it (only the guard is newer, so an
        open written late still starts when the run did)."""
        before = self._latest.get(observation.resource)
        wanted = observation.wanted
        if (
            wanted is None
            or before is None
            or before.wanted is None
            or before.revision >= observation.revision
            or not before.wanted.same_terms(wanted)
        ):
            return observation
        carried = {"opening": before.wanted.opening, "started_at": before.wanted.started_at}
        return replace(observation, wanted=wanted.model_copy(update=carried))

    async def _write(self, changes: list[Change]) -> set[str]:
        """Writes the changes; returns the resources of those that lost a race."""
        lost: set[str] = set()
        for batch in batches(changes):
            if await self._txn(batch):
                continue
            for change in batch:
                if len(batch) == 1 or not await self._txn([change]):
                    lost.add(change.resource)
        self.lost_races += len(lost)
        return lost

    async def _txn(self, batch: list[Change]) -> bool:
        compares = [compare for change in batch for compare in change.compares]
        operations = [operation for change in batch for operation in change.operations]
        return (await self.store.txn(compares, operations)).succeeded

    async def _retry(self, resource: str) -> None:
        """Another meter wrote first, or the record moved on: read the open interval again
        and plan once more from the latest news (a newer change brings its own)."""
        project = self._projects.get(resource)
        if project is None:
            return
        kv = await self.store.get(open_meter_key(project, resource))
        current = None
        if kv is not None:
            with contextlib.suppress(InvalidInput):
                current = UsageInterval.from_json(kv.value)
        self._set_open(resource, current)
        latest = self._latest.get(resource)
        change = None if latest is None else plan(latest, current, self.clock())
        if change is not None and await self._txn([change]):
            self._set_open(resource, change.open_after)

    def _set_open(self, resource: str, interval: UsageInterval | None) -> None:
        if interval is None:
            self._open.pop(resource, None)
        else:
            self._open[resource] = interval

    def _forget(self, resource: str) -> None:
        """A resource not billed and with nothing open: keep no memory of it unless it lives."""
        if resource not in self._vms:
            self._latest.pop(resource, None)
            self._projects.pop(resource, None)

    # -- retention ------------------------------------------------------------------------

    async def _prune_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                removed = await self.prune()
                if removed:
                    log.info(
                        "meter: removed %d usage intervals older than %d days",
                        removed,
                        self.config.keep_days,
                    )
            except Exception as error:
                log.warning("meter: pruning failed (%s); trying again later", error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PRUNE_SECONDS)

    async def prune(self) -> int:
        """Deletes closed intervals that ended more than `keep_days` ago; returns how many.
        Reads a page at a time, so years of history never sit in memory at once.

        Raises:
            StoreError: the store cannot be reached.
        """
        horizon = self.clock() - timedelta(days=self.config.keep_days)
        removed = 0
        start: str | None = None
        while True:
            page = (await self.store.range(METER_PREFIX, limit=LIST_PAGE, start=start)).kvs
            old = [kv.key for kv in page if _ended_before(kv, horizon)]
            for first in range(0, len(old), MAX_TXN_OPERATIONS):
                chunk = old[first : first + MAX_TXN_OPERATIONS]
                await self.store.txn([], [Delete(key) for key in chunk])
                removed += len(chunk)
            if len(page) < LIST_PAGE:
                return removed
            start = page[-1].key + "\x00"


def _ended_before(kv: KeyValue, horizon: datetime) -> bool:
    try:
        ended_at = UsageInterval.from_json(kv.value).ended_at
    except InvalidInput:
        return False
    return ended_at is not None and ended_at < horizon
