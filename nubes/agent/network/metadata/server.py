"""The metadata HTTP server: one per host, with listening sockets inside every VPC namespace.

A VM is known by (the VPC whose listener accepted, the peer's source address), which
anti-spoofing makes trustworthy; no header is ever believed. HTTP/1.x is parsed by h11.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from ipaddress import IPv4Address, IPv6Address, ip_address

import h11

from nubes.agent.network import nsutil
from nubes.agent.network.metadata import documents
from nubes.agent.network.metadata.documents import Document, InstanceMetadata
from nubes.errors import NubesError

log = logging.getLogger(__name__)

Resolver = Callable[[str, IPv4Address | IPv6Address], InstanceMetadata | None]

METADATA_V4 = "169.254.169.254"
METADATA_V6 = "fe80::a9fe:a9fe"
# Not in Python 3.11's socket module; the Linux values (linux/in.h, linux/in6.h).
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = getattr(socket, "IPV6_FREEBIND", 78)
MAX_HEADER_BYTES = 8192
MAX_BODY_BYTES = 8192  # no metadata request has a body worth reading
READ_SIZE = 65536
LINGER_BYTES = 262144  # how much a client may still send after an error answer
LINGER_SECONDS = 1.0
LISTEN_BACKLOG = 512
TOKEN_TTL_HEADER = b"x-aws-ec2-metadata-token-ttl-seconds"
MAX_TOKEN_TTL = 21600  # EC2's limit: six hours
SERVER_NAME = b"nubes-metadata"
_REASONS = {
    400: b"Bad Request\n",
    413: b"Payload Too Large\n",
    431: b"Request Header Fields Too Large\n",
    505: b"HTTP Version Not Supported\n",
}


class MetadataError(NubesError):
    """The metadata service could not listen where it was asked to."""

    code = "metadata_error"


class ServerState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


@dataclass
class _Listener:
    label: str  # "169.254.169.254:80", "[fe80::a9fe:a9fe%br-x]:80"
    server: asyncio.Server
    ifindex: int | None = None  # the bridge's, for an IPv6 link-local listener
    connections: set[asyncio.StreamWriter] = field(default_factory=set)


@dataclass
class _Vpc:
    netns: str | None  # None: listeners handed in by add_listener
    netns_inode: int | None
    listeners: dict[str, _Listener] = field(default_factory=dict)  # key: bridge, or "" for v4

    def connection_count(self) -> int:
        return sum(len(listener.connections) for listener in self.listeners.values())


class _DateHeader:
    """The Date header, formatted at most once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def value(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


class MetadataServer:
    """Serves every VPC of the host from one event loop.

    `add_vpc` opens listeners inside a VPC's namespace (169.254.169.254:80, and
    [fe80::a9fe:a9fe%bridge]:80 per bridge); `resolve(vpc_id, source)` names the VM.
    """

    def __init__(
        self,
        resolve: Resolver,
        *,
        port: int = 80,
        idle_timeout: float = 30.0,
        max_connections_per_vpc: int = 256,
    ) -> None:
        self._resolve = resolve
        self._port = port
        self.idle_timeout = idle_timeout
        self._max_connections = max_connections_per_vpc
        self._state = ServerState.NEW
        self._vpcs: dict[str, _Vpc] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._date = _DateHeader()

    @property
    def state(self) -> ServerState:
        return self._state

    async def start(self) -> None:
        """Ready to serve; listeners come with `add_vpc`.

        Raises:
            MetadataError: the server was stopped (a stopped server does not restart).
        """
        if self._state is ServerState.STOPPED:
            raise MetadataError("the metadata server was stopped and cannot start again")
        self._state = ServerState.RUNNING

    def _require_running(self) -> None:
        if self._state is not ServerState.RUNNING:
            raise MetadataError(f"the metadata server is {self._state.value}, not running")

    async def add_vpc(self, vpc_id: str, netns: str, bridges: Sequence[str]) -> None:
        """Listens in `netns` on 169.254.169.254 and on fe80::a9fe:a9fe of each bridge.

        Idempotent: listeners already right stay (with their connections); those of
        bridges no longer listed close; a bridge or namespace made anew is listened on
        anew. When a new listener cannot be opened, none of this call's new ones stay.

        Raises:
            MetadataError: the server is not running, or a socket could not be bound
                (e.g. a bridge does not exist in the namespace).
            NetnsError: the namespace does not exist.
        """
        async with self._lock:
            self._require_running()  # under the lock: a stop() may have come meanwhile
            inode = _netns_inode(netns)
            vpc = self._vpcs.get(vpc_id)
            if vpc is not None and (vpc.netns != netns or vpc.netns_inode != inode):
                # Another namespace now: nothing in the old one counts.
                self._close_vpc(self._vpcs.pop(vpc_id))
                vpc = None
            if vpc is None:
                vpc = _Vpc(netns, inode)
            wanted = list(dict.fromkeys(bridges))
            ifindexes = await asyncio.to_thread(_ifindexes, netns, wanted)
            to_open = [
                bridge
                for bridge in ["", *wanted]
                if bridge not in vpc.listeners or vpc.listeners[bridge].ifindex != ifindexes[bridge]
            ]
            opened: dict[str, _Listener] = {}
            try:
                for bridge in to_open:
                    sock = await asyncio.to_thread(
                        _bind_in_netns, netns, bridge, ifindexes[bridge], self._port
                    )
                    opened[bridge] = await self._serve(vpc_id, sock, bridge, ifindexes[bridge])
            except BaseException:
                for listener in opened.values():
                    self._close_listener(listener)
                raise
            for key in [k for k in vpc.listeners if k not in ifindexes or k in opened]:
                self._close_listener(vpc.listeners.pop(key))
            vpc.listeners.update(opened)
            self._vpcs[vpc_id] = vpc

    async def add_listener(self, vpc_id: str, sock: socket.socket) -> str:
        """Serves `vpc_id` on an already bound socket (tests and benchmarks: loopback
        sockets, no namespace); its label, as `listeners()` shows it.

        Raises:
            MetadataError: the server is not running.
        """
        self._require_running()
        vpc = self._vpcs.setdefault(vpc_id, _Vpc(None, None))
        listener = await self._serve(vpc_id, sock, None, None)
        vpc.listeners[listener.label] = listener
        return listener.label

    async def remove_vpc(self, vpc_id: str) -> None:
        """Closes the VPC's listeners and its open connections (nothing when unknown)."""
        async with self._lock:
            vpc = self._vpcs.pop(vpc_id, None)
            if vpc is not None:
                self._close_vpc(vpc)

    async def stop(self) -> None:
        """Closes every listener and connection and waits for the request handlers."""
        self._state = ServerState.STOPPED
        async with self._lock:
            for vpc in self._vpcs.values():
                self._close_vpc(vpc)
            self._vpcs.clear()
        handlers = list(self._handlers)
        if handlers:
            await asyncio.wait(handlers, timeout=5)

    def listeners(self) -> dict[str, list[str]]:
        """What each VPC is listened on, e.g. {"vpc-...": ["169.254.169.254:80", ...]}."""
        return {
            vpc_id: [listener.label for listener in vpc.listeners.values()]
            for vpc_id, vpc in self._vpcs.items()
        }

    # -- listeners ------------------------------------------------------------------------

    async def _serve(
        self, vpc_id: str, sock: socket.socket, bridge: str | None, ifindex: int | None
    ) -> _Listener:
        label = _label(sock, bridge)
        listener: _Listener | None = None

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert listener is not None
            await self._connection(vpc_id, listener, reader, writer)

        try:
            server = await asyncio.start_server(
                accepted, sock=sock, backlog=LISTEN_BACKLOG, limit=READ_SIZE
            )
        except BaseException:
            sock.close()
            raise
        listener = _Listener(label, server, ifindex)
        return listener

    def _close_vpc(self, vpc: _Vpc) -> None:
        for listener in vpc.listeners.values():
            self._close_listener(listener)
        vpc.listeners.clear()

    @staticmethod
    def _close_listener(listener: _Listener) -> None:
        listener.server.close()
        for writer in list(listener.connections):
            writer.transport.abort()

    # -- connections ----------------------------------------------------------------------

    async def _connection(
        self,
        vpc_id: str,
        listener: _Listener,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        vpc = self._vpcs.get(vpc_id)
        if (
            vpc is None
            or listener.server.sockets == ()
            or vpc.connection_count() >= self._max_connections
        ):
            writer.transport.abort()
            return
        self._handlers.add(task)
        listener.connections.add(writer)
        try:
            source = _source_address(writer.get_extra_info("peername"))
            await _Exchange(self, vpc_id, source, reader, writer).run()
        except Exception:
            log.exception("metadata connection in %s failed", vpc_id)
        finally:
            # A graceful close sends what drain() left buffered (up to its high-water
            # mark); a client that will not take it within the linger time loses it.
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), LINGER_SECONDS * 5)
            except (TimeoutError, ConnectionError, OSError):
                writer.transport.abort()
            listener.connections.discard(writer)
            self._handlers.discard(task)

    def respond(
        self,
        vpc_id: str,
        source: IPv4Address | IPv6Address | None,
        request: h11.Request,
    ) -> tuple[Document, list[tuple[bytes, bytes]]]:
        """The answer to one request from `source` in `vpc_id`, and extra headers."""
        method = request.method
        path = request.target.decode("ascii", errors="replace")
        token = documents.is_token_path(path)
        allowed = b"PUT" if token else b"GET, HEAD"
        if method not in ((b"PUT",) if token else (b"GET", b"HEAD")):
            return Document(405, documents.TEXT, b"Method Not Allowed\n"), [(b"Allow", allowed)]
        instance = self._instance(vpc_id, source)
        if instance is None:
            return documents.NOT_FOUND, []
        if token:
            ttl = _token_ttl(request.headers)
            if ttl is None:
                return Document(400, documents.TEXT, b"Bad Request\n"), []
            # Identity comes from the source address, never from the token: any token
            # works, so a fresh random one is enough to satisfy IMDSv2 clients.
            body = secrets.token_urlsafe(32).encode()
            return Document(200, documents.TEXT, body), [(TOKEN_TTL_HEADER, str(ttl).encode())]
        return documents.render(instance, path), []

    def _instance(
        self, vpc_id: str, source: IPv4Address | IPv6Address | None
    ) -> InstanceMetadata | None:
        if source is None:
            return None
        try:
            return self._resolve(vpc_id, source)
        except Exception:
            log.exception("metadata resolver failed for %s in %s", source, vpc_id)
            return None

    def response_headers(self, document: Document, close: bool) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"Content-Type", document.content_type.encode()),
            (b"Content-Length", str(len(document.body)).encode()),
            (b"Date", self._date.value()),
            (b"Server", SERVER_NAME),
        ]
        if close:
            headers.append((b"Connection", b"close"))
        return headers


class _Exchange:
    """One connection's requests and responses, in order, until either side closes.

    A deadline covers each request from the moment the previous response went out:
    reading it (slow senders included) and writing its answer to a reader that stalls."""

    def __init__(
        self,
        server: MetadataServer,
        vpc_id: str,
        source: IPv4Address | IPv6Address | None,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.vpc_id = vpc_id
        self.source = source
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.timer: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self.timer is not None:
                    self.timer.cancel()
                self.timer = loop.call_later(self.server.idle_timeout, self.writer.transport.abort)
                if not await self._one_request():
                    return
                self.h11.start_next_cycle()
        except h11.RemoteProtocolError as error:
            status = error.error_status_hint if 400 <= error.error_status_hint < 500 else 400
            await self._send_error(status)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            return
        finally:
            if self.timer is not None:
                self.timer.cancel()

    async def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.reader.read(READ_SIZE)
            self.h11.receive_data(data)  # b"": the peer closed (h11 tells us how cleanly)

    async def _one_request(self) -> bool:
        """Serves the next request; whether the connection may carry another."""
        event = await self._next_event()
        if not isinstance(event, h11.Request):
            return False  # ConnectionClosed (or PAUSED after a close)
        body = 0
        while True:
            part = await self._next_event()
            if isinstance(part, h11.Data):
                body += len(part.data)
                if body > MAX_BODY_BYTES:
                    await self._send_error(413)
                    return False
            elif isinstance(part, h11.EndOfMessage):
                break
            else:
                return False
        if event.http_version not in (b"1.0", b"1.1"):
            await self._send_error(505)
            return False
        # h11 bounds only a request still incomplete; one that came whole in a read
        # is measured here, as its request line and header lines were on the wire.
        size = len(event.method) + len(event.target) + 12
        if size + sum(len(name) + len(value) + 4 for name, value in event.headers) > (
            MAX_HEADER_BYTES
        ):
            await self._send_error(431)
            return False
        document, extra = self.server.respond(self.vpc_id, self.source, event)
        await self._send(document, extra, head=event.method == b"HEAD")
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def _send(
        self,
        document: Document,
        extra: list[tuple[bytes, bytes]],
        *,
        head: bool = False,
        close: bool = False,
    ) -> None:
        headers = self.server.response_headers(document, close) + extra
        out = self.h11.send(h11.Response(status_code=document.status, headers=headers)) or b""
        if not head and document.body:
            out += self.h11.send(h11.Data(data=document.body)) or b""
        out += self.h11.send(h11.EndOfMessage()) or b""
        self.writer.write(out)
        await self.writer.drain()

    async def _send_error(self, status: int) -> None:
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        reason = _REASONS.get(status, b"Error\n")
        with contextlib.suppress(h11.LocalProtocolError, ConnectionError, OSError, TimeoutError):
            await self._send(Document(status, documents.TEXT, reason), [], close=True)
            # Closing with unread input makes the kernel send a reset, which can destroy
            # the answer before the client reads it: end our side, then drain theirs a
            # little (the connection's deadline still applies).
            self.writer.write_eof()
            drained = 0
            while drained < LINGER_BYTES:
                data = await asyncio.wait_for(self.reader.read(READ_SIZE), LINGER_SECONDS)
                if not data:
                    break
                drained += len(data)


# -- sockets in namespaces ----------------------------------------------------------------


def _netns_inode(netns: str) -> int:
    try:
        return os.stat(nsutil.netns_path(netns)).st_ino
    except FileNotFoundError:
        raise nsutil.NetnsError(f"network namespace {netns} does not exist") from None


def _ifindexes(netns: str, bridges: Sequence[str]) -> dict[str, int | None]:
    """Each bridge's interface index in `netns` ("" -> None: the IPv4 listener).

    Raises:
        MetadataError: a bridge does not exist there.
    """

    def lookup() -> dict[str, int | None]:
        found: dict[str, int | None] = {"": None}
        for bridge in bridges:
            try:
                found[bridge] = socket.if_nametoindex(bridge)
            except OSError:
                raise MetadataError(
                    f"cannot listen for metadata on bridge {bridge} in {netns}: no such link"
                ) from None
        return found

    return nsutil.call_in_netns(netns, lookup)


def _bind_in_netns(netns: str, bridge: str, ifindex: int | None, port: int) -> socket.socket:
    """A socket made in `netns`, bound with FREEBIND (the address may not be there yet).

    Raises:
        MetadataError: the bind failed (e.g. the port is taken).
    """
    v6 = ifindex is not None
    family = socket.AF_INET6 if v6 else socket.AF_INET
    sock = nsutil.socket_in_netns(netns, family)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            sock.bind((METADATA_V6, port, 0, ifindex))
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            sock.bind((METADATA_V4, port))
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        where = f"[{METADATA_V6}%{bridge}]" if v6 else METADATA_V4
        raise MetadataError(
            f"cannot listen for metadata on {where}:{port} in {netns}: {error.strerror}"
        ) from error
    return sock


def _label(sock: socket.socket, bridge: str | None) -> str:
    address = sock.getsockname()
    if sock.family == socket.AF_INET6:
        scope = f"%{bridge}" if bridge else ""
        return f"[{address[0].partition('%')[0]}{scope}]:{address[1]}"
    return f"{address[0]}:{address[1]}"


def _source_address(peer: object) -> IPv4Address | IPv6Address | None:
    """The peer's address, without an IPv6 scope; an IPv4-mapped one as IPv4."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return None
    try:
        address = ip_address(peer[0].partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _token_ttl(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    """The TTL an IMDSv2 token request asks for, or None when missing or out of range."""
    for name, value in headers:
        if name == TOKEN_TTL_HEADER:
            try:
                ttl = int(value)
            except ValueError:
                return None
            return ttl if 1 <= ttl <= MAX_TOKEN_TTL else None
    return None
