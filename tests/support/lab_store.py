"""What every lab does with its store: record changes written as the API writes them
(compare-and-swap), and every version of every status kept for tests to wait on (a
status that lasts a few milliseconds is still seen, in the order it was written)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from nubes.store.base import Compare, Put, Store
from nubes.store.keys import ROOT, Kind, resource_key


class LabTimeout(AssertionError):
    """The agent did not bring a record to the awaited status in time."""


class StatusHistory:
    """Follows a store from now on: `/nubes/<kind>/<id>/status` versions under the id,
    `/migration` versions under `<id>/migration`, and "record-deleted" when a record goes."""

    def __init__(self) -> None:
        self.history: dict[str, list[Any]] = {}
        self._changed = asyncio.Event()

    async def follow(self, store: Store) -> None:
        async with store.watch(ROOT) as watch:
            async for event in watch:
                parts = event.key[len(ROOT) :].split("/")
                if len(parts) == 3 and parts[2] in ("status", "migration"):
                    name = parts[1] if parts[2] == "status" else f"{parts[1]}/migration"
                    self.history.setdefault(name, []).append(
                        None if event.type.value == "delete" else event.value
                    )
                elif len(parts) == 2 and event.type.value == "delete":
                    self.history.setdefault(parts[1], []).append("record-deleted")
                self._changed.set()

    def mark(self, name: str) -> int:
        """A point in a record's status history to wait from."""
        return len(self.history.get(name, []))

    async def wait_for(
        self,
        name: str,
        predicate: Callable[[Any], bool],
        *,
        timeout: float = 30.0,
        since: int = 0,
        what: str = "",
    ) -> Any:
        """The first status of `name` (from history index `since`) matching `predicate`."""
        deadline = time.monotonic() + timeout
        while True:
            for value in self.history.get(name, [])[since:]:
                if predicate(value):
                    return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = self.history.get(name, [])[since:][-5:]
                raise LabTimeout(f"{name}: no status {what} within {timeout} s; last: {seen}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_state(
        self, name: str, state: str, *, timeout: float = 30.0, since: int = 0
    ) -> Any:
        """The first status of `name` (from `since`) in `state`, as the stored document."""
        return await self.wait_for(
            name,
            lambda v: isinstance(v, dict) and v.get("state") == state,
            timeout=timeout,
            since=since,
            what=f"state={state}",
        )


class RecordEdits:
    """Changes to records the way the API makes them; the lab provides `db`."""

    @property
    def db(self) -> Store:
        raise NotImplementedError

    async def update(self, kind: Kind, name: str, change: Callable[[dict[str, Any]], None]) -> None:
        """Changes a record with compare-and-swap, as the API does."""
        key = resource_key(kind, name)
        for _ in range(20):
            kv = await self.db.get(key)
            assert kv is not None, f"{key} does not exist"
            document = dict(kv.value)  # type: ignore[arg-type]
            document["spec"] = dict(document["spec"])
            change(document)
            if (await self.db.txn([Compare.unchanged(kv)], [Put(key, document)])).succeeded:
                return
        raise AssertionError(f"could not update {key}")

    async def update_vm(self, vm_id: str, **spec: Any) -> None:
        def change(document: dict[str, Any]) -> None:
            document["spec"].update(spec)

        await self.update(Kind.VM, vm_id, change)

    async def delete(self, kind: Kind, name: str) -> None:
        def change(document: dict[str, Any]) -> None:
            document["deleting"] = True

        await self.update(kind, name, change)
