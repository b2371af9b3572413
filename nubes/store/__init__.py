"""The nubes store: one interface with etcd semantics, an embedded SQLite engine and etcd."""

from __future__ import annotations

from nubes.config import NubesConfig, StoreEngine
from nubes.store.base import (
    Compare,
    CompareTarget,
    Delete,
    EventType,
    Get,
    JsonValue,
    KeyValue,
    Lease,
    Put,
    RangeResult,
    Store,
    TxnOperation,
    TxnResult,
    Watch,
    WatchEvent,
)

__all__ = [
    "Compare",
    "CompareTarget",
    "Delete",
    "EventType",
    "Get",
    "JsonValue",
    "KeyValue",
    "Lease",
    "Put",
    "RangeResult",
    "Store",
    "TxnOperation",
    "TxnResult",
    "Watch",
    "WatchEvent",
    "open_store",
]


async def open_store(config: NubesConfig) -> Store:
    """Open the store the configuration names, timing its requests (nubes.metrics.store).

    Raises:
        StoreUnavailable: the store cannot be opened or reached.
    """
    from nubes.metrics.store import MeteredStore

    store: Store
    if config.store.engine is StoreEngine.ETCD:
        from nubes.store.etcd import EtcdStore

        store = await EtcdStore.connect(config.store.endpoints, timeout=config.store.timeout)
    else:
        from nubes.store.sqlite import SqliteStore

        store = await SqliteStore.open(
            config.sqlite_path,
            timeout=config.store.timeout,
            history_revisions=config.store.history_revisions,
        )
    return MeteredStore(store)
