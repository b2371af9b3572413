"""The metadata server on loopback sockets (no root, no namespace): identity plumbing,
HTTP keep-alive and pipelining, methods, limits, garbage, timeouts and shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from nubes.agent.network.metadata.documents import InstanceMetadata
from nubes.agent.network.metadata.server import MetadataError, MetadataServer
from nubes.agent.network.nsutil import NetnsError

pytestmark = pytest.mark.timeout(30)

VM_ONE = InstanceMetadata(
    instance_id="i-oneoneone1",
    name="one",
    hostname="one",
    project="proj",
    availability_zone="zone-a",
    public_keys={"k": "ssh-ed25519 AAAA k"},
    user_data=b"\x00secret one\xff",
    nics=(),
)
VM_TWO = dataclasses.replace(VM_ONE, instance_id="i-twotwotwo2", name="two", hostname="two")
VM_THREE = dataclasses.replace(VM_ONE, instance_id="i-threethre", name="three", hostname="three")
META = "/openstack/latest/meta_data.json"
Address = IPv4Address | IPv6Address
Serve = Callable[..., Awaitable[tuple[str, int]]]


class Identities:
    """A resolver from a table, recording every (vpc, source) it is asked about."""

    def __init__(self, table: dict[tuple[str, Address], InstanceMetadata]) -> None:
        self.table = table
        self.asked: list[tuple[str, Address]] = []

    def __call__(self, vpc_id: str, source: Address) -> InstanceMetadata | None:
        self.asked.append((vpc_id, source))
        return self.table.get((vpc_id, source))


@dataclasses.dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def loopback_socket(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    return sock


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> Response:
    head_bytes = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")[:-2]
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    body = b"" if head else await reader.readexactly(length)
    return Response(int(status_line.split()[1]), headers, body)


def get(path: str, *extra: str, method: str = "GET", version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: 169.254.169.254", *extra, "", ""]
    return "\r\n".join(lines).encode()


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, address: tuple[str, int], source: str | None = None) -> Client:
        local = (source, 0) if source else None
        reader, writer = await asyncio.open_connection(*address, local_addr=local)
        return cls(reader, writer)

    async def request(self, raw: bytes, *, head: bool = False) -> Response:
        self.writer.write(raw)
        await self.writer.drain()
        return await read_response(self.reader, head=head)

    async def closed_by_server(self, timeout: float = 5) -> bool:
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except ConnectionResetError:
            return True
        return data == b""

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def lab() -> AsyncIterator[Serve]:
    """Serves a VPC of a server on a new loopback socket (starting the server the first
    time); every server is stopped when the test ends."""
    servers: list[MetadataServer] = []

    async def serve(
        server: MetadataServer, vpc_id: str, host: str = "127.0.0.1"
    ) -> tuple[str, int]:
        if server not in servers:
            servers.append(server)
            await server.start()
        sock = loopback_socket(host)
        host, port = sock.getsockname()[:2]
        await server.add_listener(vpc_id, sock)
        return host, port

    yield serve
    for server in servers:
        await server.stop()


def one_vm_server(
    *, idle_timeout: float = 30.0, max_connections_per_vpc: int = 256
) -> tuple[MetadataServer, Identities]:
    identities = Identities({("vpc-a", IPv4Address("127.0.0.1")): VM_ONE})
    server = MetadataServer(
        identities, idle_timeout=idle_timeout, max_connections_per_vpc=max_connections_per_vpc
    )
    return server, identities


# -- identity -------------------------------------------------------------------------------


async def test_answers_the_vm_the_resolver_names_for_vpc_and_source(lab: Serve) -> None:
    server, identities = one_vm_server()
    address = await lab(server, "vpc-a")
    client = await Client.connect(address)
    response = await client.request(get(META))
    client.close()
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.body)
    assert json.loads(response.body)["uuid"] == "i-oneoneone1"
    assert identities.asked == [("vpc-a", IPv4Address("127.0.0.1"))]


async def test_unknown_source_gets_404_and_no_data(lab: Serve) -> None:
    server, identities = one_vm_server()
    address = await lab(server, "vpc-a")
    client = await Client.connect(address, source="127.0.0.9")
    for path in (META, "/latest/user-data", "/", "/openstack", "/nocloud/meta-data"):
        response = await client.request(get(path))
        assert response.status == 404, path
        assert b"one" not in response.body
        assert b"secret" not in response.body
    client.close()
    assert {source for _, source in identities.asked} == {IPv4Address("127.0.0.9")}


async def test_each_source_and_each_vpc_gets_its_own_vm(lab: Serve) -> None:
    identities = Identities(
        {
            ("vpc-a", IPv4Address("127.0.0.1")): VM_ONE,
            ("vpc-a", IPv4Address("127.0.0.2")): VM_TWO,
            ("vpc-b", IPv4Address("127.0.0.1")): VM_THREE,  # same address, other VPC
        }
    )
    server = MetadataServer(identities)
    in_a = await lab(server, "vpc-a")
    in_b = await lab(server, "vpc-b")
    seen = {}
    for name, address, source in (
        ("a1", in_a, "127.0.0.1"),
        ("a2", in_a, "127.0.0.2"),
        ("b1", in_b, "127.0.0.1"),
        ("b2", in_b, "127.0.0.2"),
    ):
        client = await Client.connect(address, source=source)
        response = await client.request(get("/latest/meta-data/instance-id"))
        client.close()
        seen[name] = (response.status, response.body)
    assert seen == {
        "a1": (200, b"i-oneoneone1"),
        "a2": (200, b"i-twotwotwo2"),
        "b1": (200, b"i-threethre"),
        "b2": (404, b"Not Found\n"),
    }


async def test_forwarding_headers_are_not_believed(lab: Serve) -> None:
    server, identities = one_vm_server()
    address = await lab(server, "vpc-a")
    client = await Client.connect(address, source="127.0.0.9")
    response = await client.request(
        get(META, "X-Forwarded-For: 127.0.0.1", "Forwarded: for=127.0.0.1", "X-Real-IP: 127.0.0.1")
    )
    client.close()
    assert response.status == 404
    assert identities.asked == [("vpc-a", IPv4Address("127.0.0.9"))]


async def test_ipv6_sources_reach_the_resolver_as_ipv6_addresses(lab: Serve) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    identities = Identities({("vpc-a", ip_address("::1")): VM_TWO})
    server = MetadataServer(identities)
    try:
        address = await lab(server, "vpc-a", host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    client = await Client.connect(address)
    response = await client.request(get("/latest/meta-data/instance-id"))
    client.close()
    assert (response.status, response.body) == (200, b"i-twotwotwo2")
    assert identities.asked == [("vpc-a", IPv6Address("::1"))]


async def test_a_failing_resolver_gives_404_and_the_server_carries_on(lab: Serve) -> None:
    calls = []

    def resolve(vpc_id: str, source: Address) -> InstanceMetadata | None:
        calls.append(source)
        if len(calls) == 1:
            raise RuntimeError("cache broken")
        return VM_ONE

    server = MetadataServer(resolve)
    address = await lab(server, "vpc-a")
    client = await Client.connect(address)
    assert (await client.request(get(META))).status == 404
    assert (await client.request(get(META))).status == 200
    client.close()


# -- HTTP -----------------------------------------------------------------------------------


async def test_keep_alive_serves_many_requests_on_one_connection(lab: Serve) -> None:
    server, identities = one_vm_server()
    address = await lab(server, "vpc-a")
    client = await Client.connect(address)
    local_port = client.writer.get_extra_info("sockname")[1]
    paths = [META, "/latest/meta-data/instance-id", "/openstack", "/latest/user-data", META]
    for path in paths:
        response = await client.request(get(path))
        assert response.status == 200, path
        assert "connection" not in response.headers
    assert client.writer.get_extra_info("sockname")[1] == local_port
    assert (await client.request(get("/latest/user-data"))).body == b"\x00secret one\xff"
    client.close()
    assert len(identities.asked) == len(paths) + 1


async def test_pipelined_requests_are_answered_in_order(lab: Serve) -> None:
    server, _ = one_vm_server()
    address = await lab(server, "vpc-a")
    client = await Client.connect(address)
    client.writer.write(get("/latest/meta-data/hostname") + get("/nope") + get("/openstack/"))
    statuses = [(await read_response(client.reader)).status for _ in range(3)]
    client.close()
    assert statuses == [200, 404, 200]


async def test_head_has_the_length_but_no_body(lab: Serve) -> None:
    server, _ = one_vm_server()
    address = await lab(server, "vpc-a")
    client = await Client.connect(address)
    full = await client.request(get(META))
    head = await client.request(get(META, method="HEAD"), head=True)
    # Were there body bytes after the HEAD answer, this would read them as a status line.
    after = await client.request(get("/latest/meta-data/instance-id"))
    client.close()
    assert head.status == 200
    assert int(head.headers["content-length"]) == len(full.body)
    assert (after.status, after.body) == (200, b"i-oneoneone1")


async def test_http_1_0_is_answered_then_closed(lab: Serve) -> None:
    server, _ = one_vm_server()
    address = await lab(server, "vpc-a")
    client = await Client.connect(address)
    response = await client.request(get("/latest/meta-data/instance-id", version="1.0"))
    assert (response.status, response.body) == (200, b"i-oneoneone1")
    assert response.headers["connection"] == "close"
    assert await client.closed_by_server()
    client.close()


async def test_a_large_answer_reaches_a_slow_reader_whole_before_the_close() -> None:
    big = bytes(range(256)) * 4096  # 1 MiB
    identities = Identities(
        {("vpc-a", IPv4Address("127.0.0.1")): dataclasses.replace(VM_ONE, user_data=big)}
    )
    server = MetadataServer(identities)
    await server.start()
    listening = loopback_socket()
    # Small kernel buffers on both ends: most of the answer waits in the server's own
    # buffer when the connection is to close (HTTP/1.0).
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    await server.add_listener("vpc-a", listening)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(listening.getsockname())
    try:
        sock.sendall(get("/latest/user-data", version="1.0"))
        await asyncio.sleep(0.3)
        reader, writer = await asyncio.open_connection(sock=sock)
        response = await read_response(reader)
        assert await reader.read() == b""
        writer.close()
    finally:
        await server.stop()
    assert response.body == big


async def test_connection_close_is_honoured(lab: Serve) -> None:
    server, _ = one_vm_server()
    address = await lab(server, "vpc-a")
    client = await Client.connect(address)
    response = await client.request(get(META, "Connection: close"))
    assert response.status == 200
    assert await client.closed_by_server()
    client.close()


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", META, "GET, HEAD"),
        ("DELETE", "/latest/meta-data/", "GET, HEAD"),
        ("PUT", META, "GET, HEAD"),
        ("GET", "/latest/api/token", "PUT"),
        ("POST", "/latest/api/token", "PUT"),
    ],
)
async def test_other_methods_get_405_with_allow(
    lab: Serve, method: str, path: str, allow: str
) -> None:
    server, _ = one_vm_server()
    address = await lab(server, "vpc-a")
    client = await Client.connect(address)
    response = await client.request(get(path, "Content-Length: 0", method=method))
    # The connection stays usable after a 405.
    after = await client.request(get("/latest/meta-data/instance-id"))
    client.close()
    assert response.status == 405
    assert response.headers["allow"] == allow
    assert after.status == 200


async def test_imdsv2_token_put(lab: Serve) -> None:
    server, _ = one_vm_server()
    address = await lab(server, "vpc-a")
    client = await Client.connect(address)
    ttl = "X-aws-ec2-metadata-token-ttl-seconds: 21600"
    token = await client.request(get("/latest/api/token", ttl, "Content-Length: 0", method="PUT"))
    # cloud-init then sends the token with each request; identity still comes from the source.
    with_token = await client.request(
        get("/latest/meta-data/instance-id", f"X-aws-ec2-metadata-token: {token.body.decode()}")
    )
    no_ttl = await client.request(get("/latest/api/token", "Content-Length: 0", method="PUT"))
    bad_ttl = await client.request(
        get("/latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 0", method="PUT")
    )
    client.close()
    assert token.status == 200
    assert len(token.body) >= 32
    assert token.headers["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    assert (with_token.status, with_token.body) == (200, b"i-oneoneone1")
    assert (no_ttl.status, bad_ttl.status) == (400, 400)


async def test_token_put_from_an_unknown_source_is_404(lab: Serve) -> None:
    server, _ = one_vm_server()
    address = await lab(server, "vpc-a")
    client = await Client.connect(address, source="127.0.0.9")
    ttl = "X-aws-ec2-metadata-token-ttl-seconds: 60"
    response = await client.request(get("/latest/api/token", ttl, method="PUT"))
    client.close()
    assert response.status == 404


# -- abuse ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x01\x02\xff\xfe garbage\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -5\r\n\r\n",
        b"GET / HTTP/1.1\r\nTransfer-Encoding: zip\r\n\r\n",
        b"GET / HTTP/1.1\r\n"
        + b"Host: a\r\n" * 2
        + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ],
)
async def test_garbage_gets_400_and_the_server_lives_on(lab: Serve, garbage: bytes) -> None:
    server, _ = one_vm_server()
    address = await lab(server, "vpc-a")
    client = await Client.connect(address)
    client.writer.write(garbage)
    response = await read_response(client.reader)
    assert response.status == 400
    assert await client.closed_by_server()
    client.close()
    healthy = await Client.connect(address)
    assert (await healthy.request(get(META))).status == 200
    healthy.close()


async def test_http_versions_other_than_1_x_get_505(lab: Serve) -> None:
    server, _ = one_vm_server()
    address = await lab(server, "vpc-a")
    client = await Client.connect(address)
    response = await client.request(b"GET / HTTP/9.9\r\nHost: a\r\n\r\n")
    assert response.status == 505
    assert await client.closed_by_server()
    client.close()


async def test_oversize_headers_get_431_and_close(lab: Serve) -> None:
    server, _ = one_vm_server()
    address = await lab(server, "vpc-a")
    client = await Client.connect(address)
    client.writer.write(get(META, "X-Padding: " + "a" * 9000))
    response = await read_response(client.reader)
    assert response.status == 431
    assert await client.closed_by_server()
    client.close()
    # Just under the limit is fine.
    client = await Client.connect(address)
    assert (await client.request(get(META, "X-Padding: " + "a" * 7000))).status == 200
    client.close()


async def test_an_endless_header_stream_is_cut_off_at_the_limit(lab: Serve) -> None:
    server, _ = one_vm_server()
    address = await lab(server, "vpc-a")
    client = await Client.connect(address)
    client.writer.write(b"GET / HTTP/1.1\r\n")
    for _ in range(20):  # 20 x 1 KiB in separate writes, and never the blank line
        client.writer.write(b"X-A: " + b"b" * 1019 + b"\r\n")
        await client.writer.drain()
        await asyncio.sleep(0.001)
    response = await read_response(client.reader)
    assert response.status == 431
    assert await client.closed_by_server()
    client.close()


async def test_request_body_beyond_the_limit_gets_413(lab: Serve) -> None:
    server, _ = one_vm_server()
    address = await lab(server, "vpc-a")
    client = await Client.connect(address)
    client.writer.write(get(META, "Content-Length: 100000", method="GET") + b"x" * 100000)
    response = await read_response(client.reader)
    client.close()
    assert response.status == 413


async def test_half_closed_after_a_full_request_still_gets_the_answer(lab: Serve) -> None:
    server, _ = one_vm_server()
    address = await lab(server, "vpc-a")
    client = await Client.connect(address)
    client.writer.write(get("/latest/meta-data/instance-id"))
    client.writer.write_eof()
    response = await read_response(client.reader)
    assert (response.status, response.body) == (200, b"i-oneoneone1")
    assert await client.closed_by_server()
    client.close()


async def test_half_closed_mid_request_is_dropped_quietly(lab: Serve) -> None:
    server, _ = one_vm_server()
    address = await lab(server, "vpc-a")
    for partial in (b"GET /latest/meta", b"GET / HTTP/1.1\r\nHost: x", b""):
        client = await Client.connect(address)
        client.writer.write(partial)
        client.writer.write_eof()
        data = await asyncio.wait_for(client.reader.read(), 5)
        client.close()
        assert data == b"" or data.startswith(b"HTTP/1.1 400")
    healthy = await Client.connect(address)
    assert (await healthy.request(get(META))).status == 200
    healthy.close()


async def test_idle_and_slow_connections_are_closed_after_the_timeout(lab: Serve) -> None:
    server, _ = one_vm_server(idle_timeout=0.3)
    address = await lab(server, "vpc-a")
    idle = await Client.connect(address)
    slow = await Client.connect(address)
    slow.writer.write(b"GET / HTTP/1.1\r\nHo")  # and never the rest
    served = await Client.connect(address)
    assert (await served.request(get(META))).status == 200
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await idle.closed_by_server(timeout=5)
    assert await slow.closed_by_server(timeout=5)
    assert await served.closed_by_server(timeout=5)  # idle after its answer
    assert loop.time() - started < 3
    for client in (idle, slow, served):
        client.close()


async def test_connections_beyond_the_limit_are_refused(lab: Serve) -> None:
    server, _ = one_vm_server(max_connections_per_vpc=2)
    address = await lab(server, "vpc-a")
    first, second = await Client.connect(address), await Client.connect(address)
    assert (await first.request(get(META))).status == 200
    assert (await second.request(get(META))).status == 200
    third = await Client.connect(address)
    assert await third.closed_by_server()
    first.close()
    await asyncio.sleep(0.1)
    fourth = await Client.connect(address)
    assert (await fourth.request(get(META))).status == 200
    for client in (second, third, fourth):
        client.close()


# -- lifecycle ------------------------------------------------------------------------------


async def test_listeners_are_reported_per_vpc(lab: Serve) -> None:
    server, _ = one_vm_server()
    host, port = await lab(server, "vpc-a")
    assert server.listeners() == {"vpc-a": [f"{host}:{port}"]}


async def test_remove_vpc_closes_its_listener_and_connections_only(lab: Serve) -> None:
    identities = Identities(
        {("vpc-a", IPv4Address("127.0.0.1")): VM_ONE, ("vpc-b", IPv4Address("127.0.0.1")): VM_TWO}
    )
    server = MetadataServer(identities)
    in_a = await lab(server, "vpc-a")
    in_b = await lab(server, "vpc-b")
    open_a = await Client.connect(in_a)
    open_b = await Client.connect(in_b)
    assert (await open_a.request(get(META))).status == 200
    await server.remove_vpc("vpc-a")
    assert await open_a.closed_by_server()
    with pytest.raises(ConnectionRefusedError):
        await Client.connect(in_a)
    assert (await open_b.request(get(META))).status == 200
    assert list(server.listeners()) == ["vpc-b"]
    await server.remove_vpc("vpc-a")  # again: nothing to do
    for client in (open_a, open_b):
        client.close()


async def test_stop_closes_every_listener_and_connection(lab: Serve) -> None:
    server, _ = one_vm_server()
    address = await lab(server, "vpc-a")
    client = await Client.connect(address)
    assert (await client.request(get(META))).status == 200
    await server.stop()
    assert await client.closed_by_server()
    client.close()
    with pytest.raises(ConnectionRefusedError):
        await Client.connect(address)
    assert server.listeners() == {}
    with pytest.raises(MetadataError):
        await server.start()


async def test_add_vpc_needs_a_running_server_and_an_existing_namespace() -> None:
    server, _ = one_vm_server()
    with pytest.raises(MetadataError):
        await server.add_vpc("vpc-a", "tmissing0000", [])
    await server.start()
    with pytest.raises(NetnsError):
        await server.add_vpc("vpc-a", "tmissing0000", ["br-x"])
    assert server.listeners() == {}
    await server.stop()
