"""Cross-process change bell for the SQLite store: wakes watchers in other processes.

Each process with open watches binds a unix datagram socket in a shared
directory next to the database; a writer sends one byte to every socket there
after each commit. Delivery is best effort: a full socket buffer means the
watcher already has a wake-up pending, and the store also polls slowly as a
safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# sun_path holds 108 bytes; keep room for the socket's own name.
_MAX_DIRECTORY_LENGTH = 80


def bell_directory(database: Path) -> Path:
    """The directory where the bells of `database` live (the same for every process)."""
    beside = Path(f"{database.resolve()}.bell")
    if len(os.fsencode(beside)) <= _MAX_DIRECTORY_LENGTH:
        return beside
    digest = hashlib.sha256(os.fsencode(database.resolve())).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"nubes-bell-{digest}"


class ChangeBell:
    """Rings the other processes' bells, and listens on this process's own."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sender.setblocking(False)
        self._peers: list[str] = []
        self._peers_seen_at: int | None = None
        self._peers_listed_at = 0.0
        self._listener: socket.socket | None = None
        self._own_path: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def ring(self) -> None:
        """Tell every listening process that the database changed."""
        self._refresh_peers()
        stale = False
        for path in self._peers:
            if path == self._own_path:
                continue
            try:
                self._sender.sendto(b"\x01", path)
            except BlockingIOError:
                pass  # its buffer is full: a wake-up is already pending there
            except ConnectionRefusedError:
                # Nobody is bound: the process died without removing its socket.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                stale = True
            except FileNotFoundError:
                stale = True
        if stale:
            self._peers_seen_at = None

    def listen(self, on_ring: Callable[[], None]) -> None:
        """Call `on_ring` (on the running loop) whenever another process rings."""
        if self._listener is not None:
            return
        self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.setblocking(False)
        path = str(self._directory / f"{os.getpid()}-{secrets.token_hex(4)}.sock")
        listener.bind(path)
        self._listener, self._own_path = listener, path
        self._loop = asyncio.get_running_loop()

        def drain() -> None:
            while True:
                try:
                    listener.recv(64)
                except BlockingIOError:
                    break
                except OSError as error:  # pragma: no cover - a closed socket
                    if error.errno != errno.EAGAIN:
                        break
            on_ring()

        self._loop.add_reader(listener.fileno(), drain)

    def close(self) -> None:
        if self._listener is not None and self._loop is not None:
            if not self._loop.is_closed():
                self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            if self._own_path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._own_path)
        self._listener = None
        self._sender.close()

    def _refresh_peers(self) -> None:
        # Sockets come and go rarely; re-list when the directory changed, and at
        # least every second since mtime ticks coarsely and may hide a new socket.
        now = time.monotonic()
        try:
            changed_at = os.stat(self._directory).st_mtime_ns
        except FileNotFoundError:
            self._peers, self._peers_seen_at = [], None  # nobody has ever listened
            return
        if changed_at == self._peers_seen_at and now - self._peers_listed_at < 1.0:
            return
        self._peers = [
            entry.path for entry in os.scandir(self._directory) if entry.name.endswith(".sock")
        ]
        self._peers_seen_at, self._peers_listed_at = changed_at, now
