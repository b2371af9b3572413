"""Tenant networks for agent tests: writes network, subnet, port, security group, key pair
and floating IP records into an AgentLab's store (as the API will), and gives the test
an "outside world": a namespace on the lab's external bridge, never the real uplink.

Addresses come from 198.18.0.0/15 and 2001:db8::/32; VNIs are random so labs that run
at the same time on one machine do not collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import secrets
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from nubes.agent.network.names import netns_name
from nubes.agent.network.nsutil import socket_in_netns
from nubes.ids import IdKind, new_id
from nubes.ipam import allocate_ipv4, random_mac, slaac_address
from nubes.model.common import now
from nubes.model.network import (
    ExternalGateway,
    ExternalSpec,
    FloatingIpRecord,
    FloatingIpSpec,
    KeypairRecord,
    NetworkRecord,
    NetworkSpec,
    PortRecord,
    PortSpec,
    SubnetRecord,
    SubnetSpec,
    keypair_key_name,
)
from nubes.model.security_group import (
    SecurityGroupRecord,
    SecurityGroupRule,
    SecurityGroupSpec,
)
from nubes.store.keys import Kind, resource_key
from tests.support.agent_lab import AgentLab

OUTSIDE_CIDR = ipaddress.IPv4Network("198.19.200.0/24")
OUTSIDE_ROUTER = ipaddress.IPv4Address("198.19.200.1")

SSH_OPTIONS = (
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "BatchMode=yes",
    "-o", "ConnectTimeout=5",
    "-o", "LogLevel=ERROR",
)  # fmt: skip


def external_bridge(lab_prefix: str) -> str:
    return f"{lab_prefix}eb"


# How long a tiny guest may take to print a line under TCG on a busy 2-core machine.
BOOT_TIMEOUT = 90.0
# Security group rules: SSH in, all egress; and the same with ping in.
SSH_ONLY: list[dict[str, Any]] = [
    {"direction": "ingress", "protocol": "tcp", "port_min": 22, "port_max": 22},
    {"direction": "egress"},
]
OPEN: list[dict[str, Any]] = [{"direction": "ingress", "protocol": "icmp"}, *SSH_ONLY]

# The [agent] lines a networking lab needs: its own external bridge.
NETWORK_SETTINGS = 'external_bridges = { external = "{prefix}eb" }\n'


def run(argv: Sequence[str], *, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=timeout)


def in_netns(
    netns: str, argv: Sequence[str], *, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    return run(["ip", "netns", "exec", netns, *argv], timeout=timeout)


def ping(netns: str, address: object, *, count: int = 1, wait: float = 1.0) -> bool:
    """Whether `address` answers a ping from inside `netns`."""
    completed = in_netns(
        netns, ["ping", "-n", "-c", str(count), "-W", str(wait), str(address)], timeout=30
    )
    return completed.returncode == 0


class NetLab:
    """Network records on top of an AgentLab (which owns the store and the agent)."""

    def __init__(self, lab: AgentLab) -> None:
        self.lab = lab
        self.ssh_key = lab.directory / "id_ed25519"

    def vpc_netns(self, vpc_id: str) -> str:
        return netns_name(self.lab.prefix, vpc_id)

    async def _put(self, kind: Kind, name: str, record: Any) -> None:
        await self.lab.db.put(resource_key(kind, name), record.to_json())

    async def network(
        self,
        *,
        gateway: tuple[str, str] | None = None,
        external: str | None = None,
        name: str = "net",
    ) -> str:
        """A VPC (or, with `external` = a CIDR, an external network on the lab's bridge)."""
        network_id = new_id(IdKind.NETWORK)
        spec = NetworkSpec(
            name=name,
            gateway=ExternalGateway(network=gateway[0], address=gateway[1]) if gateway else None,
            external=(
                ExternalSpec(cidr=external, gateway=str(OUTSIDE_ROUTER)) if external else None
            ),
        )
        await self._put(
            Kind.NETWORK, network_id, NetworkRecord(id=network_id, spec=spec, created_at=now())
        )
        return network_id

    async def subnet(
        self, network_id: str, cidr: str, *, ipv6_cidr: str | None = None, **spec: Any
    ) -> SubnetRecord:
        subnet_id = new_id(IdKind.SUBNET)
        record = SubnetRecord(
            id=subnet_id,
            spec=SubnetSpec(
                name="sub",
                network=network_id,
                cidr=cidr,
                ipv6_cidr=ipv6_cidr,
                vni=1000 + secrets.randbelow(1 << 23),
                **spec,
            ),
            created_at=now(),
        )
        await self._put(Kind.SUBNET, subnet_id, record)
        return record

    async def port(
        self,
        subnet: SubnetRecord,
        *,
        security_groups: Sequence[str] = (),
        port_security: bool = True,
        address: str | None = None,
    ) -> PortRecord:
        """A port with the next free address of the subnet (and its SLAAC IPv6)."""
        used = []
        for kv in (await self.lab.db.range(f"/nubes/{Kind.PORT.value}/")).kvs:
            if kv.key.count("/") == 3:
                other = PortRecord.from_json(kv.value)
                if other.spec.subnet == subnet.id:
                    used.extend(other.spec.ipv4)
        mac = random_mac()
        ipv4 = ipaddress.IPv4Address(address) if address else allocate_ipv4(subnet.spec, used)
        fixed = [str(ipv4)]
        if subnet.spec.network_v6 is not None:
            fixed.append(str(slaac_address(subnet.spec.network_v6, mac)))
        port_id = new_id(IdKind.PORT)
        record = PortRecord(
            id=port_id,
            spec=PortSpec(
                network=subnet.spec.network,
                subnet=subnet.id,
                mac=mac,
                fixed_ips=fixed,
                security_groups=list(security_groups),
                port_security=port_security,
            ),
            created_at=now(),
        )
        await self._put(Kind.PORT, port_id, record)
        return record

    async def security_group(self, rules: Sequence[dict[str, Any]], *, name: str = "sg") -> str:
        group_id = new_id(IdKind.SECURITY_GROUP)
        await self.set_rules(group_id, rules, name=name)
        return group_id

    async def set_rules(
        self, group_id: str, rules: Sequence[dict[str, Any]], *, name: str = "sg"
    ) -> None:
        spec = SecurityGroupSpec(name=name, rules=[SecurityGroupRule(**rule) for rule in rules])
        await self._put(
            Kind.SECURITY_GROUP,
            group_id,
            SecurityGroupRecord(id=group_id, spec=spec, created_at=now()),
        )

    async def keypair(self, name: str = "mine") -> str:
        """Makes an ed25519 key (private part in the lab directory); returns the public line."""
        if not self.ssh_key.exists():
            completed = run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.ssh_key)]
            )
            assert completed.returncode == 0, completed.stderr
        public = Path(f"{self.ssh_key}.pub").read_text().strip()  # noqa: ASYNC240
        record = KeypairRecord(name=name, public_key=public, created_at=now())
        await self._put(Kind.KEYPAIR, keypair_key_name("default", name), record)
        return public

    async def floating_ip(self, external_id: str, address: str, port_id: str | None) -> str:
        fip_id = new_id(IdKind.FLOATING_IP)
        await self.set_floating_ip(fip_id, external_id, address, port_id)
        return fip_id

    async def set_floating_ip(
        self, fip_id: str, external_id: str, address: str, port_id: str | None
    ) -> None:
        record = FloatingIpRecord(
            id=fip_id,
            spec=FloatingIpSpec(network=external_id, address=address, port=port_id),
            created_at=now(),
        )
        await self._put(Kind.FLOATING_IP, fip_id, record)

    def ssh(
        self, netns: str, address: object, command: str, *, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Runs `command` in the guest over SSH, from inside `netns`, with the lab's key."""
        return in_netns(
            netns,
            ["ssh", *SSH_OPTIONS, "-i", str(self.ssh_key), f"root@{address}", command],
            timeout=timeout,
        )


class Outside:
    """The outside world of a lab: the external bridge on the host, and a namespace on it
    holding the external network's router address."""

    def __init__(self, lab_prefix: str) -> None:
        self.bridge = external_bridge(lab_prefix)
        self.netns = f"{lab_prefix}-outside"
        self._veth = f"{lab_prefix}ov"

    def __enter__(self) -> Self:
        try:
            steps = [
                ["ip", "link", "add", self.bridge, "type", "bridge"],
                ["ip", "link", "set", self.bridge, "up"],
                ["ip", "netns", "add", self.netns],
                ["ip", "link", "add", self._veth, "type", "veth", "peer", "name", "out0",
                 "netns", self.netns],
                ["ip", "link", "set", self._veth, "master", self.bridge, "up"],
                ["ip", "-n", self.netns, "link", "set", "lo", "up"],
                ["ip", "-n", self.netns, "link", "set", "out0", "up"],
                ["ip", "-n", self.netns, "addr", "add",
                 f"{OUTSIDE_ROUTER}/{OUTSIDE_CIDR.prefixlen}", "dev", "out0"],
            ]  # fmt: skip
            for argv in steps:
                completed = run(argv)
                assert completed.returncode == 0, f"{argv}: {completed.stderr}"
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        run(["ip", "netns", "del", self.netns])
        run(["ip", "link", "del", self._veth])
        run(["ip", "link", "del", self.bridge])


# -- for the end-to-end VM tests: waiting, capturing frames, listeners, extra namespaces --


async def boot(net: NetLab, name: str, ports: Sequence[PortRecord], **spec: Any) -> str:
    """A VM of the lab's tiny image on `ports`, given the key pair "mine"."""
    return await net.lab.create_vm(
        name=name, ports=[p.id for p in ports], key_names=["mine"], **spec
    )


async def until(
    check: Callable[[], bool], *, timeout: float, interval: float = 0.2
) -> float | None:
    """Seconds until `check()` (run on a thread) held, or None if it did not in `timeout`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        if await asyncio.to_thread(check):
            return loop.time() - start
        if loop.time() - start > timeout:
            return None
        await asyncio.sleep(interval)


def tcp_answers(netns: str, address: object, port: int, *, wait: float = 2.0) -> bool:
    """Whether an HTTP server at `address`:`port` answers from inside `netns`."""
    completed = in_netns(
        netns,
        ["curl", "-s", "-o", "/dev/null", "--max-time", str(wait), f"http://{address}:{port}/"],
    )
    return completed.returncode == 0


class Capture:
    """tcpdump on one link of a namespace: the frames matching `expression`, one line each
    (with link-level headers), from when the capture listens until `stop()`."""

    def __init__(self, netns: str, link: str, expression: str) -> None:
        self.where = f"{netns}/{link}"
        self._process = subprocess.Popen(
            ["ip", "netns", "exec", netns, "tcpdump", "-i", link, "-n", "-e", "-l",
             "-U", expression],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self._process.stderr is not None
        deadline = time.monotonic() + 10
        said = ""
        # tcpdump says "listening on <link>" once its socket is bound and filtered. Read the
        # pipe's fd directly: a buffered readline could swallow that line before select sees it.
        stderr = self._process.stderr.fileno()
        while "listening on" not in said:
            ready, _, _ = select.select([stderr], [], [], 1.0)
            if ready:
                said += os.read(stderr, 4096).decode(errors="replace")
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"tcpdump on {self.where} did not start: {said}")

    def stop(self) -> list[str]:
        """Ends tcpdump (by its pid) and returns the frames it printed."""
        if self._process.poll() is None:
            self._process.terminate()
        try:
            out, _ = self._process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            out, _ = self._process.communicate()
        return [line for line in out.splitlines() if line.strip()]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class SourceListener:
    """A TCP listener in a namespace that answers each connection with "seen <its source
    address>" and remembers the sources: what an outside server sees of a VM."""

    def __init__(self, netns: str, address: str, port: int) -> None:
        self.sources: list[str] = []
        self._socket = socket_in_netns(netns, socket.AF_INET)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((address, port))
        self._socket.listen(8)
        self._socket.settimeout(0.2)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, (source, _) = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with connection:
                self.sources.append(source)
                with contextlib.suppress(OSError):
                    connection.sendall(f"seen {source}\n".encode())

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._socket.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SubnetNamespace:
    """A namespace plugged straight into a subnet's bridge by a veth (no port, no
    firewall of its own): another machine on the segment, e.g. a DHCP client."""

    def __init__(self, vpc_netns: str, bridge: str) -> None:
        prefix = "t" + secrets.token_hex(2)
        self.netns = f"{prefix}-seg"
        self._peer = f"{prefix}sg"  # the veth's end on the bridge, in the VPC namespace
        self.link = "seg0"
        try:
            steps = [
                ["ip", "netns", "add", self.netns],
                ["ip", "-n", self.netns, "link", "add", self.link, "type", "veth", "peer",
                 "name", self._peer, "netns", vpc_netns],
                ["ip", "-n", vpc_netns, "link", "set", self._peer, "master", bridge, "up"],
                ["ip", "-n", self.netns, "link", "set", "lo", "up"],
                ["ip", "-n", self.netns, "link", "set", self.link, "up"],
            ]  # fmt: skip
            for argv in steps:
                completed = run(argv)
                assert completed.returncode == 0, f"{argv}: {completed.stderr}"
        except BaseException:
            self.close()
            raise

    def dhcp_lease(self, *, tries: int = 4, seconds_each: int = 2) -> str | None:
        """Asks for a DHCPv4 lease on the segment (busybox udhcpc, configures nothing);
        the offered address, or None when no server gave one."""
        completed = in_netns(
            self.netns,
            ["busybox", "udhcpc", "-i", self.link, "-f", "-q", "-n", "-t", str(tries),
             "-T", str(seconds_each), "-s", "/bin/true"],
            timeout=tries * seconds_each + 20,
        )  # fmt: skip
        said = completed.stdout + completed.stderr
        if completed.returncode != 0:
            return None
        found = re.search(r"lease of (\S+) obtained", said)
        return found.group(1) if found else "?"

    def close(self) -> None:
        # Deleting the namespace deletes its veth end, and with it the peer on the bridge.
        run(["ip", "netns", "del", self.netns])

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
