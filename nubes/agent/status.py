"""Writing a record's observed status: compare-and-swap on the status key, and only when
something the user can see has changed.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel

from nubes.store.base import Compare, KeyValue, Put, Store

StatusT = TypeVar("StatusT", bound=BaseModel)

_IGNORED = frozenset({"updated_at"})


def differs(old: BaseModel | None, new: BaseModel) -> bool:
    """Whether `new` says anything `old` did not (the timestamp alone is not news)."""
    if old is None:
        return True
    return old.model_dump(exclude=set(_IGNORED)) != new.model_dump(exclude=set(_IGNORED))


class StatusWriter:
    """Keeps the last status it read or wrote for one key and swaps it atomically.

    The agent is the only writer of its records' status; the compare still guards
    against a second agent that wrongly believes it owns the record.
    """

    def __init__(self, store: Store, key: str) -> None:
        self._store = store
        self.key = key
        self._known: KeyValue | None = None
        self._loaded = False

    async def read(self) -> KeyValue | None:
        self._known = await self._store.get(self.key)
        self._loaded = True
        return self._known

    async def write(self, status: BaseModel) -> bool:
        """Stores `status`; False when someone else changed the key meanwhile (read again)."""
        if not self._loaded:
            await self.read()
        compare = (
            Compare.absent(self.key) if self._known is None else Compare.unchanged(self._known)
        )
        value = status.model_dump(mode="json")
        result = await self._store.txn([compare], [Put(self.key, value)])
        if not result.succeeded:
            await self.read()
            return False
        self._known = KeyValue(
            key=self.key,
            value=value,
            create_revision=self._known.create_revision if self._known else result.revision,
            mod_revision=result.revision,
            version=(self._known.version if self._known else 0) + 1,
            lease=0,
        )
        return True

    async def delete(self) -> None:
        await self._store.delete(self.key)
        self._known = None
