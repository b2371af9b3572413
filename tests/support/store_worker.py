"""A separate process that uses the store, for the cross-process tests and the benchmark.

python -m tests.support.store_worker increment <db> <key> <count>
python -m tests.support.store_worker put-many <db> <prefix> <count>
python -m tests.support.store_worker hold-lease <db> <key> <ttl>
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from nubes.store import Compare, Put
from nubes.store.sqlite import SqliteStore


async def increment(path: Path, key: str, count: int) -> None:
    async with await SqliteStore.open(path, timeout=30) as store:
        for _ in range(count):
            while True:
                current = await store.get(key)
                guard = Compare.absent(key) if current is None else Compare.unchanged(current)
                value = 1 if current is None else current.value + 1
                if (await store.txn([guard], [Put(key, value)])).succeeded:
                    break


async def put_many(path: Path, prefix: str, count: int) -> None:
    async with await SqliteStore.open(path, timeout=30) as store:
        for index in range(count):
            await store.put(f"{prefix}{index:06d}", index)


async def hold_lease(path: Path, key: str, ttl: int) -> None:
    """Attach `key` to a fresh lease, say so, then wait to be killed (never revoking it)."""
    async with await SqliteStore.open(path, timeout=30) as store:
        lease = await store.lease_grant(ttl)
        await store.put(key, {"holder": "worker"}, lease=lease.id)
        print("ready", flush=True)
        await asyncio.sleep(3600)


def main() -> None:
    mode, path, name, number = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    work = {"increment": increment, "put-many": put_many, "hold-lease": hold_lease}[mode]
    asyncio.run(work(path, name, number))


if __name__ == "__main__":
    main()
