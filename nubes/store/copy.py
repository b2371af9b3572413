"""Copying every record from one store to another: how the SQLite state of a one-machine
cloud moves to an etcd cluster when hosts are added (`nubes store copy`).
"""

from __future__ import annotations

from dataclasses import dataclass

from nubes.errors import Conflict
from nubes.store.base import Compare, Put, Store
from nubes.store.keys import ROOT, Kind, kind_prefix

PAGE = 500
BATCH = 64  # puts per transaction, half of etcd's default --max-txn-ops


@dataclass(frozen=True)
class CopyResult:
    copied: int
    leased_skipped: int  # heartbeats and imports in progress: they belong to live processes


class TargetNotEmpty(Conflict):
    code = "store_not_empty"


class DaemonsRunning(Conflict):
    code = "daemons_running"


async def copy_store(source: Store, target: Store) -> CopyResult:
    """Copies every key under /nubes/ of `source` into `target`, which must hold none.

    Lease-bound keys (a host's heartbeat, an import in progress) are left out: they are
    only true while their process runs, and the processes are stopped. Each batch only
    creates keys (compared absent), so a second copy running at once fails rather than
    mixes two states.

    Raises:
        DaemonsRunning: a host's agent is alive on `source` (the state could change).
        TargetNotEmpty: `target` already holds nubes records.
        StoreError: a store could not be read or written.
    """
    hosts = await source.range(kind_prefix(Kind.HOST))
    alive = next((kv.key for kv in hosts.kvs if kv.key.endswith("/alive")), None)
    if alive is not None:
        raise DaemonsRunning(
            f"an agent is alive ({alive}): the state could change during the copy",
            hint="stop every nubes daemon first (nubes down, or systemctl stop nubes-*); "
            "a host stays alive until its heartbeat lapses",
        )
    if (await target.range(ROOT, limit=1)).kvs:
        raise TargetNotEmpty(
            "the target store already holds nubes records",
            hint="copy into an empty etcd cluster (or remove its /nubes/ keys first)",
        )
    copied = skipped = 0
    start: str | None = None
    batch: list[Put] = []
    while True:
        page = await source.range(ROOT, limit=PAGE, start=start)
        for kv in page.kvs:
            if kv.lease:
                skipped += 1
                continue
            batch.append(Put(kv.key, kv.value))
            if len(batch) == BATCH:
                copied += await _write(target, batch)
                batch = []
        if len(page.kvs) < PAGE:
            break
        start = page.kvs[-1].key + "\x00"
    if batch:
        copied += await _write(target, batch)
    return CopyResult(copied=copied, leased_skipped=skipped)


async def _write(target: Store, batch: list[Put]) -> int:
    result = await target.txn([Compare.absent(put.key) for put in batch], batch)
    if not result.succeeded:
        raise TargetNotEmpty(
            "another writer put nubes records into the target store during the copy",
            hint="make sure nothing else uses the etcd cluster, empty it, and copy again",
        )
    return len(batch)
