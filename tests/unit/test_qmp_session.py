"""QmpSession against a fake QMP server on a unix socket: the protocol edges (events in
order, QEMU's errors, the connection ending) without a QEMU."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from nubes.agent.compute.qmp import QmpCommandError, QmpDisconnected, QmpEvent, QmpSession
from nubes.errors import QemuError

GREETING = {
    "QMP": {
        "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"},
        "capabilities": [],
    }
}
Script = Callable[[dict[str, Any], asyncio.StreamWriter], Awaitable[None]]


def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message).encode() + b"\n")


def _event(name: str, **data: Any) -> dict[str, Any]:
    return {"event": name, "data": data, "timestamp": {"seconds": 1795268511, "microseconds": 5}}


async def _requests(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """JSON objects as the client sends them: QMP is a stream, not lines."""
    decoder = json.JSONDecoder()
    buffer = ""
    while chunk := await reader.read(4096):
        buffer += chunk.decode()
        while buffer.strip():
            try:
                request, end = decoder.raw_decode(buffer.lstrip())
            except ValueError:
                break
            buffer = buffer.lstrip()[end:]
            yield request


class FakeQemu:
    """Answers qmp_capabilities, query-status and `quit`; refuses the rest as QEMU does;
    `push` sends events; `hang_up` closes the connection like a killed QEMU."""

    def __init__(self) -> None:
        self.writer: asyncio.StreamWriter | None = None
        self.commands: list[str] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        _send(writer, GREETING)
        async for request in _requests(reader):
            command = request["execute"]
            self.commands.append(command)
            reply: dict[str, Any]
            if command in ("qmp_capabilities", "system_reset"):
                reply = {"return": {}}
            elif command == "query-status":
                reply = {"return": {"status": "running", "running": True}}
            else:
                reply = {
                    "error": {
                        "class": "CommandNotFound",
                        "desc": f"The command {command} has not been found",
                    }
                }
            if "id" in request:
                reply["id"] = request["id"]
            _send(writer, reply)
            await writer.drain()

    async def push(self, *events: dict[str, Any]) -> None:
        assert self.writer is not None
        for event in events:
            _send(self.writer, event)
        await self.writer.drain()

    def hang_up(self) -> None:
        assert self.writer is not None
        self.writer.close()


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[tuple[FakeQemu, Path]]:
    qemu = FakeQemu()
    path = tmp_path / "qmp.sock"
    server = await asyncio.start_unix_server(qemu.serve, path=str(path))
    async with server:
        yield qemu, path
        if qemu.writer is not None:
            qemu.writer.close()


async def test_commands_are_answered_and_events_arrive_in_order(
    fake: tuple[FakeQemu, Path],
) -> None:
    qemu, path = fake
    seen: list[QmpEvent] = []
    session = await QmpSession.connect(path, name="i-0123456789", on_event=seen.append)
    try:
        assert await session.query_status() == "running"
        await qemu.push(_event("STOP"), _event("RESUME"), _event("SHUTDOWN", guest=True))
        await session.system_reset()  # answered after the events, so they were read first
        assert [event.name for event in seen] == ["STOP", "RESUME", "SHUTDOWN"]
        assert seen[2].data == {"guest": True}
        assert seen[2].timestamp == pytest.approx(1795268511.000005)
    finally:
        await session.close()


async def test_qemus_error_is_raised_with_its_own_words(fake: tuple[FakeQemu, Path]) -> None:
    _, path = fake
    session = await QmpSession.connect(path, name="i-0123456789")
    try:
        with pytest.raises(QmpCommandError, match="The command frobnicate has not been found"):
            await session.execute("frobnicate")
        assert await session.query_status() == "running"  # the session survives it
    finally:
        await session.close()


async def test_a_hang_up_calls_on_close_once_and_later_commands_fail_clearly(
    fake: tuple[FakeQemu, Path],
) -> None:
    qemu, path = fake
    closes: list[str] = []
    session = await QmpSession.connect(
        path, name="i-0123456789", on_close=lambda: closes.append("closed")
    )
    qemu.hang_up()
    await asyncio.wait_for(session.closed.wait(), 2.0)
    await asyncio.sleep(0.05)
    assert closes == ["closed"]
    with pytest.raises(QmpDisconnected, match="closed"):
        await session.query_status()
    await session.quit()  # quitting a QEMU that is gone is not an error
    await session.close()
    assert closes == ["closed"]


async def test_closing_the_session_ourselves_does_not_call_on_close(
    fake: tuple[FakeQemu, Path],
) -> None:
    _, path = fake
    closes: list[str] = []
    session = await QmpSession.connect(
        path, name="i-0123456789", on_close=lambda: closes.append("closed")
    )
    await session.close()
    assert session.closed.is_set()
    assert closes == []


async def test_no_qmp_server_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QemuError, match="no QMP answer"):
        await QmpSession.connect(tmp_path / "absent.sock", name="i-0123456789", timeout=0.3)


async def test_a_dead_qemus_socket_fails_at_once_when_told_the_process_is_gone(
    tmp_path: Path,
) -> None:
    # A killed QEMU leaves its socket file behind with nobody listening on it.
    path = tmp_path / "qmp.sock"
    orphan = socket.socket(socket.AF_UNIX)
    orphan.bind(str(path))
    orphan.close()
    started = time.monotonic()
    with pytest.raises(QemuError, match="exited before its QMP socket"):
        await QmpSession.connect(path, name="i-0123456789", timeout=5.0, alive=lambda: False)
    assert time.monotonic() - started < 1.0
