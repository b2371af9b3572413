"""Settling a guarded etcd write whose outcome the connection left unknown.

When a member dies or the leader changes mid-call, a write may or may not have been
applied. A transaction that is guarded against running twice (it creates a key it checks
absent, or swaps a key whose mod revision it checks) is safe to send again; when the
second attempt fails its guard, etcd's history tells whether the first one was ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from nubes.store.base import (
    Compare,
    CompareTarget,
    Delete,
    Get,
    KeyValue,
    Put,
    TxnOperation,
    encode_value,
)


@dataclass(frozen=True, slots=True)
class Anchor:
    """A key the transaction writes and guards, so it cannot be applied twice.

    `revision` 0: the key was absent; otherwise its mod revision when the guard was made.
    """

    key: str
    revision: int


def anchor_of(
    compares: Sequence[Compare],
    on_success: Sequence[TxnOperation],
    on_failure: Sequence[TxnOperation],
) -> Anchor | None:
    """The guard that makes sending this transaction again harmless; None when it has none
    (then a second attempt could apply it twice, or its outcome could not be told)."""
    if any(not isinstance(op, Get) for op in on_failure):
        return None  # a second attempt would run the failure branch's writes
    if any(isinstance(op, Get) for op in on_success):
        return None  # its reads could not be rebuilt from history
    written = {op.key for op in on_success if isinstance(op, Put)}
    for compare in compares:
        if compare.key not in written or compare.operator != "==":
            continue
        absent_target = compare.target in (CompareTarget.VERSION, CompareTarget.CREATE_REVISION)
        if absent_target and compare.operand == 0:
            return Anchor(compare.key, 0)
        if compare.target is CompareTarget.MOD_REVISION and compare.operand > 0:
            return Anchor(compare.key, int(compare.operand))
    return None


class History(Protocol):
    """What the settling reads from the store: a key now, a key or a count at a past
    revision. Each raises StoreError when the store cannot answer (a compacted revision)."""

    async def get_now(self, key: str) -> KeyValue | None: ...

    async def get_at(self, key: str, revision: int) -> KeyValue | None: ...

    async def count_at(self, key: str, prefix: bool, revision: int) -> int: ...


async def first_change_after(history: History, anchor: Anchor) -> int | None:
    """The revision at which the anchor key first changed after its guarded state; None
    when it has not changed (the transaction did not apply, yet); 0 when it changed in a
    way no write of this transaction explains.

    Raises:
        StoreError: the history needed was compacted or the store cannot be reached.
    """
    current = await history.get_now(anchor.key)
    if current is None:
        return None if anchor.revision == 0 else 0  # 0: gone, so not by a write of ours
    if anchor.revision == 0:
        return current.create_revision
    if current.mod_revision == anchor.revision:
        return None
    while current.mod_revision > anchor.revision:
        previous = await history.get_at(anchor.key, current.mod_revision - 1)
        if previous is None or previous.mod_revision < anchor.revision:
            return 0  # deleted and made again: not a swap from the guarded state
        if previous.mod_revision == anchor.revision:
            return current.mod_revision
        current = previous
    return 0


async def applied_at(
    history: History, revision: int, on_success: Sequence[TxnOperation]
) -> list[list[KeyValue] | int | None] | None:
    """The success branch's responses when the transaction at `revision` wrote exactly
    what `on_success` writes (so it was this one); None when it was another.

    Raises:
        StoreError: the history needed was compacted or the store cannot be reached.
    """
    responses: list[list[KeyValue] | int | None] = []
    for operation in on_success:
        if isinstance(operation, Put):
            kv = await history.get_at(operation.key, revision)
            if (
                kv is None
                or kv.mod_revision != revision
                or encode_value(kv.value) != encode_value(operation.value)
            ):
                return None
            responses.append(None)
        elif isinstance(operation, Delete):
            responses.append(await history.count_at(operation.key, operation.prefix, revision - 1))
        else:  # pragma: no cover - anchor_of refuses branches with reads
            return None
    return responses
