"""The store interface, with etcd semantics, that every nubes component talks to.

One global revision counts every change; each key carries its create and
modification revisions and a version. Transactions compare then write
atomically; watches deliver every change after a revision exactly once, in
order; keys attached to a lease vanish when it expires. Values are JSON.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, Literal, Self

import orjson

JsonValue = Any
"""A value the store holds: anything JSON can express (records are dicts)."""

CompareOperator = Literal["==", "!=", "<", ">"]

MAX_TXN_OPERATIONS = 128
"""etcd's default --max-txn-ops; every engine refuses bigger transactions alike."""


def encode_value(value: JsonValue) -> bytes:
    """Canonical JSON bytes (sorted keys, compact) so equal documents compare equal."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def decode_value(data: bytes) -> JsonValue:
    return orjson.loads(data)


def check_key(key: str) -> bytes:
    """The key as bytes; keys are printable ASCII so byte order and string order agree.

    Raises:
        ValueError: the key is empty or holds other characters (a bug, not user input).
    """
    if not key or not key.isascii() or not key.isprintable():
        raise ValueError(f"store keys are non-empty printable ASCII, got {key!r}")
    return key.encode("ascii")


def range_start(prefix: str, start: str | None) -> str:
    """Where a range over `prefix` begins when resumed at `start`.

    `start` may end in one NUL to mean "just after that key" (how pages resume).

    Raises:
        ValueError: `start` is not under `prefix`.
    """
    if start is None:
        return prefix
    if not start.startswith(prefix):
        raise ValueError(f"range start {start!r} is not under {prefix!r}")
    check_key(start.removesuffix("\x00"))
    return start


def prefix_end(prefix: str) -> str:
    """The smallest key greater than every key that starts with `prefix`."""
    check_key(prefix)
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: JsonValue
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class RangeResult:
    """Keys in key order, read at one `revision` (watch from `revision + 1` to miss nothing)."""

    kvs: list[KeyValue]
    revision: int


class EventType(StrEnum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change of one key. `value` is None and `version` 0 for a delete."""

    type: EventType
    key: str
    value: JsonValue
    revision: int
    create_revision: int = 0
    version: int = 0


class CompareTarget(StrEnum):
    VALUE = "value"
    VERSION = "version"
    CREATE_REVISION = "create_revision"
    MOD_REVISION = "mod_revision"


@dataclass(frozen=True, slots=True)
class Compare:
    """A condition on one key, checked at the start of a transaction.

    As in etcd: a missing key has version, create and mod revision 0, and a
    comparison of its value is always false.
    """

    key: str
    target: CompareTarget
    operator: CompareOperator
    operand: JsonValue

    def __post_init__(self) -> None:
        check_key(self.key)
        if self.operator not in ("==", "!=", "<", ">"):
            raise ValueError(f"unknown compare operator {self.operator!r}")
        if self.target is not CompareTarget.VALUE and (
            not isinstance(self.operand, int) or isinstance(self.operand, bool)
        ):
            raise TypeError(f"{self.target.value} compares with an int, got {self.operand!r}")

    @classmethod
    def value(cls, key: str, operator: CompareOperator, value: JsonValue) -> Compare:
        return cls(key, CompareTarget.VALUE, operator, value)

    @classmethod
    def version(cls, key: str, operator: CompareOperator, version: int) -> Compare:
        return cls(key, CompareTarget.VERSION, operator, version)

    @classmethod
    def create_revision(cls, key: str, operator: CompareOperator, revision: int) -> Compare:
        return cls(key, CompareTarget.CREATE_REVISION, operator, revision)

    @classmethod
    def mod_revision(cls, key: str, operator: CompareOperator, revision: int) -> Compare:
        return cls(key, CompareTarget.MOD_REVISION, operator, revision)

    @classmethod
    def absent(cls, key: str) -> Compare:
        """True when `key` does not exist."""
        return cls.version(key, "==", 0)

    @classmethod
    def unchanged(cls, kv: KeyValue) -> Compare:
        """True while `kv` is still the current value of its key: the compare-and-swap guard."""
        return cls.mod_revision(kv.key, "==", kv.mod_revision)


def compare_holds(compare: Compare, current: KeyValue | None) -> bool:
    """Evaluate `compare` against the key's current state (None: the key is missing)."""
    if compare.target is CompareTarget.VALUE:
        if current is None:
            return False
        return _apply(compare.operator, encode_value(current.value), encode_value(compare.operand))
    actual = 0 if current is None else getattr(current, compare.target.value)
    return _apply(compare.operator, actual, compare.operand)


def _apply(operator: CompareOperator, left: Any, right: Any) -> bool:
    if operator == "==":
        return bool(left == right)
    if operator == "!=":
        return bool(left != right)
    if operator == "<":
        return bool(left < right)
    return bool(left > right)


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: JsonValue
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class Get:
    key: str
    prefix: bool = False


TxnOperation = Put | Delete | Get


def check_txn_size(*branches: Sequence[TxnOperation]) -> None:
    """Refuse a branch etcd would refuse, whatever the engine, so code moves between them.

    Raises:
        ValueError: a branch holds more than MAX_TXN_OPERATIONS operations.
    """
    for branch in branches:
        if len(branch) > MAX_TXN_OPERATIONS:
            raise ValueError(
                f"a transaction branch holds at most {MAX_TXN_OPERATIONS} operations,"
                f" got {len(branch)}: split the work"
            )


@dataclass(frozen=True, slots=True)
class TxnResult:
    """Outcome of a transaction.

    `responses` has one entry per operation of the branch that ran: the keys
    read for a Get, the number of keys removed for a Delete, None for a Put.
    `revision` is the store revision after the transaction.
    """

    succeeded: bool
    revision: int
    responses: list[list[KeyValue] | int | None]


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl: int


class _Closing(abc.ABC):
    """Something to close after use: `async with` closes it when the block ends."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


class Watch(_Closing):
    """A stream of changes under a prefix, from a revision on: an async iterator.

    Use it as `async with store.watch(prefix) as events: async for event in events: ...`
    so the stream is closed when the block ends.

    Iteration raises CompactedError when the start revision has been compacted
    away, and StoreUnavailable when the store cannot be reached for longer than
    the configured timeout.
    """

    def __aiter__(self) -> AsyncIterator[WatchEvent]:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> WatchEvent: ...


class Store(_Closing):
    """A key-value store with etcd semantics. See the module docstring.

    Every method may raise StoreUnavailable when the store cannot be reached
    within the configured timeout.
    """

    @abc.abstractmethod
    async def get(self, key: str) -> KeyValue | None:
        """The key's current value, or None when it does not exist."""

    @abc.abstractmethod
    async def range(
        self, prefix: str, *, limit: int | None = None, start: str | None = None
    ) -> RangeResult:
        """Every key starting with `prefix`, in key order, read at one revision.

        `start` (a key under `prefix`) skips the keys before it: pages resume there.
        """

    @abc.abstractmethod
    async def put(self, key: str, value: JsonValue, *, lease: int = 0) -> int:
        """Set `key` (attached to `lease` when not 0) and return the new revision.

        Raises:
            LeaseNotFound: `lease` does not exist.
        """

    @abc.abstractmethod
    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Remove `key` (or every key under it when `prefix`); return how many went."""

    @abc.abstractmethod
    async def txn(
        self,
        compares: Sequence[Compare],
        on_success: Sequence[TxnOperation] = (),
        on_failure: Sequence[TxnOperation] = (),
    ) -> TxnResult:
        """Atomically: when every compare holds run `on_success`, else `on_failure`.

        Each branch holds at most MAX_TXN_OPERATIONS operations (ValueError
        beyond). A transaction that writes nothing does not advance the
        revision; one that writes advances it by exactly one, whatever the
        number of writes.

        Raises:
            LeaseNotFound: a Put names a lease that does not exist.
        """

    @abc.abstractmethod
    def watch(self, prefix: str, from_revision: int | None = None) -> Watch:
        """Changes of keys under `prefix` from `from_revision` on (None: from now).

        Every change is delivered exactly once, in revision order (changes of
        one transaction share a revision and keep their order).
        """

    @abc.abstractmethod
    async def current_revision(self) -> int:
        """The revision of the last change."""

    @abc.abstractmethod
    async def compact(self, revision: int) -> None:
        """Forget the history before `revision`; watches from earlier fail with CompactedError."""

    @abc.abstractmethod
    async def lease_grant(self, ttl: int) -> Lease:
        """A new lease that expires `ttl` seconds from now unless kept alive.

        The granted TTL may be longer than asked (etcd enforces a minimum).
        """

    @abc.abstractmethod
    async def lease_keepalive(self, lease_id: int) -> int:
        """Restart the lease's countdown; return its TTL.

        Raises:
            LeaseNotFound: the lease expired or was revoked.
        """

    @abc.abstractmethod
    async def lease_revoke(self, lease_id: int) -> None:
        """End the lease now, deleting every key attached to it.

        Raises:
            LeaseNotFound: the lease expired or was revoked.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and background tasks; open watches end."""
