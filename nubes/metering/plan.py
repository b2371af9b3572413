"""What the meter writes for one observation of a resource: pure logic, no store.

An observation says which open interval a resource should have now (or none); the plan
is the guarded transaction that brings its intervals there: open one, close one, or
close one and open the next on new terms (a resize), never anything for news older than
the interval already open.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from nubes.metering.interval import UsageInterval, opening_id
from nubes.store.base import MAX_TXN_OPERATIONS, Compare, Delete, Put, TxnOperation


@dataclass(frozen=True, slots=True)
class Observation:
    """What a resource's records say at `revision`.

    `wanted` is the open interval it should have (its opening is the revision of the
    change that made it billable on these terms), None when it is not billable; `until`
    is when it stopped being billable, when the records say (else the meter's clock);
    `guard` holds while the record that makes it billable is still as read.
    """

    resource: str
    revision: int
    wanted: UsageInterval | None = None
    until: datetime | None = None
    guard: Compare | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """One resource's guarded writes, and its open interval once they are done."""

    resource: str
    compares: list[Compare] = field(default_factory=list)
    operations: list[TxnOperation] = field(default_factory=list)
    open_after: UsageInterval | None = None


def plan(observation: Observation, current: UsageInterval | None, now: datetime) -> Change | None:
    """The writes that bring a resource whose open interval is `current` to what
    `observation` says, or None when there is nothing to write."""
    wanted = observation.wanted
    if current is None and wanted is None:
        return None
    if current is not None:
        if current.opening >= opening_id(observation.revision):
            return None  # the interval already open comes from news at least as new
        if wanted is not None and wanted.same_terms(current):
            return None
    change = Change(observation.resource)
    end = now
    if current is not None:
        end = (wanted.started_at if wanted is not None else observation.until) or now
        end = max(end, current.started_at)
        closed = current.model_copy(update={"ended_at": end})
        change.compares.append(Compare.value(current.key, "==", current.to_json()))
        change.operations.extend([Delete(current.key), Put(closed.key, closed.to_json())])
    if wanted is not None:
        if current is not None:
            wanted = wanted.model_copy(update={"started_at": end})  # no gap, no overlap
        else:
            change.compares.append(Compare.absent(wanted.key))
        # An interval once closed is never opened again (a late meter replaying old news).
        closed_key = wanted.model_copy(update={"ended_at": wanted.started_at}).key
        change.compares.append(Compare.absent(closed_key))
        if observation.guard is not None:
            change.compares.append(observation.guard)
        change.operations.append(Put(wanted.key, wanted.to_json()))
    return Change(change.resource, change.compares, change.operations, wanted)


def batches(changes: Sequence[Change]) -> Iterator[list[Change]]:
    """The changes in order, cut into transactions etcd takes (at most MAX_TXN_OPERATIONS
    compares and as many writes), with at most one change per resource in each, since a
    transaction checks every compare before it writes."""
    batch: list[Change] = []
    compares = operations = 0
    resources: set[str] = set()
    for change in changes:
        if batch and (
            change.resource in resources
            or compares + len(change.compares) > MAX_TXN_OPERATIONS
            or operations + len(change.operations) > MAX_TXN_OPERATIONS
        ):
            yield batch
            batch, compares, operations, resources = [], 0, 0, set()
        batch.append(change)
        resources.add(change.resource)
        compares += len(change.compares)
        operations += len(change.operations)
    if batch:
        yield batch
