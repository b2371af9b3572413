"""A tiny asyncio HTTP/1.1 server for one endpoint, GET /metrics: what an agent serves.

One request per connection, answered and closed; a client that does not send its
request head within a few seconds is dropped, so a stuck scraper holds nothing long;
stopping the server ends every connection still open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_SECONDS = 5.0
MAX_REQUEST_HEAD_BYTES = 8192
METRICS_PATH = "/metrics"

Renderer = Callable[[], Awaitable[bytes]]


class MetricsServer:
    """Serves `render()`'s exposition text at GET /metrics on `listen`:`port`."""

    def __init__(self, render: Renderer, *, listen: str, port: int) -> None:
        self.render = render
        self.listen = listen
        self.port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Binds and starts serving; port 0 picks a free port (see `bound_port`).

        Raises:
            OSError: the address cannot be bound (the port is taken, say).
        """
        self._server = await asyncio.start_server(
            self._serve, self.listen, self.port, reuse_address=True
        )

    @property
    def bound_port(self) -> int:
        assert self._server is not None, "start() first"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        """Stops listening and ends the connections still open: a scrape being rendered, a
        client that has not sent its request yet. (On Python 3.11 closing a server leaves
        its connections be, and wait_closed() does not wait for them.)"""
        if self._server is None:
            return
        self._server.close()
        # A connection accepted just before close() starts its handler while we wait.
        while self._connections:
            handlers = list(self._connections)
            for handler in handlers:
                handler.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            self._connections.difference_update(handlers)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None, "asyncio runs each connection's handler as a task"
        self._connections.add(handler)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
            status, content_type, body = await self._answer(head)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            if not head.startswith(b"HEAD "):
                writer.write(body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that sent no complete request head gets nothing
        except ConnectionError:
            pass
        except Exception:
            log.exception("metrics: answering a scrape failed")
        finally:
            self._connections.discard(handler)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, head: bytes) -> tuple[str, str, bytes]:
        if len(head) > MAX_REQUEST_HEAD_BYTES:
            return "431 Request Header Fields Too Large", "text/plain", b"request head too large\n"
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3:
            return "400 Bad Request", "text/plain", b"malformed request line\n"
        method, target, _ = parts
        if target.split("?", 1)[0] != METRICS_PATH:
            return "404 Not Found", "text/plain", b"only /metrics is served here\n"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"use GET /metrics\n"
        try:
            body = await self.render()
        except Exception:  # the scraper learns it failed, the log says why
            log.exception("metrics: rendering a scrape failed")
            return "500 Internal Server Error", "text/plain", b"metrics could not be gathered\n"
        return "200 OK", CONTENT_TYPE_LATEST, body
