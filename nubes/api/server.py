"""Serving the API over HTTP(S) with uvicorn, inside a caller's event loop.

The caller owns signals and says when to stop (an asyncio.Event), so the API can
run alone (`nubes api`) or next to the scheduler and the agent (`nubes node`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import uvicorn

from nubes.api.app import create_app
from nubes.api.context import ApiContext
from nubes.errors import ConfigError, NubesError

log = logging.getLogger(__name__)

# Requests still running get this long to finish once the API is told to stop.
GRACEFUL_SHUTDOWN_SECONDS = 5


class ListenFailed(NubesError):
    """The API could not bind its address and port."""

    code = "listen_failed"
    exit_code = 3


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the process around it decides when to stop."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_started()


def bind_listener(listen: str, port: int) -> socket.socket:
    """A listening TCP socket on `listen`:`port` (IPv4 or IPv6 address or a host name).

    Raises:
        ListenFailed: the address is not local, or the port is taken or privileged.
    """
    try:
        infos = socket.getaddrinfo(
            listen, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )
    except socket.gaierror as error:
        raise ListenFailed(
            f"cannot listen on {listen!r}: {error.strerror}",
            hint="set [api] listen to an address of this machine, such as 127.0.0.1",
        ) from None
    family, kind, protocol, _, address = infos[0]
    listener = socket.socket(family, kind, protocol)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(address)
        listener.listen(1024)
    except OSError as error:
        listener.close()
        hints = {
            errno.EADDRINUSE: "another process uses this port: stop it, or pick another "
            "port with --port or [api] port",
            errno.EACCES: "ports below 1024 need root; pick a higher port",
            errno.EADDRNOTAVAIL: "this machine has no such address; set [api] listen",
        }
        raise ListenFailed(
            f"cannot listen on {listen} port {port}: {error.strerror}",
            hint=hints.get(error.errno or 0, "check [api] listen and port"),
        ) from None
    listener.set_inheritable(False)
    return listener


def check_tls_files(tls_cert: Path | None, tls_key: Path | None) -> None:
    """Refuses a half TLS setting or a certificate and key that do not load.

    Raises:
        ConfigError: only one of the two is given, a file is unreadable, or they do not
            form a pair.
    """
    if tls_cert is None and tls_key is None:
        return
    if tls_cert is None or tls_key is None:
        raise ConfigError(
            "TLS needs both a certificate and its key",
            hint="set both [api] tls_cert and tls_key, or neither",
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(tls_cert), str(tls_key))
    except FileNotFoundError as error:
        raise ConfigError(
            f"TLS file {error.filename} does not exist",
            hint="fix [api] tls_cert and tls_key",
        ) from None
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(
            f"cannot load the TLS certificate {tls_cert} with key {tls_key}: {error}",
            hint="give a PEM certificate and the PEM private key that belongs to it",
        ) from None


async def serve_api(
    ctx: ApiContext,
    *,
    listen: str,
    port: int,
    tls_cert: Path | None,
    tls_key: Path | None,
    stop: asyncio.Event,
    started: asyncio.Event | None = None,
) -> None:
    """Serves the API until `stop` is set, then lets running requests finish briefly.

    `started` (if given) is set once the socket accepts connections. Port 0 picks a
    free port; the socket's real port is logged.

    Raises:
        ListenFailed: the address or port cannot be bound.
        ConfigError: the TLS certificate or key is missing or invalid.
    """
    check_tls_files(tls_cert, tls_key)
    listener = bind_listener(listen, port)
    config = uvicorn.Config(
        create_app(ctx),
        lifespan="off",
        log_config=None,  # the process's logging setup applies
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
    )

    def report_started() -> None:
        bound = listener.getsockname()
        scheme = "https" if tls_cert else "http"
        log.info("API listening on %s://%s:%d", scheme, bound[0], bound[1])
        if started is not None:
            started.set()

    server = _Server(config, report_started)

    async def stop_when_told() -> None:
        await stop.wait()
        server.should_exit = True

    watcher = asyncio.create_task(stop_when_told())
    try:
        await server.serve(sockets=[listener])
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        listener.close()
