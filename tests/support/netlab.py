"""A small network lab for root-only tests: namespaces, bridges, veths and processes under
one random prefix, all removed by `close()` however the test ends.

A "VM" here is a namespace whose `eth0` is a veth; its peer, on a bridge of the VPC
namespace, plays the VM's tap.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from nubes.agent.network.nsutil import write_sysctl
from nubes.process import find_tool
from tests.support.processes import stop_process

# br_netfilter hands bridged IP to the inet hooks (and so to conntrack) only with these.
VPC_SYSCTLS = {
    "net/bridge/bridge-nf-call-iptables": "1",
    "net/bridge/bridge-nf-call-ip6tables": "1",
    "net/ipv4/ip_forward": "1",
    "net/ipv6/conf/all/forwarding": "1",
    "net/ipv6/conf/default/accept_dad": "0",
    "net/ipv6/conf/all/accept_dad": "0",
}
# No DAD: addresses are usable at once, so tests need not wait for them.
VM_SYSCTLS = {
    "net/ipv6/conf/default/accept_dad": "0",
    "net/ipv6/conf/all/accept_dad": "0",
    "net/ipv6/conf/default/accept_ra": "0",
}


def link_local_from_mac(mac: str) -> ipaddress.IPv6Address:
    """The EUI-64 link-local address the kernel gives an interface with `mac`."""
    octets = [int(part, 16) for part in mac.split(":")]
    octets[0] ^= 0x02
    eui = [*octets[:3], 0xFF, 0xFE, *octets[3:]]
    return ipaddress.IPv6Address(bytes([0xFE, 0x80, 0, 0, 0, 0, 0, 0, *eui]))


@dataclass
class Vm:
    """A namespace standing in for a VM on a port."""

    netns: str
    tap: str  # the veth end in the VPC namespace, on the bridge
    mac: str
    ipv4: ipaddress.IPv4Interface | None
    ipv6: ipaddress.IPv6Interface | None

    @property
    def link_local(self) -> ipaddress.IPv6Address:
        return link_local_from_mac(self.mac)


@dataclass
class NetLab:
    prefix: str = field(default_factory=lambda: "t" + secrets.token_hex(2))
    namespaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)

    def __enter__(self) -> NetLab:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Ends our processes (by PID) and deletes our namespaces, with what is in them."""
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                stop_process(process, timeout=5)
        self.processes.clear()
        for name in reversed(self.namespaces):
            subprocess.run([find_tool("ip"), "netns", "delete", name], check=False)
        self.namespaces.clear()

    # -- building -------------------------------------------------------------------------

    def namespace(self, role: str, sysctls: dict[str, str] | None = None) -> str:
        name = f"{self.prefix}-{role}"
        self.ip("netns", "add", name)
        self.namespaces.append(name)
        self.ip("-n", name, "link", "set", "lo", "up")
        if sysctls:
            write_sysctl(name, sysctls)
        return name

    def bridge(self, netns: str, name: str, addresses: Sequence[str] = ()) -> None:
        self.ip("-n", netns, "link", "add", name, "type", "bridge")
        for address in addresses:
            self.ip("-n", netns, "address", "add", address, "dev", name, "nodad")
        self.ip("-n", netns, "link", "set", name, "up")

    def veth(self, netns_a: str, name_a: str, netns_b: str, name_b: str) -> None:
        self.ip("-n", netns_a, "link", "add", name_a, "type", "veth", "peer", "name", name_b)
        self.ip("-n", netns_a, "link", "set", name_b, "netns", netns_b)
        self.ip("-n", netns_a, "link", "set", name_a, "up")

    def vm(
        self,
        role: str,
        *,
        vpc: str,
        bridge: str,
        mac: str,
        ipv4: str | None = None,
        ipv6: str | None = None,
        gateway4: str | None = None,
        gateway6: str | None = None,
    ) -> Vm:
        """A VM namespace with `eth0` (MAC, addresses, default routes) whose peer is on
        `bridge` in `vpc`, named `tp-<role>`."""
        netns = self.namespace(role, VM_SYSCTLS)
        tap = f"tp-{role}"[:15]
        self.veth(vpc, tap, netns, "eth0")
        self.ip("-n", vpc, "link", "set", tap, "master", bridge)
        self.ip("-n", netns, "link", "set", "eth0", "address", mac)
        for address in (ipv4, ipv6):
            if address is not None:
                self.ip("-n", netns, "address", "add", address, "dev", "eth0", "nodad")
        self.ip("-n", netns, "link", "set", "eth0", "up")
        if gateway4 is not None:
            self.ip("-n", netns, "route", "add", "default", "via", gateway4)
        if gateway6 is not None:
            self.ip("-n", netns, "-6", "route", "add", "default", "via", gateway6)
        return Vm(
            netns,
            tap,
            mac,
            None if ipv4 is None else ipaddress.IPv4Interface(ipv4),
            None if ipv6 is None else ipaddress.IPv6Interface(ipv6),
        )

    # -- running --------------------------------------------------------------------------

    def ip(self, *argv: str) -> str:
        return self.run(None, "ip", *argv).stdout

    def run(
        self, netns: str | None, *argv: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Runs `argv` (inside `netns` unless None) to completion."""
        prefix = [] if netns is None else [find_tool("ip"), "netns", "exec", netns]
        command = [*prefix, find_tool(argv[0]), *argv[1:]]
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and completed.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited {completed.returncode}: {completed.stderr.strip()}"
            )
        return completed

    def popen(self, netns: str, *argv: str, **options: Any) -> subprocess.Popen[Any]:
        """A background process in `netns`, ended by `close()`."""
        process = subprocess.Popen([find_tool("ip"), "netns", "exec", netns, *argv], **options)
        self.processes.append(process)
        return process

    def ping(self, netns: str, address: str, *, count: int = 1, wait: float = 1) -> bool:
        """Whether `address` answers `count` pings from `netns`."""
        argv = ["ping", "-n", "-q", "-c", str(count), "-W", str(wait), "-i", "0.2", address]
        return self.run(netns, *argv, check=False, timeout=count * wait + 10).returncode == 0


def eventually(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> float:
    """Seconds until `condition()` held; raises AssertionError if it did not in `timeout`."""
    start = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true within {timeout} s")
        time.sleep(interval)


def wide_group_rules(count: int, *, allow_tcp_port: int, allow_from: str) -> list[dict[str, Any]]:
    """`count` ingress rules (as SecurityGroupRule keyword arguments) of every kind, none
    matching TCP to `allow_tcp_port` from `allow_from` but the last, which allows it."""
    rules: list[dict[str, Any]] = []
    for number in range(count - 1):
        host = f"198.19.{100 + number // 200}.{number % 200 + 1}"
        kind = number % 10
        if kind < 5:  # tcp ranges from single hosts, never the allowed port
            low = 10000 + 7 * number
            rules.append(
                {"protocol": "tcp", "port_min": low, "port_max": low + 3, "remote_cidr": host}
            )
        elif kind < 7:
            rules.append(
                {"protocol": "udp", "port_min": 5201, "port_max": 5201, "remote_cidr": host}
            )
        elif kind == 7:
            rules.append({"protocol": "icmp", "port_min": number % 40, "remote_cidr": host})
        elif kind == 8:
            rules.append({"protocol": "any", "remote_cidr": f"198.18.{128 + number // 10}.0/25"})
        else:
            rules.append(
                {
                    "ethertype": "ipv6",
                    "protocol": "tcp",
                    "port_min": 2000 + number,
                    "port_max": 2000 + number,
                    "remote_cidr": f"2001:db8:ffff::{number:x}/128",
                }
            )
    rules.append(
        {
            "protocol": "tcp",
            "port_min": allow_tcp_port,
            "port_max": allow_tcp_port,
            "remote_cidr": allow_from,
        }
    )
    return [{"direction": "ingress", **rule} for rule in rules]


# -- crafted frames, for AF_PACKET sockets ------------------------------------------------

BROADCAST = b"\xff" * 6


def mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_udp_frame(
    mac: str,
    source: str,
    sport: int,
    dport: int,
    marker: bytes,
    destination: str = "255.255.255.255",
) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(marker), 0) + marker
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
        socket.inet_aton(source), socket.inet_aton(destination),
    )  # fmt: skip
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return BROADCAST + mac_bytes(mac) + b"\x08\x00" + header + udp


def ipv6_frame(mac: str, source: str, next_header: int, body: bytes) -> bytes:
    """An IPv6 packet to ff02::1 with `body` (whose checksum at 2..4 or 6..8 is filled in)."""
    source_bytes = socket.inet_pton(socket.AF_INET6, source)
    destination = socket.inet_pton(socket.AF_INET6, "ff02::1")
    pseudo = source_bytes + destination + struct.pack("!I3xB", len(body), next_header)
    offset = 2 if next_header == 58 else 6
    body = body[:offset] + struct.pack("!H", _checksum(pseudo + body)) + body[offset + 2 :]
    header = struct.pack("!IHBB", 0x60000000, len(body), next_header, 255)
    return (
        b"\x33\x33\x00\x00\x00\x01"
        + mac_bytes(mac)
        + b"\x86\xdd"
        + header
        + source_bytes
        + destination
        + body
    )


def arp_reply_frame(mac: str, claimed: str, marker: bytes) -> bytes:
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) + mac_bytes(mac) + socket.inet_aton(claimed)
    body += BROADCAST + socket.inet_aton("198.18.1.255")
    return BROADCAST + mac_bytes(mac) + b"\x08\x06" + body + marker
