"""Cold migration: a stopped VM's root disk goes from its host to the target over one TCP
stream on the underlay, then the same switch transaction as a live move binds it there.

The target listens and receives; the source connects and sends a JSON header line (the
size) and the qcow2 overlay's bytes; the target puts the file in place, rebases it onto
its own copy of the image (same content, another path) and switches the VM. On a shared
pool nothing is copied: the target switches at once. The source's controller then sees
the VM bound elsewhere and removes its local copy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from nubes.agent.migration_records import roll_back, switch_host, update_progress
from nubes.errors import NubesError
from nubes.model.image import ImageRecord
from nubes.model.migration import MigrationRequest, MigrationState, MigrationStatus
from nubes.model.vm import VmRecord, VmStatus
from nubes.process import run_tool_async
from nubes.store.keys import Kind, resource_key

if TYPE_CHECKING:
    from nubes.agent.migration import VmMigration
    from nubes.agent.vm_controller import VmController

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
HEADER_LIMIT = 4096
ACCEPT_TIMEOUT_SECONDS = 30.0
IDLE_TIMEOUT_SECONDS = 30.0  # no byte for this long: the other end is gone
PROGRESS_WRITE_SECONDS = 0.5


class ColdMigration:
    """The cold move of one VM, on either end (owned by its VmMigration)."""

    def __init__(self, migration: VmMigration) -> None:
        self.migration = migration
        self._receiving: asyncio.Task[None] | None = None
        self._sending: asyncio.Task[None] | None = None
        self._task_counter: int | None = None  # the request this agent copies (or copied)

    def stop_receiving(self) -> None:
        """The request is gone: stop waiting for the disk (the temporary file goes too)."""
        if self._receiving is not None:
            self._receiving.cancel()
            self._receiving = None

    @property
    def _controller(self) -> VmController:
        return self.migration.controller

    # -- target ----------------------------------------------------------------------------

    async def serve(
        self, record: VmRecord, request: MigrationRequest, progress: MigrationStatus
    ) -> None:
        """One pass on the target: listen for the disk (or switch at once on a shared pool)."""
        controller = self._controller
        ctx = controller.ctx
        if self._task_counter == request.counter:
            return  # receiving (or done): the task ends the move
        if progress.state is not MigrationState.PREPARING:
            await self.migration._fail(request, f"the agent of host {ctx.host} restarted")
            return
        try:
            pool = controller._pools.get(record.spec.storage_pool, host=ctx.host)
            if pool.shared:
                await self._switch(request)
                return
            if record.spec.image is None:
                raise NubesError(f"VM {record.id} has no image to rest its disk on")
            image_kv = await ctx.store.get(resource_key(Kind.IMAGE, record.spec.image))
            if image_kv is None:
                raise NubesError(f"image {record.spec.image} of VM {record.id} is gone")
            cached = await ctx.images.ensure(ImageRecord.from_json(image_kv.value))
            listener, port = self.migration._underlay_listener()
        except (NubesError, OSError) as error:
            message = error.message if isinstance(error, NubesError) else str(error)
            await self.migration._fail(request, f"host {ctx.host} cannot take the VM: {message}")
            return
        root = pool.root_disk(record.id)
        self._task_counter = request.counter
        self._receiving = asyncio.create_task(
            self._receive(listener, request, root, cached.disk, cached.format.value),
            name=f"cold-in-{record.id}",
        )
        await update_progress(
            ctx.store,
            record.id,
            request.counter,
            state=MigrationState.READY,
            address=str(ctx.config.underlay_address),
            port=port,
            disk_paths=[str(root)],
        )

    async def _receive(
        self,
        listener: socket.socket,
        request: MigrationRequest,
        root: Path,
        base: Path,
        base_format: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        temporary = root.with_name(root.name + ".incoming")
        try:
            expected = await self.migration._underlay_of(request.source)
            if expected is None:
                # Only the source may send the VM: refuse what cannot be checked.
                raise NubesError(
                    f"host {request.source} has published no underlay address",
                    hint="restart its agent: it writes its underlay_address at start",
                )
            async with asyncio.timeout(ACCEPT_TIMEOUT_SECONDS):
                while True:
                    connection, peer = await loop.sock_accept(listener)
                    if peer[0] == expected:
                        break
                    connection.close()
            listener.close()
            reader, writer = await asyncio.open_connection(sock=connection)
            try:
                async with asyncio.timeout(IDLE_TIMEOUT_SECONDS):
                    header = json.loads(await reader.readuntil(b"\n"))
                size = int(header["size"])
                root.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                received = await self._copy_in(reader, temporary, size, request)
                if received != size:
                    raise NubesError(f"the disk stream ended after {received} of {size} bytes")
                await run_tool_async(
                    ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", base_format,
                     "-b", _absolute(base), str(temporary)]
                )  # fmt: skip
                os.replace(temporary, root)
                writer.write(b"ok\n")
                await writer.drain()
            finally:
                writer.close()
            await self._switch(request, transferred_bytes=size, total_bytes=size, remaining_bytes=0)
        except asyncio.CancelledError:
            temporary.unlink(missing_ok=True)
            raise
        except (NubesError, OSError, TimeoutError, ValueError, KeyError) as error:
            temporary.unlink(missing_ok=True)
            why = getattr(error, "message", None) or str(error) or type(error).__name__
            await self.migration._fail(request, f"receiving the disk failed: {why}")
        finally:
            listener.close()
            self._receiving = None

    async def _copy_in(
        self, reader: asyncio.StreamReader, path: Path, size: int, request: MigrationRequest
    ) -> int:
        received = 0
        last_write = time.monotonic()
        with path.open("wb") as file:
            while received < size:
                async with asyncio.timeout(IDLE_TIMEOUT_SECONDS):
                    chunk = await reader.read(min(CHUNK_BYTES, size - received))
                if not chunk:
                    break
                file.write(chunk)
                received += len(chunk)
                if time.monotonic() - last_write >= PROGRESS_WRITE_SECONDS:
                    last_write = time.monotonic()
                    await update_progress(
                        self._controller.ctx.store,
                        self._controller.vm_id,
                        request.counter,
                        state=MigrationState.RUNNING,
                        transferred_bytes=received,
                        total_bytes=size,
                        remaining_bytes=size - received,
                    )
            file.flush()
            os.fsync(file.fileno())
        return received

    async def _switch(self, request: MigrationRequest, **figures: int) -> None:
        controller = self._controller
        if await switch_host(controller.ctx.store, controller.vm_id, request, **figures):
            log.info("%s: moved here (stopped) from %s", controller.vm_id, request.source)
        controller.kick()

    # -- source ----------------------------------------------------------------------------

    async def drive(
        self,
        record: VmRecord,
        request: MigrationRequest,
        progress: MigrationStatus,
        status: VmStatus | None,
    ) -> None:
        """One pass on the source: send the disk once the target listens."""
        controller = self._controller
        if controller.runtime is not None:
            await roll_back(
                controller.ctx.store, record.id, request, "the VM started; move it live instead"
            )
            return
        if progress.state is MigrationState.READY and self._task_counter != request.counter:
            self._task_counter = request.counter
            self._sending = asyncio.create_task(
                self._send(record, request, progress), name=f"cold-out-{record.id}"
            )
        await controller._write(status, reason=f"moving to {request.target}: {progress.percent}%")

    async def _send(
        self, record: VmRecord, request: MigrationRequest, progress: MigrationStatus
    ) -> None:
        controller = self._controller
        ctx = controller.ctx
        assert progress.address is not None
        assert progress.port is not None
        try:
            root = controller._pools.get(record.spec.storage_pool, host=ctx.host).root_disk(
                record.id
            )
            size = root.stat().st_size
            connection = self.migration._underlay_client()
            try:
                async with asyncio.timeout(IDLE_TIMEOUT_SECONDS):
                    await asyncio.get_running_loop().sock_connect(
                        connection, (progress.address, progress.port)
                    )
            except BaseException:
                connection.close()  # the stream below owns it once connected
                raise
            reader, writer = await asyncio.open_connection(sock=connection)
            try:
                writer.write(json.dumps({"size": size}).encode() + b"\n")
                with root.open("rb") as file:
                    while chunk := file.read(CHUNK_BYTES):
                        writer.write(chunk)
                        async with asyncio.timeout(IDLE_TIMEOUT_SECONDS):
                            await writer.drain()
                writer.write_eof()
                async with asyncio.timeout(IDLE_TIMEOUT_SECONDS * 4):
                    answer = await reader.readline()
                if answer.strip() != b"ok":
                    raise NubesError(f"host {request.target} did not take the disk")
            finally:
                writer.close()
        except asyncio.CancelledError:
            raise
        except (NubesError, OSError, TimeoutError) as error:
            why = getattr(error, "message", None) or str(error) or type(error).__name__
            await roll_back(ctx.store, record.id, request, f"sending the disk failed: {why}")
            controller.kick()
        finally:
            self._sending = None


def _absolute(path: Path) -> str:
    """The backing path as overlays record it (volumes.ensure_root_disk checks it so)."""
    return os.path.abspath(path)
