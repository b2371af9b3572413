"""The embedded store: etcd semantics on one SQLite file in WAL mode, shared by processes.

As in k3s's kine, a global revision counts every write transaction, a log
table keeps the history watches read from, and leases are rows with an
expiry. Every SQLite call runs on the event loop thread and takes
microseconds; within a process calls never interleave, and across processes
a busy database is retried asynchronously so the loop never blocks on a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from nubes.errors import CompactedError, LeaseNotFound, StoreUnavailable
from nubes.store.base import (
    Compare,
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
    check_key,
    check_txn_size,
    compare_holds,
    decode_value,
    encode_value,
    prefix_end,
    range_start,
)
from nubes.store.bell import ChangeBell, bell_directory

log = logging.getLogger(__name__)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (name, value)
    VALUES ('schema', 1), ('revision', 1), ('compact_revision', 0);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    version INTEGER NOT NULL,
    lease INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_by_lease ON kv (lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS log (
    revision INTEGER NOT NULL,
    position INTEGER NOT NULL,
    key TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    value BLOB,
    create_revision INTEGER NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (revision, position)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS lease (
    id INTEGER PRIMARY KEY,
    ttl INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
"""

_SELECT_KEY = (
    "SELECT key, value, create_revision, mod_revision, version, lease FROM kv WHERE key = ?"
)
_SELECT_RANGE = (
    "SELECT key, value, create_revision, mod_revision, version, lease FROM kv"
    " WHERE key >= ? AND key < ? ORDER BY key LIMIT ?"
)
# Revisions a watch reads per query: bounds memory when it starts far behind.
_WATCH_WINDOW = 1_000
# Without a bell from another process, watchers still look this often.
_SAFETY_POLL_SECONDS = 1.0
_HOUSEKEEPING_MAX_SLEEP = 0.5
_COMPACTION_INTERVAL = 60.0


def _kv_from_row(row: tuple[Any, ...]) -> KeyValue:
    key, value, create_revision, mod_revision, version, lease = row
    return KeyValue(key, decode_value(value), create_revision, mod_revision, version, lease)


def _is_busy(error: sqlite3.OperationalError) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(error) or "busy" in str(error)


def _connect(path: Path) -> sqlite3.Connection:
    # The store holds user-data and token hashes: readable by its owner only.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        path.touch(mode=0o600)
    # timeout=0: a busy database raises at once and is retried without blocking the loop.
    return sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)


class _WriteTransaction:
    """The operations of one write transaction; every change it makes shares one revision."""

    def __init__(self, connection: sqlite3.Connection, revision: int) -> None:
        self.connection = connection
        self.revision = revision
        self.events: list[tuple[Any, ...]] = []

    def current(self, key: str) -> KeyValue | None:
        row = self.connection.execute(_SELECT_KEY, (key,)).fetchone()
        return None if row is None else _kv_from_row(row)

    def get(self, key: str, prefix: bool) -> list[KeyValue]:
        if not prefix:
            found = self.current(key)
            return [] if found is None else [found]
        rows = self.connection.execute(_SELECT_RANGE, (key, prefix_end(key), -1)).fetchall()
        return [_kv_from_row(row) for row in rows]

    def put(self, key: str, value: JsonValue, lease: int) -> None:
        check_key(key)
        if lease and not self._lease_alive(lease):
            raise LeaseNotFound(lease)
        data = encode_value(value)
        previous = self.connection.execute(
            "SELECT create_revision, version FROM kv WHERE key = ?", (key,)
        ).fetchone()
        create_revision, version = (
            (self.revision, 1)
            if previous is None
            else (
                previous[0],
                previous[1] + 1,
            )
        )
        self.connection.execute(
            "INSERT OR REPLACE INTO kv (key, value, create_revision, mod_revision, version, lease)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key, data, create_revision, self.revision, version, lease),
        )
        self.events.append((key, 0, data, create_revision, version))

    def delete(self, key: str, prefix: bool) -> int:
        keys = [kv.key for kv in self.get(key, prefix)]
        for doomed in keys:
            self.connection.execute("DELETE FROM kv WHERE key = ?", (doomed,))
            self.events.append((doomed, 1, None, 0, 0))
        return len(keys)

    def delete_keys_of_lease(self, lease: int) -> None:
        keys = [
            row[0]
            for row in self.connection.execute(
                "SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease,)
            )
        ]
        for doomed in keys:
            self.connection.execute("DELETE FROM kv WHERE key = ?", (doomed,))
            self.events.append((doomed, 1, None, 0, 0))
        self.connection.execute("DELETE FROM lease WHERE id = ?", (lease,))

    def _lease_alive(self, lease: int) -> bool:
        row = self.connection.execute(
            "SELECT expires_at FROM lease WHERE id = ?", (lease,)
        ).fetchone()
        return row is not None and row[0] > time.time()


class SqliteStore(Store):
    """The embedded store. Open it with `await SqliteStore.open(path)`."""

    def __init__(
        self, path: Path, *, timeout: float = 10.0, history_revisions: int = 100_000
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.history_revisions = history_revisions
        self._connection: sqlite3.Connection | None = None
        self._watches: set[_SqliteWatch] = set()
        self._bell: ChangeBell | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._housekeeping_wakeup = asyncio.Event()
        self._data_version = -1

    @classmethod
    async def open(
        cls, path: Path, *, timeout: float = 10.0, history_revisions: int = 100_000
    ) -> SqliteStore:
        """Open (creating when needed) the database at `path`.

        Raises:
            StoreUnavailable: the file cannot be created or opened.
        """
        store = cls(path, timeout=timeout, history_revisions=history_revisions)
        try:
            connection = _connect(path)
        except (OSError, sqlite3.Error) as error:
            raise StoreUnavailable(
                f"cannot open the SQLite store at {path}: {error}",
                hint="check that the directory exists and is writable (store.path in nubes.toml)",
            ) from None
        store._connection = connection
        try:
            await store._retry_busy(store._initialise)
        except StoreUnavailable as error:
            await store.close()
            raise StoreUnavailable(
                f"cannot use {path} as the SQLite store: {error.message}",
                hint="store.path must name a nubes database, or a file that does not exist yet",
            ) from None
        store._bell = ChangeBell(bell_directory(path))
        store._tasks = [
            asyncio.create_task(store._housekeeping(), name="nubes-sqlite-housekeeping"),
            asyncio.create_task(store._safety_poll(), name="nubes-sqlite-safety-poll"),
        ]
        return store

    def _initialise(self) -> None:
        connection = self._db
        connection.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode: commits are atomic and consistent; a power cut may
        # lose the last few, never corrupt the file. FULL would fsync every commit.
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.executescript(_SCHEMA)

    @property
    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            raise StoreUnavailable("the SQLite store is closed")
        return self._connection

    # -- running statements --------------------------------------------------

    async def _retry_busy(self, work: Callable[[], T]) -> T:
        """Run `work`; while another process holds the lock, retry with backoff.

        Every call yields to the loop first: the statements themselves never
        suspend, and a task looping on the store must not starve the others.
        """
        await asyncio.sleep(0)
        deadline = time.monotonic() + self.timeout
        delay = 0.0005
        while True:
            try:
                return work()
            except sqlite3.DatabaseError as error:
                if not (isinstance(error, sqlite3.OperationalError) and _is_busy(error)):
                    raise StoreUnavailable(f"SQLite store error: {error}") from error
                if time.monotonic() > deadline:
                    raise StoreUnavailable(
                        f"the SQLite store at {self.path} stayed locked for {self.timeout:g} s",
                        hint="another process holds a long write transaction; try again",
                    ) from None
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 - jitter
            delay = min(delay * 2, 0.05)

    def _read_now(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in one read transaction: it sees a single snapshot."""
        connection = self._db
        connection.execute("BEGIN")
        try:
            return work(connection)
        finally:
            connection.execute("COMMIT")

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await self._retry_busy(lambda: self._read_now(work))

    def _write_now(self, work: Callable[[_WriteTransaction], T]) -> tuple[T, bool]:
        connection = self._db
        connection.execute("BEGIN IMMEDIATE")
        try:
            (revision,) = connection.execute(
                "SELECT value FROM meta WHERE name = 'revision'"
            ).fetchone()
            transaction = _WriteTransaction(connection, revision + 1)
            result = work(transaction)
            if transaction.events:
                connection.executemany(
                    "INSERT INTO log (revision, position, key, deleted, value,"
                    " create_revision, version) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (transaction.revision, position, *event)
                        for position, event in enumerate(transaction.events)
                    ],
                )
                connection.execute(
                    "UPDATE meta SET value = ? WHERE name = 'revision'", (transaction.revision,)
                )
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return result, bool(transaction.events)

    async def _write(self, work: Callable[[_WriteTransaction], T]) -> T:
        result, changed = await self._retry_busy(lambda: self._write_now(work))
        if changed:
            self._signal_watches()
            if self._bell is not None:
                self._bell.ring()
        return result

    # -- key-value operations --------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        check_key(key)
        row = await self._retry_busy(lambda: self._db.execute(_SELECT_KEY, (key,)).fetchone())
        return None if row is None else _kv_from_row(row)

    async def range(
        self, prefix: str, *, limit: int | None = None, start: str | None = None
    ) -> RangeResult:
        check_key(prefix)
        first = range_start(prefix, start)

        def read(connection: sqlite3.Connection) -> RangeResult:
            rows = connection.execute(
                _SELECT_RANGE, (first, prefix_end(prefix), -1 if limit is None else limit)
            ).fetchall()
            (revision,) = connection.execute(
                "SELECT value FROM meta WHERE name = 'revision'"
            ).fetchone()
            return RangeResult([_kv_from_row(row) for row in rows], revision)

        return await self._read(read)

    async def put(self, key: str, value: JsonValue, *, lease: int = 0) -> int:
        def work(transaction: _WriteTransaction) -> int:
            transaction.put(key, value, lease)
            return transaction.revision

        return await self._write(work)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        check_key(key)
        return await self._write(lambda transaction: transaction.delete(key, prefix))

    async def txn(
        self,
        compares: Sequence[Compare],
        on_success: Sequence[TxnOperation] = (),
        on_failure: Sequence[TxnOperation] = (),
    ) -> TxnResult:
        check_txn_size(on_success, on_failure)
        for compare in compares:
            check_key(compare.key)

        def work(transaction: _WriteTransaction) -> TxnResult:
            succeeded = all(
                compare_holds(compare, transaction.current(compare.key)) for compare in compares
            )
            responses: list[list[KeyValue] | int | None] = []
            for operation in on_success if succeeded else on_failure:
                if isinstance(operation, Put):
                    transaction.put(operation.key, operation.value, operation.lease)
                    responses.append(None)
                elif isinstance(operation, Delete):
                    responses.append(transaction.delete(operation.key, operation.prefix))
                else:
                    responses.append(transaction.get(operation.key, operation.prefix))
            revision = transaction.revision if transaction.events else transaction.revision - 1
            return TxnResult(succeeded, revision, responses)

        if not any(isinstance(op, Put | Delete) for op in (*on_success, *on_failure)):
            # A read-only transaction needs no write lock.
            return await self._read(
                lambda connection: self._read_only_txn(connection, compares, on_success, on_failure)
            )
        return await self._write(work)

    def _read_only_txn(
        self,
        connection: sqlite3.Connection,
        compares: Sequence[Compare],
        on_success: Sequence[TxnOperation],
        on_failure: Sequence[TxnOperation],
    ) -> TxnResult:
        reader = _WriteTransaction(connection, 0)
        succeeded = all(compare_holds(compare, reader.current(compare.key)) for compare in compares)
        responses: list[list[KeyValue] | int | None] = [
            reader.get(operation.key, operation.prefix)
            for operation in (on_success if succeeded else on_failure)
            if isinstance(operation, Get)
        ]
        (revision,) = connection.execute(
            "SELECT value FROM meta WHERE name = 'revision'"
        ).fetchone()
        return TxnResult(succeeded, revision, responses)

    async def current_revision(self) -> int:
        return await self._retry_busy(self._revision_now)

    def _revision_now(self) -> int:
        (revision,) = self._db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        return int(revision)

    async def compact(self, revision: int) -> None:
        def work(transaction: _WriteTransaction) -> None:
            connection = transaction.connection
            (current,) = connection.execute(
                "SELECT value FROM meta WHERE name = 'revision'"
            ).fetchone()
            (compacted,) = connection.execute(
                "SELECT value FROM meta WHERE name = 'compact_revision'"
            ).fetchone()
            if revision > current:
                raise ValueError(f"cannot compact to {revision}: the store is at {current}")
            if revision <= compacted:
                return
            connection.execute("DELETE FROM log WHERE revision < ?", (revision,))
            connection.execute(
                "UPDATE meta SET value = ? WHERE name = 'compact_revision'", (revision,)
            )

        await self._write(work)
        self._signal_watches()  # watchers behind the new horizon must learn it now

    # -- leases -----------------------------------------------------------------

    async def lease_grant(self, ttl: int) -> Lease:
        if ttl < 1:
            raise ValueError(f"a lease lives at least 1 second, got ttl={ttl}")

        def work(transaction: _WriteTransaction) -> Lease:
            while True:
                lease_id = random.randrange(1, 2**62)  # noqa: S311 - an id, not a secret
                try:
                    transaction.connection.execute(
                        "INSERT INTO lease (id, ttl, expires_at) VALUES (?, ?, ?)",
                        (lease_id, ttl, time.time() + ttl),
                    )
                except sqlite3.IntegrityError:
                    continue
                return Lease(lease_id, ttl)

        lease = await self._write(work)
        self._housekeeping_wakeup.set()
        return lease

    async def lease_keepalive(self, lease_id: int) -> int:
        def work(transaction: _WriteTransaction) -> int:
            now = time.time()
            row = transaction.connection.execute(
                "UPDATE lease SET expires_at = ? + ttl WHERE id = ? AND expires_at > ?"
                " RETURNING ttl",
                (now, lease_id, now),
            ).fetchone()
            if row is None:
                raise LeaseNotFound(lease_id)
            return int(row[0])

        return await self._write(work)

    async def lease_revoke(self, lease_id: int) -> None:
        def work(transaction: _WriteTransaction) -> None:
            exists = transaction.connection.execute(
                "SELECT 1 FROM lease WHERE id = ?", (lease_id,)
            ).fetchone()
            if exists is None:
                raise LeaseNotFound(lease_id)
            transaction.delete_keys_of_lease(lease_id)

        await self._write(work)

    async def _expire_leases(self) -> float | None:
        """Revoke every expired lease (one revision each, as etcd does); return the next expiry."""
        while True:
            now = time.time()
            row = await self._retry_busy(
                lambda: self._db.execute(
                    "SELECT id, expires_at FROM lease ORDER BY expires_at LIMIT 1"
                ).fetchone()
            )
            if row is None or row[1] > now:
                return None if row is None else float(row[1])
            lease_id = int(row[0])

            def work(transaction: _WriteTransaction, lease_id: int = lease_id) -> None:
                # Another process may have kept it alive or revoked it meanwhile.
                still_expired = transaction.connection.execute(
                    "SELECT 1 FROM lease WHERE id = ? AND expires_at <= ?", (lease_id, time.time())
                ).fetchone()
                if still_expired is not None:
                    transaction.delete_keys_of_lease(lease_id)

            await self._write(work)

    # -- background work --------------------------------------------------------

    async def _housekeeping(self) -> None:
        """Expire leases on time and compact old history (in every process with the store open)."""
        compacted_at = 0.0
        while True:
            try:
                next_expiry = await self._expire_leases()
                if time.monotonic() - compacted_at > _COMPACTION_INTERVAL:
                    await self._compact_history()
                    compacted_at = time.monotonic()
            except StoreUnavailable as error:
                log.warning("store housekeeping: %s", error)
                next_expiry = None
            sleep = _HOUSEKEEPING_MAX_SLEEP
            if next_expiry is not None:
                sleep = min(sleep, max(0.0, next_expiry - time.time()) + 0.001)
            self._housekeeping_wakeup.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that
            # arrives as the event is set, and close() then waits for a task that lives on.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sleep):
                    await self._housekeeping_wakeup.wait()

    async def _compact_history(self) -> None:
        current = await self.current_revision()
        if current > self.history_revisions:
            await self.compact(current - self.history_revisions)

    async def _safety_poll(self) -> None:
        """Wake watchers when another process wrote and its bell did not reach us."""
        while True:
            await asyncio.sleep(_SAFETY_POLL_SECONDS)
            if not self._watches:
                continue
            try:
                (version,) = self._db.execute("PRAGMA data_version").fetchone()
            except sqlite3.Error:
                continue
            if version != self._data_version:
                self._data_version = version
                self._signal_watches()

    def _signal_watches(self) -> None:
        for watch in self._watches:
            watch.wakeup.set()

    # -- watches ----------------------------------------------------------------

    def watch(self, prefix: str, from_revision: int | None = None) -> Watch:
        check_key(prefix)
        if self._bell is not None:
            self._bell.listen(self._signal_watches)
        if from_revision is None:
            start_after = self._revision_now()
        else:
            if from_revision < 1:
                raise ValueError(f"revisions start at 1, got from_revision={from_revision}")
            start_after = from_revision - 1
        watch = _SqliteWatch(self, prefix, start_after)
        self._watches.add(watch)
        return watch

    def _forget_watch(self, watch: _SqliteWatch) -> None:
        self._watches.discard(watch)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for watch in list(self._watches):
            await watch.close()
        if self._bell is not None:
            self._bell.close()
            self._bell = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class _SqliteWatch(Watch):
    """Reads the log from its own cursor, so it can neither skip nor repeat a change."""

    def __init__(self, store: SqliteStore, prefix: str, delivered_through: int) -> None:
        self._store = store
        self._prefix = prefix
        self._prefix_end = prefix_end(prefix)
        # Every revision up to here has been read (and its matching events queued).
        self._delivered_through = delivered_through
        self._queue: deque[WatchEvent] = deque()
        self._closed = False
        self.wakeup = asyncio.Event()
        self.wakeup.set()

    async def __anext__(self) -> WatchEvent:
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            if self.wakeup.is_set():
                self.wakeup.clear()
                caught_up = await self._store._read(self._read_window)
                if not caught_up:
                    self.wakeup.set()
                continue
            await self.wakeup.wait()
        return self._queue.popleft()

    def _read_window(self, connection: sqlite3.Connection) -> bool:
        """Queue the matching events of the next revisions; True when none are left to read."""
        meta = dict(
            connection.execute(
                "SELECT name, value FROM meta WHERE name IN ('revision', 'compact_revision')"
            ).fetchall()
        )
        current, compacted = int(meta["revision"]), int(meta["compact_revision"])
        wanted = self._delivered_through + 1
        if wanted < compacted:
            raise CompactedError(wanted, compacted)
        upper = min(current, self._delivered_through + _WATCH_WINDOW)
        if upper <= self._delivered_through:
            return True
        rows = connection.execute(
            "SELECT revision, key, deleted, value, create_revision, version FROM log"
            " WHERE revision > ? AND revision <= ? AND key >= ? AND key < ?"
            " ORDER BY revision, position",
            (self._delivered_through, upper, self._prefix, self._prefix_end),
        ).fetchall()
        for revision, key, deleted, value, create_revision, version in rows:
            if deleted:
                self._queue.append(WatchEvent(EventType.DELETE, key, None, revision))
            else:
                self._queue.append(
                    WatchEvent(
                        EventType.PUT, key, decode_value(value), revision, create_revision, version
                    )
                )
        self._delivered_through = upper
        return upper >= current

    async def close(self) -> None:
        self._closed = True
        self.wakeup.set()
        self._store._forget_watch(self)
