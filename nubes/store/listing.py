"""Reading a whole prefix in pages: one read of tens of thousands of records would pass
etcd's message size limit, and a large SQLite read would hold the event loop.
"""

from __future__ import annotations

from nubes.store.base import RangeResult, Store

LIST_PAGE = 500


async def range_all(store: Store, prefix: str, page_size: int = LIST_PAGE) -> RangeResult:
    """Every key under `prefix`, read in pages at increasing revisions; the result carries
    the first page's revision, so a watch from the next one misses no change.

    Raises:
        StoreError: the store cannot be reached.
    """
    first = await store.range(prefix, limit=page_size)
    kvs, page = list(first.kvs), first.kvs
    while len(page) == page_size:
        page = (await store.range(prefix, limit=page_size, start=page[-1].key + "\x00")).kvs
        kvs += page
    return RangeResult(kvs, first.revision)
