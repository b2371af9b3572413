"""The API's side of images: finding one the caller may see (its project's or a public one),
and running an import (upload or URL) with its progress published in the image's status.

An import first reserves the name and writes an `importing` status, both bound to a lease
kept alive while it runs, so a crashed API leaves nothing reserved; the record, the name
and the final status are then written in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field

from nubes.agent.storage.fetch import ImageSource
from nubes.agent.storage.images import MAX_IMAGE_BYTES, import_image
from nubes.api.context import ApiContext, Caller
from nubes.api.records import not_found
from nubes.errors import Conflict, InvalidInput, NubesError, StoreError
from nubes.ids import IdKind, is_id, new_id
from nubes.model.common import NAME_PATTERN, now
from nubes.model.image import ImageFormat, ImageRecord, ImageState, ImageStatus
from nubes.store.base import Compare, Delete, KeyValue, Put, Store
from nubes.store.keys import Kind, claim_key, kind_prefix, name_key, resource_key, status_key

log = logging.getLogger(__name__)

PUBLIC_NAMES = "public-image-names"  # claim: a public image's name is unique cloud-wide
IMPORT_LEASE_SECONDS = 30
FAILED_IMPORT_KEPT_SECONDS = 3600
REPORT_INTERVAL = 0.5
_TASKS = "image_import_tasks"


def max_image_bytes(ctx: ApiContext) -> int:
    """The largest disk an upload or import may bring (`ctx.extras["image_max_bytes"]`)."""
    value = ctx.extras.get("image_max_bytes")
    return value if isinstance(value, int) and value > 0 else MAX_IMAGE_BYTES


def public_name_claim(name: str) -> str:
    return claim_key(PUBLIC_NAMES, name)


async def find_image(store: Store, caller: Caller, ref: str) -> tuple[KeyValue, ImageRecord]:
    """The image `ref` names (an id, a name in the caller's project, or a public image's
    name), when the caller may see it: its project's images and every public one.

    Raises:
        NotFound: no such image, or one of another project that is not public.
    """
    kv: KeyValue | None = None
    if is_id(ref, IdKind.IMAGE):
        kv = await store.get(resource_key(Kind.IMAGE, ref))
    elif _is_name(ref):
        for guard_key in (name_key(Kind.IMAGE, caller.project, ref), public_name_claim(ref)):
            guard = await store.get(guard_key)
            if (
                guard is not None
                and isinstance(guard.value, str)
                and is_id(guard.value, IdKind.IMAGE)
            ):
                kv = await store.get(resource_key(Kind.IMAGE, guard.value))
                if kv is not None:
                    break
    if kv is None:
        raise not_found(Kind.IMAGE, ref)
    record = ImageRecord.from_json(kv.value)
    if record.project != caller.project and not record.public:
        raise not_found(Kind.IMAGE, ref)
    return kv, record


async def image_users(store: Store, image_id: str) -> list[str]:
    """The ids of the volumes and VMs (of any project) made from `image_id`."""
    users: list[str] = []
    for kind in (Kind.VOLUME, Kind.VM):
        prefix = kind_prefix(kind)
        listing = await store.range(prefix)
        for kv in listing.kvs:
            ident = kv.key[len(prefix) :]
            # Read loosely: a record that no longer validates still holds its image.
            spec = kv.value.get("spec") if isinstance(kv.value, dict) else None
            if "/" not in ident and isinstance(spec, dict) and spec.get("image") == image_id:
                users.append(ident)
    return users


def _is_name(ref: str) -> bool:
    return re.fullmatch(NAME_PATTERN, ref) is not None


@dataclass
class ImportJob:
    """One import under way: its reservation, its published progress, its outcome."""

    ctx: ApiContext
    caller: Caller
    name: str
    source: str
    public: bool = False
    image_id: str = field(default_factory=lambda: new_id(IdKind.IMAGE))
    lease: int = 0
    file: str | None = None
    bytes_done: int = 0
    bytes_total: int | None = None
    _reported: tuple[str | None, int, int | None] | None = None
    _keepalive_at: float = 0.0

    @property
    def store(self) -> Store:
        return self.ctx.store

    def _guard_keys(self) -> list[str]:
        keys = [name_key(Kind.IMAGE, self.caller.project, self.name)]
        if self.public:
            keys.append(public_name_claim(self.name))
        return keys

    def status(self, state: ImageState, error: NubesError | None = None) -> ImageStatus:
        return ImageStatus(
            state=state,
            project=self.caller.project,
            name=self.name,
            public=self.public,
            source=self.source,
            file=self.file,
            bytes_done=self.bytes_done,
            bytes_total=self.bytes_total,
            code=None if error is None else error.code,
            reason=None if error is None else str(error),
            updated_at=now(),
        )

    async def begin(self) -> ImageStatus:
        """Reserve the name and publish the `importing` status.

        Raises:
            Conflict: the name is taken in the project (or, for a public image, by
                another public image).
            StoreUnavailable: the store cannot be reached.
        """
        guards = self._guard_keys()
        for key in guards:  # the common refusal, before a lease is spent on it
            if await self.store.get(key) is not None:
                raise self._name_taken()
        lease = await self.store.lease_grant(IMPORT_LEASE_SECONDS)
        self.lease = lease.id
        self._keepalive_at = time.monotonic()
        status = self.status(ImageState.IMPORTING)
        result = await self.store.txn(
            [Compare.absent(key) for key in guards],
            [
                *(Put(key, self.image_id, lease=self.lease) for key in guards),
                Put(status_key(Kind.IMAGE, self.image_id), status.to_json(), lease=self.lease),
            ],
        )
        if not result.succeeded:
            await self._drop_lease()
            raise self._name_taken()
        return status

    def _name_taken(self) -> Conflict:
        where = "among public images" if self.public else "in this project"
        return Conflict(
            f"the image name {self.name!r} is already taken {where}",
            hint="choose another name, or delete the image that has it",
        )

    def progress(self, done: int, total: int | None) -> None:
        self.bytes_done, self.bytes_total = done, total

    def next_file(self, name: str) -> None:
        self.file, self.bytes_done, self.bytes_total = name, 0, None

    async def report(self) -> None:
        """Publish the progress when it moved, and keep the lease alive.

        Raises:
            StoreError: the store is unreachable or the lease is gone (the import stops).
        """
        if time.monotonic() - self._keepalive_at > IMPORT_LEASE_SECONDS / 4:
            await self.store.lease_keepalive(self.lease)
            self._keepalive_at = time.monotonic()
        seen = (self.file, self.bytes_done, self.bytes_total)
        if seen != self._reported:
            status = self.status(ImageState.IMPORTING)
            await self.store.put(
                status_key(Kind.IMAGE, self.image_id), status.to_json(), lease=self.lease
            )
            self._reported = seen

    async def register(self, record: ImageRecord) -> None:
        """Write the record, keep the name for good and mark the import active, at once.

        Raises:
            Conflict: the reservation was lost (the lease ran out) or the id is taken.
        """
        guards = self._guard_keys()
        key = resource_key(Kind.IMAGE, record.id)
        if self.bytes_total is None:
            self.bytes_total = self.bytes_done
        result = await self.store.txn(
            [Compare.absent(key), *(Compare.value(g, "==", self.image_id) for g in guards)],
            [
                Put(key, record.to_json()),
                *(Put(g, self.image_id) for g in guards),
                Put(status_key(Kind.IMAGE, record.id), self.status(ImageState.ACTIVE).to_json()),
            ],
        )
        if not result.succeeded:
            raise Conflict(
                f"the import of image {self.name!r} lost its reservation of the name "
                "(it stalled for longer than the lease)",
                hint="import it again",
            )

    async def finish(self) -> None:
        """Let go of the lease once the image is registered (its keys no longer use it)."""
        await self._drop_lease()

    async def discard(self) -> None:
        """Remove every trace of a failed upload: the status and the name reservation."""
        await self._release([Delete(status_key(Kind.IMAGE, self.image_id))])

    async def fail(self, error: NubesError) -> None:
        """Keep a `failed` status for a while (for the client polling it); free the name."""
        kept = await self.store.lease_grant(FAILED_IMPORT_KEPT_SECONDS)
        status = self.status(ImageState.FAILED, error)
        await self._release(
            [Put(status_key(Kind.IMAGE, self.image_id), status.to_json(), lease=kept.id)]
        )

    async def _release(self, operations: list[Put | Delete]) -> None:
        writes: list[Put | Delete] = list(operations)
        for key in self._guard_keys():
            guard = await self.store.get(key)
            if guard is not None and guard.value == self.image_id:
                writes.append(Delete(key))
        with contextlib.suppress(StoreError):
            await self.store.txn([], writes)
        await self._drop_lease()

    async def _drop_lease(self) -> None:
        # Keys re-put without the lease are detached from it; the rest go with it.
        if self.lease:
            with contextlib.suppress(StoreError):
                await self.store.lease_revoke(self.lease)
            self.lease = 0

    async def run(
        self,
        source: ImageSource,
        *,
        kernel: ImageSource | None = None,
        initrd: ImageSource | None = None,
        cmdline: str | None = None,
        disk_format: ImageFormat | None = None,
        allow_hosts: Collection[str] | None = None,
    ) -> ImageRecord:
        """Import into the image store while publishing progress; `begin` came first.

        Raises:
            NubesError: whatever import_image raises (see there); nothing is left behind
                by it, the reservation is kept for `fail` or `discard` to release.
        """
        reporter = asyncio.create_task(self._report_forever())
        try:
            return await import_image(
                self.store,
                self.ctx.image_dir,
                source,
                name=self.name,
                project=self.caller.project,
                kernel=kernel,
                initrd=initrd,
                cmdline=cmdline,
                progress=self.progress,
                on_file=self.next_file,
                max_bytes=max_image_bytes(self.ctx),
                disk_format=disk_format,
                image_id=self.image_id,
                public=self.public,
                allow_hosts=allow_hosts,
                register=self.register,
            )
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError, StoreError):
                await reporter

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            try:
                await self.report()
            except StoreError as error:
                log.warning("import of %s cannot report progress: %s", self.image_id, error)

    def start_in_background(
        self,
        source: ImageSource,
        *,
        kernel: ImageSource | None,
        initrd: ImageSource | None,
        cmdline: str | None,
        disk_format: ImageFormat | None,
        allow_hosts: Collection[str],
    ) -> None:
        """Run the import after the request returns; its status tells how it ends."""

        async def work() -> None:
            try:
                await self.run(
                    source,
                    kernel=kernel,
                    initrd=initrd,
                    cmdline=cmdline,
                    disk_format=disk_format,
                    allow_hosts=allow_hosts,
                )
            except NubesError as error:
                await self.fail(error)
            except asyncio.CancelledError:
                await self.fail(
                    Conflict("the API stopped during the import", hint="import it again")
                )
                raise
            except Exception as error:
                log.exception("import of %s failed", self.image_id)
                await self.fail(
                    NubesError(f"the import failed on a bug: {type(error).__name__}: {error}")
                )
            else:
                await self.finish()

        tasks = self.ctx.extras.setdefault(_TASKS, set())
        assert isinstance(tasks, set)
        task = asyncio.create_task(work(), name=f"import {self.image_id}")
        tasks.add(task)
        task.add_done_callback(tasks.discard)


class BodyParts:
    """An upload body read as consecutive files: `take` the first n bytes, then `rest`."""

    def __init__(self, stream: AsyncIterator[bytes]) -> None:
        self._stream = stream
        self._pending = b""

    async def take(self, size: int, what: str) -> AsyncIterator[bytes]:
        """Exactly `size` bytes of the body, for the file `what`.

        Raises:
            InvalidInput: the body ends before them.
        """
        left = size
        while left > 0:
            chunk = self._pending or await anext(self._stream, b"")
            self._pending = b""
            if not chunk:
                raise InvalidInput(
                    f"the body ended {left} bytes before the end of the {what}",
                    hint=f"send the whole {what} first, then the next file; its size "
                    "in the query must be its size in bytes",
                )
            if len(chunk) > left:
                chunk, self._pending = chunk[:left], chunk[left:]
            left -= len(chunk)
            yield chunk

    async def rest(self) -> AsyncIterator[bytes]:
        """What is left of the body."""
        if self._pending:
            pending, self._pending = self._pending, b""
            yield pending
        async for chunk in self._stream:
            if chunk:
                yield chunk
