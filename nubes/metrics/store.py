"""Store latency: a Store that times every request of the one it wraps.

`open_store` wraps every store it opens, so the API, scheduler and agent all measure
the store they use; each component's registry exposes the histogram of its store.
Watches are streams, not requests, and are passed through untimed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from prometheus_client import Counter, Histogram
from prometheus_client.registry import CollectorRegistry

from nubes.store.base import (
    Compare,
    JsonValue,
    KeyValue,
    Lease,
    RangeResult,
    Store,
    TxnOperation,
    TxnResult,
    Watch,
)

# A SQLite read takes tens of microseconds, an etcd transaction milliseconds.
STORE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    float("inf"),
)
OPERATIONS = (
    "get",
    "range",
    "put",
    "delete",
    "txn",
    "current_revision",
    "compact",
    "lease_grant",
    "lease_keepalive",
    "lease_revoke",
)

T = TypeVar("T")


class StoreMetrics:
    """The latency histogram and error counter of one store, by operation."""

    def __init__(self) -> None:
        # registry=None: the metrics belong to no registry until a component adds them.
        self.latency = Histogram(
            "nubes_store_request_seconds",
            "Time a store request took, by operation (watches are not counted)",
            ["operation"],
            registry=None,
            buckets=STORE_BUCKETS,
        )
        self.errors = Counter(
            "nubes_store_errors",
            "Store requests that raised, by operation",
            ["operation"],
            registry=None,
        )
        # Children bound once: a request then costs two clock reads and one observe.
        self.observers = {op: self.latency.labels(op).observe for op in OPERATIONS}
        self.failures = {op: self.errors.labels(op).inc for op in OPERATIONS}

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(self.latency)
        registry.register(self.errors)


class MeteredStore(Store):
    """Delegates to `inner`, timing each request into `metrics`."""

    def __init__(self, inner: Store, metrics: StoreMetrics | None = None) -> None:
        self.inner = inner
        self.metrics = metrics or StoreMetrics()

    async def _timed(self, operation: str, request: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await request
        except Exception:
            self.metrics.failures[operation]()
            raise
        finally:
            self.metrics.observers[operation](time.perf_counter() - started)

    async def get(self, key: str) -> KeyValue | None:
        return await self._timed("get", self.inner.get(key))

    async def range(
        self, prefix: str, *, limit: int | None = None, start: str | None = None
    ) -> RangeResult:
        return await self._timed("range", self.inner.range(prefix, limit=limit, start=start))

    async def put(self, key: str, value: JsonValue, *, lease: int = 0) -> int:
        return await self._timed("put", self.inner.put(key, value, lease=lease))

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        return await self._timed("delete", self.inner.delete(key, prefix=prefix))

    async def txn(
        self,
        compares: Sequence[Compare],
        on_success: Sequence[TxnOperation] = (),
        on_failure: Sequence[TxnOperation] = (),
    ) -> TxnResult:
        return await self._timed("txn", self.inner.txn(compares, on_success, on_failure))

    def watch(self, prefix: str, from_revision: int | None = None) -> Watch:
        return self.inner.watch(prefix, from_revision)

    async def current_revision(self) -> int:
        return await self._timed("current_revision", self.inner.current_revision())

    async def compact(self, revision: int) -> None:
        await self._timed("compact", self.inner.compact(revision))

    async def lease_grant(self, ttl: int) -> Lease:
        return await self._timed("lease_grant", self.inner.lease_grant(ttl))

    async def lease_keepalive(self, lease_id: int) -> int:
        return await self._timed("lease_keepalive", self.inner.lease_keepalive(lease_id))

    async def lease_revoke(self, lease_id: int) -> None:
        await self._timed("lease_revoke", self.inner.lease_revoke(lease_id))

    async def close(self) -> None:
        await self.inner.close()


def store_metrics_of(store: Store) -> StoreMetrics | None:
    """The latency metrics of `store` when it is metered (stores from `open_store` are)."""
    return store.metrics if isinstance(store, MeteredStore) else None
