"""The metadata server listening inside real VPC namespaces: two "VMs" (client namespaces
on veths) per VPC ask 169.254.169.254 and [fe80::a9fe:a9fe%eth0] and get their own
instance; a second VPC with the same client addresses gets its own answers.

The server runs in the test process; namespaces and links are the test's own, named
with a random prefix, and nothing touches the machine's root namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from nubes.agent.network import nsutil
from nubes.agent.network.metadata.documents import InstanceMetadata
from nubes.agent.network.metadata.server import MetadataError, MetadataServer
from nubes.process import run_tool

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

BRIDGE = "br-meta"
GATEWAY = "198.18.0.1"
CLIENTS = {"c1": ("198.18.0.11", "fe80::11"), "c2": ("198.18.0.12", "fe80::12")}


def vm(instance_id: str) -> InstanceMetadata:
    return InstanceMetadata(
        instance_id=instance_id,
        name=instance_id,
        hostname=instance_id,
        project="proj",
        availability_zone="zone-a",
        public_keys={},
        user_data=None,
        nics=(),
    )


@dataclasses.dataclass
class Lab:
    prefix: str
    made: list[str] = dataclasses.field(default_factory=list)

    def netns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def ip(self, netns: str, *argv: str) -> None:
        run_tool(["ip", "-n", netns, *argv])

    def add_netns(self, name: str) -> str:
        netns = self.netns(name)
        run_tool(["ip", "netns", "add", netns])
        self.made.append(netns)
        self.ip(netns, "link", "set", "lo", "up")
        return netns

    def add_vpc(self, name: str) -> str:
        """A VPC namespace with a bridge and two client namespaces on veths into it; the
        metadata addresses are added later (`add_metadata_addresses`)."""
        vpc = self.add_netns(name)
        self.ip(vpc, "link", "add", BRIDGE, "type", "bridge")
        self.ip(vpc, "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        self.ip(vpc, "link", "set", BRIDGE, "up")
        for client, (v4, v6) in CLIENTS.items():
            netns = self.add_netns(f"{name}{client}")
            # Made inside the namespaces: neither end ever exists in the root namespace.
            self.ip(
                vpc, "link", "add", f"v{client}", "type", "veth", "peer", "eth0", "netns", netns
            )
            self.ip(vpc, "link", "set", f"v{client}", "master", BRIDGE, "up")
            # Only the link-local address the resolver knows: no EUI-64 one to choose from.
            self.ip(netns, "link", "set", "eth0", "addrgenmode", "none")
            self.ip(netns, "addr", "add", f"{v4}/24", "dev", "eth0")
            self.ip(netns, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
            self.ip(netns, "link", "set", "eth0", "up")
            self.ip(netns, "route", "add", "169.254.169.254/32", "via", GATEWAY)
        return vpc

    def add_metadata_addresses(self, vpc: str) -> None:
        self.ip(vpc, "addr", "add", "169.254.169.254/32", "dev", "lo")
        self.ip(vpc, "addr", "add", "fe80::a9fe:a9fe/64", "dev", BRIDGE, "nodad")

    def remove_all(self) -> None:
        for netns in reversed(self.made):
            with contextlib.suppress(Exception):
                run_tool(["ip", "netns", "delete", netns])


@pytest.fixture
def lab() -> Iterator[Lab]:
    made = Lab("t" + secrets.token_hex(2))
    try:
        yield made
    finally:
        made.remove_all()


@pytest.fixture
async def server(lab: Lab) -> AsyncIterator[MetadataServer]:
    table: dict[tuple[str, IPv4Address | IPv6Address], InstanceMetadata] = {}
    for vpc_id, instances in (
        ("vpc-a", ("i-aaaaaaaaa1", "i-aaaaaaaaa2")),
        ("vpc-b", ("i-bbbbbbbbb1",)),
    ):
        for (v4, v6), instance_id in zip(CLIENTS.values(), instances, strict=False):
            table[(vpc_id, ip_address(v4))] = vm(instance_id)
            table[(vpc_id, ip_address(v6))] = vm(instance_id)
    metadata = MetadataServer(lambda vpc_id, source: table.get((vpc_id, source)))
    await metadata.start()
    try:
        yield metadata
    finally:
        await metadata.stop()


async def connect(
    netns: str, v6: bool = False
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection from a client namespace to the metadata address."""
    family = socket.AF_INET6 if v6 else socket.AF_INET
    sock = nsutil.socket_in_netns(netns, family)
    sock.setblocking(False)
    try:
        if v6:
            index = nsutil.call_in_netns(netns, lambda: socket.if_nametoindex("eth0"))
            target: tuple[object, ...] = ("fe80::a9fe:a9fe", 80, 0, index)
        else:
            target = ("169.254.169.254", 80)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, target), 5)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def ask(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
) -> tuple[int, bytes]:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status = int(head.split()[1])
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return status, await reader.readexactly(length)


async def instance_id(netns: str, v6: bool = False) -> str:
    reader, writer = await connect(netns, v6)
    try:
        status, body = await ask(reader, writer, "/openstack/latest/meta_data.json")
        assert status == 200, body
        uuid: str = json.loads(body)["uuid"]
        return uuid
    finally:
        writer.close()


async def refused(netns: str, v6: bool = False) -> bool:
    try:
        _, writer = await connect(netns, v6)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def test_each_vm_gets_its_own_instance_over_ipv4_and_ipv6_link_local(
    lab: Lab, server: MetadataServer
) -> None:
    vpc = lab.add_vpc("a")
    # Before the addresses exist: FREEBIND lets the sockets bind anyway.
    await server.add_vpc("vpc-a", vpc, [BRIDGE])
    lab.add_metadata_addresses(vpc)
    assert server.listeners() == {"vpc-a": ["169.254.169.254:80", f"[fe80::a9fe:a9fe%{BRIDGE}]:80"]}
    assert await instance_id(lab.netns("ac1")) == "i-aaaaaaaaa1"
    assert await instance_id(lab.netns("ac2")) == "i-aaaaaaaaa2"
    assert await instance_id(lab.netns("ac1"), v6=True) == "i-aaaaaaaaa1"
    assert await instance_id(lab.netns("ac2"), v6=True) == "i-aaaaaaaaa2"


async def test_a_second_vpc_with_the_same_addresses_gets_its_own_answers(
    lab: Lab, server: MetadataServer
) -> None:
    for name, vpc_id in (("a", "vpc-a"), ("b", "vpc-b")):
        vpc = lab.add_vpc(name)
        lab.add_metadata_addresses(vpc)
        await server.add_vpc(vpc_id, vpc, [BRIDGE])
    assert await instance_id(lab.netns("ac1")) == "i-aaaaaaaaa1"
    assert await instance_id(lab.netns("bc1")) == "i-bbbbbbbbb1"
    assert await instance_id(lab.netns("bc1"), v6=True) == "i-bbbbbbbbb1"
    # 198.18.0.12 is a VM in vpc-a only: in vpc-b the same address is nobody.
    reader, writer = await connect(lab.netns("bc2"))
    status, body = await ask(reader, writer, "/latest/meta-data/instance-id")
    writer.close()
    assert (status, body) == (404, b"Not Found\n")


async def test_add_vpc_again_keeps_connections_and_drops_bridges_no_longer_listed(
    lab: Lab, server: MetadataServer
) -> None:
    vpc = lab.add_vpc("a")
    lab.add_metadata_addresses(vpc)
    await server.add_vpc("vpc-a", vpc, [BRIDGE])
    reader, writer = await connect(lab.netns("ac1"))
    assert (await ask(reader, writer, "/latest/meta-data/instance-id"))[1] == b"i-aaaaaaaaa1"
    await server.add_vpc("vpc-a", vpc, [BRIDGE])  # nothing changed: nothing reopened
    assert (await ask(reader, writer, "/latest/meta-data/instance-id"))[1] == b"i-aaaaaaaaa1"
    await server.add_vpc("vpc-a", vpc, [])
    assert server.listeners() == {"vpc-a": ["169.254.169.254:80"]}
    assert await refused(lab.netns("ac1"), v6=True)
    assert (await ask(reader, writer, "/latest/meta-data/instance-id"))[1] == b"i-aaaaaaaaa1"
    writer.close()
    await server.add_vpc("vpc-a", vpc, [BRIDGE])
    assert await instance_id(lab.netns("ac1"), v6=True) == "i-aaaaaaaaa1"


async def test_a_bridge_made_anew_is_listened_on_anew(lab: Lab, server: MetadataServer) -> None:
    vpc = lab.add_vpc("a")
    lab.add_metadata_addresses(vpc)
    await server.add_vpc("vpc-a", vpc, [BRIDGE])
    # The bridge goes and comes back (new ifindex): the old socket's scope is gone.
    lab.ip(vpc, "link", "delete", BRIDGE)
    lab.ip(vpc, "link", "add", BRIDGE, "type", "bridge")
    lab.ip(vpc, "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
    lab.ip(vpc, "addr", "add", "fe80::a9fe:a9fe/64", "dev", BRIDGE, "nodad")
    for client in CLIENTS:
        lab.ip(vpc, "link", "set", f"v{client}", "master", BRIDGE)
    lab.ip(vpc, "link", "set", BRIDGE, "up")
    await server.add_vpc("vpc-a", vpc, [BRIDGE])
    assert await instance_id(lab.netns("ac2"), v6=True) == "i-aaaaaaaaa2"


async def test_remove_vpc_and_stop_close_the_sockets(lab: Lab, server: MetadataServer) -> None:
    for name, vpc_id in (("a", "vpc-a"), ("b", "vpc-b")):
        vpc = lab.add_vpc(name)
        lab.add_metadata_addresses(vpc)
        await server.add_vpc(vpc_id, vpc, [BRIDGE])
    reader, writer = await connect(lab.netns("ac1"))
    assert (await ask(reader, writer, "/latest/meta-data/instance-id"))[0] == 200
    await server.remove_vpc("vpc-a")
    assert await asyncio.wait_for(reader.read(), 5) == b""  # its connection closed too
    writer.close()
    assert await refused(lab.netns("ac1"))
    assert await refused(lab.netns("ac1"), v6=True)
    assert await instance_id(lab.netns("bc1")) == "i-bbbbbbbbb1"
    await server.stop()
    assert await refused(lab.netns("bc1"))
    assert await refused(lab.netns("bc1"), v6=True)
    for name in ("a", "b"):
        listening = run_tool(["ip", "netns", "exec", lab.netns(name), "ss", "-Htln"])
        assert listening.strip() == "", listening


async def test_a_missing_bridge_is_an_error_and_leaves_nothing_listening(
    lab: Lab, server: MetadataServer
) -> None:
    vpc = lab.add_vpc("a")
    lab.add_metadata_addresses(vpc)
    with pytest.raises(MetadataError, match="br-nope"):
        await server.add_vpc("vpc-a", vpc, [BRIDGE, "br-nope"])
    assert server.listeners() == {}
    assert await refused(lab.netns("ac1"))
