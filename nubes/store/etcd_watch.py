"""A watch on etcd: one gRPC stream, reopened from the next unseen revision when its
member dies, restarts or loses its leader, so no change is lost or repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Self

import grpc
from aetcd import rpc

from nubes.errors import CompactedError, StoreError
from nubes.store.base import EventType, Watch, WatchEvent, check_key, decode_value, prefix_end

if TYPE_CHECKING:
    from nubes.store.etcd import EtcdStore

TRANSIENT = (grpc.StatusCode.UNAVAILABLE,)
# Asks a member to end a watch when it loses its leader (as etcd's own client does), so a
# member cut off from the cluster cannot feed a watch a stale, silent history.
REQUIRE_LEADER = (("hasleader", "true"),)


class EtcdWatch(Watch):
    """One gRPC watch stream, reopened after a disconnection from the next unseen revision."""

    def __init__(self, store: EtcdStore, prefix: str, from_revision: int | None) -> None:
        self._store = store
        self._prefix = prefix
        self._next_revision = from_revision
        self._queue: deque[WatchEvent] = deque()
        self._call: Any = None
        self._closed = False

    async def __aenter__(self) -> Self:
        await self._ensure_stream()
        return self

    async def __anext__(self) -> WatchEvent:
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            await self._ensure_stream()
            try:
                response = await self._call.read()
            except grpc.aio.AioRpcError as error:
                if self._closed:
                    raise StopAsyncIteration from None
                if error.code() in TRANSIENT or error.code() is grpc.StatusCode.CANCELLED:
                    # Reopen from the next unseen revision, after a pause so that a
                    # stream that keeps breaking as it opens does not spin.
                    self._call = None
                    await asyncio.sleep(random.uniform(0.02, 0.1))  # noqa: S311 - jitter
                    continue
                raise self._store._translate(error) from None
            if response is grpc.aio.EOF:
                self._call = None
                continue
            self._take(response)
        return self._queue.popleft()

    def _take(self, response: Any) -> None:
        if response.canceled:
            self._call = None
            if response.compact_revision:
                raise CompactedError(self._next_revision or 0, int(response.compact_revision))
            raise StoreError(f"etcd cancelled the watch: {response.cancel_reason or 'no reason'}")
        for event in response.events:
            kv = event.kv
            revision = int(kv.mod_revision)
            key = bytes(kv.key).decode("ascii")
            if event.type == rpc.Event.DELETE:
                self._queue.append(WatchEvent(EventType.DELETE, key, None, revision))
            else:
                self._queue.append(
                    WatchEvent(
                        EventType.PUT,
                        key,
                        decode_value(kv.value),
                        revision,
                        int(kv.create_revision),
                        int(kv.version),
                    )
                )
            self._next_revision = revision + 1

    async def _ensure_stream(self) -> None:
        """Open the stream (again), waiting up to the store timeout for etcd to come back."""
        if self._call is not None or self._closed:
            return
        deadline = time.monotonic() + self._store.timeout
        delay = 0.05
        while True:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._open_stream()
                return
            except TimeoutError:
                raise self._store._unavailable(
                    f"could not be reached for {self._store.timeout:g} s to watch {self._prefix}"
                ) from None
            except grpc.aio.AioRpcError as error:
                if error.code() not in TRANSIENT or time.monotonic() > deadline:
                    raise self._store._translate(error) from None
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 - jitter
                delay = min(delay * 2, 1.0)

    async def _open_stream(self) -> None:
        call = self._store._watch_stub.Watch(metadata=REQUIRE_LEADER, wait_for_ready=True)
        request = rpc.WatchCreateRequest(
            key=check_key(self._prefix),
            range_end=prefix_end(self._prefix).encode("ascii"),
            start_revision=self._next_revision or 0,
        )
        try:
            await call.write(rpc.WatchRequest(create_request=request))
            created = await call.read()
        except BaseException:
            call.cancel()
            raise
        if created is grpc.aio.EOF:
            call.cancel()
            raise self._store._unavailable("closed the watch stream as it opened")
        if self._next_revision is None:
            self._next_revision = int(created.header.revision) + 1
        self._call = call
        # The creation answer may already carry a cancellation (compacted start revision).
        if created.canceled or created.events:
            self._take(created)

    async def close(self) -> None:
        self._closed = True
        if self._call is not None:
            with contextlib.suppress(Exception):
                self._call.cancel()
            self._call = None
        self._store._forget_watch(self)
