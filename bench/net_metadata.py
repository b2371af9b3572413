"""Metadata server benchmark: requests per second for GET /openstack/latest/meta_data.json.

    .venv/bin/python -m bench.net_metadata [--seconds 5] [--connections 32] [--json]

The server (one MetadataServer, as the agent runs it) and the load generator (asyncio
keep-alive clients, one request in flight per connection) run in two processes, so the
client does not take the server's CPU on its event loop. Two runs:
(a) over loopback (127.0.0.1, a listener handed in with add_listener);
(b) as root, also inside namespaces: the server listens with add_vpc on
    169.254.169.254:80 in a VPC namespace, the client sits in another namespace behind
    a veth and the VPC's bridge, as a VM does (skipped without root).
Prints requests/s and the server's CPU time per request; exits 1 when (a) misses the
target. Every process and namespace it makes is gone when it ends, however it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from ipaddress import IPv4Address, IPv4Interface, IPv6Address
from pathlib import Path
from typing import Any

from nubes.agent.network import nsutil
from nubes.agent.network.metadata.documents import InstanceMetadata, NicMetadata
from nubes.agent.network.metadata.server import MetadataServer
from nubes.process import run_tool

TARGETS = {"loopback_requests_per_second": 2000.0}
PATH = "/openstack/latest/meta_data.json"
REQUEST = f"GET {PATH} HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n".encode()
VPC_ID = "vpc-benchbench"
BRIDGE = "br-bench"
CLIENT_ADDRESS = "198.18.0.11"
START_TIMEOUT = 10.0


class BenchFailed(RuntimeError):
    """Something went wrong that makes a figure meaningless (not a missed target)."""


def sample_instance() -> InstanceMetadata:
    """A VM as the agent would describe it: one NIC, two keys, some user-data."""
    nic = NicMetadata(
        port_id="port-benchbench",
        mac="fa:16:3e:00:00:01",
        ipv4=IPv4Interface(f"{CLIENT_ADDRESS}/24"),
        gateway_v4=IPv4Address("198.18.0.1"),
        ipv6=None,
        gateway_v6=None,
        mtu=1450,
        dhcp=True,
        dns_nameservers=("198.18.0.1",),
        floating_ipv4=None,
    )
    return InstanceMetadata(
        instance_id="i-benchbench",
        name="bench",
        hostname="bench",
        project="proj-bench",
        availability_zone="nova",
        public_keys={"laptop": "ssh-ed25519 " + "A" * 68 + " laptop", "ci": "ssh-ed25519 B ci"},
        user_data=b"#cloud-config\n{}\n",
        nics=(nic,),
    )


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the two processes -----------------------------------------------------------------------


async def serve(netns: str | None) -> None:
    """The server process: prints "ready <port>" once listening, serves until SIGTERM."""
    vm = sample_instance()
    # A dict lookup per request, as the agent's resolver does.
    table: dict[IPv4Address | IPv6Address, InstanceMetadata] = {}

    def resolve(vpc_id: str, source: IPv4Address | IPv6Address) -> InstanceMetadata | None:
        return table.get(source, vm)

    server = MetadataServer(resolve, max_connections_per_vpc=4096)
    await server.start()
    if netns is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        await server.add_listener(VPC_ID, sock)
    else:
        await server.add_vpc(VPC_ID, netns, [BRIDGE])
        port = 80
    print(f"ready {port}", flush=True)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    loop.add_signal_handler(signal.SIGINT, stopped.set)
    await stopped.wait()
    await server.stop()


async def load(host: str, port: int, connections: int, seconds: float, netns: str | None) -> None:
    """The client process: keep-alive connections, one request in flight on each; prints
    {"requests", "errors", "seconds", "cpu"} as JSON."""

    async def open_one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if netns is None:
            return await asyncio.open_connection(host, port)
        sock = nsutil.socket_in_netns(netns, socket.AF_INET)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        return await asyncio.open_connection(sock=sock)

    streams = [await open_one() for _ in range(connections)]
    counts = [0] * connections
    errors = [0] * connections
    deadline = time.monotonic() + seconds

    async def drive(index: int) -> None:
        reader, writer = streams[index]
        while time.monotonic() < deadline:
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            start = head.index(b"Content-Length: ") + 16
            await reader.readexactly(int(head[start : head.index(b"\r\n", start)]))
            if not head.startswith(b"HTTP/1.1 200 "):
                errors[index] += 1
            counts[index] += 1

    cpu_before = time.process_time()
    started = time.monotonic()
    await asyncio.gather(*(drive(index) for index in range(connections)))
    elapsed = time.monotonic() - started
    result = {
        "requests": sum(counts),
        "errors": sum(errors),
        "seconds": elapsed,
        "cpu": time.process_time() - cpu_before,
    }
    for _, writer in streams:
        writer.close()
    print(json.dumps(result), flush=True)


# -- one run ---------------------------------------------------------------------------------


def _child(*argv: str) -> list[str]:
    return [sys.executable, "-m", "bench.net_metadata", *argv]


def run_once(
    seconds: float, connections: int, *, server_netns: str | None, client_netns: str | None
) -> dict[str, float]:
    """Starts the server process, loads it from the client process, stops both."""
    serve_argv = ["--serve"] + (["--netns", server_netns] if server_netns else [])
    server = subprocess.Popen(
        _child(*serve_argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline().split()
        if line[:1] != ["ready"]:
            raise BenchFailed(f"the server process did not start (exit {server.poll()})")
        host = "127.0.0.1" if server_netns is None else "169.254.169.254"
        load_argv = ["--load", host, line[1], "--connections", str(connections)]
        load_argv += ["--seconds", str(seconds)]
        load_argv += ["--netns", client_netns] if client_netns else []
        cpu_before = cpu_seconds(server.pid)
        finished = subprocess.run(
            _child(*load_argv), capture_output=True, text=True, timeout=seconds + 60, check=False
        )
        server_cpu = cpu_seconds(server.pid) - cpu_before
        if finished.returncode != 0:
            raise BenchFailed(f"the load process failed: {finished.stderr[-2000:]}")
        figures = json.loads(finished.stdout.strip().splitlines()[-1])
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    requests = figures["requests"]
    return {
        "requests_per_second": requests / figures["seconds"],
        "requests": requests,
        "errors": figures["errors"],
        "server_cpu_us_per_request": server_cpu / max(1, requests) * 1e6,
        "server_cpu_share": server_cpu / figures["seconds"],
        "client_cpu_share": figures["cpu"] / figures["seconds"],
    }


class Namespaces:
    """A VPC namespace (metadata address on lo, a bridge) and a client namespace behind a
    veth on that bridge; made with `ip`, deleted on exit."""

    def __init__(self) -> None:
        prefix = "t" + secrets.token_hex(2)
        self.vpc = f"{prefix}-bvpc"
        self.client = f"{prefix}-bcli"
        self.made: list[str] = []

    def __enter__(self) -> Namespaces:
        try:
            for netns in (self.vpc, self.client):
                run_tool(["ip", "netns", "add", netns])
                self.made.append(netns)
                run_tool(["ip", "-n", netns, "link", "set", "lo", "up"])
            vpc = ["ip", "-n", self.vpc]
            run_tool([*vpc, "addr", "add", "169.254.169.254/32", "dev", "lo"])
            run_tool([*vpc, "link", "add", BRIDGE, "type", "bridge"])
            run_tool([*vpc, "addr", "add", "198.18.0.1/24", "dev", BRIDGE])
            run_tool([*vpc, "link", "set", BRIDGE, "up"])
            veth = ["vbench", "type", "veth", "peer", "eth0", "netns", self.client]
            run_tool([*vpc, "link", "add", *veth])
            run_tool([*vpc, "link", "set", "vbench", "master", BRIDGE, "up"])
            client = ["ip", "-n", self.client]
            run_tool([*client, "addr", "add", f"{CLIENT_ADDRESS}/24", "dev", "eth0"])
            run_tool([*client, "link", "set", "eth0", "up"])
            run_tool([*client, "route", "add", "169.254.169.254/32", "via", "198.18.0.1"])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exception: object) -> None:
        for netns in reversed(self.made):
            with contextlib.suppress(Exception):
                run_tool(["ip", "netns", "delete", netns])
        self.made.clear()


def machine() -> dict[str, Any]:
    models = [
        line.partition(":")[2].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    ]
    return {
        "cpus": os.cpu_count(),
        "cpu_model": models[0] if models else "?",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


def measure_metadata(seconds: float = 5, connections: int = 32) -> dict[str, float]:
    """Requests/s (and CPU per request) over loopback and, as root, between namespaces.

    Raises:
        BenchFailed: a process did not start or the load generator failed.
    """
    results: dict[str, float] = {}
    loopback = run_once(seconds, connections, server_netns=None, client_netns=None)
    results.update({f"loopback_{name}": value for name, value in loopback.items()})
    if os.geteuid() == 0:
        with Namespaces() as namespaces:
            in_netns = run_once(
                seconds, connections, server_netns=namespaces.vpc, client_netns=namespaces.client
            )
        results.update({f"netns_{name}": value for name, value in in_netns.items()})
    return results


def report(results: dict[str, float], seconds: float, connections: int) -> None:
    info = machine()
    print(
        f"metadata server: GET {PATH}, {connections} keep-alive connections, {seconds:g} s; "
        f"server and load generator in separate processes"
    )
    print(
        f"machine: {info['cpus']} CPUs ({info['cpu_model']}), Linux {info['kernel']}, "
        f"Python {info['python']}, {info['date']}"
    )
    print(
        "| run | requests/s | requests | errors | server CPU µs/request | server CPU | client CPU |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    runs = (("loopback", "(a) loopback 127.0.0.1"), ("netns", "(b) namespaces, veth + bridge"))
    for key, label in runs:
        if f"{key}_requests" not in results:
            print(f"| {label} | skipped (needs root) | | | | | |")
            continue
        print(
            f"| {label} | {results[f'{key}_requests_per_second']:,.0f} "
            f"| {results[f'{key}_requests']:,.0f} | {results[f'{key}_errors']:.0f} "
            f"| {results[f'{key}_server_cpu_us_per_request']:.0f} "
            f"| {results[f'{key}_server_cpu_share']:.0%} "
            f"| {results[f'{key}_client_cpu_share']:.0%} |"
        )
    for what, figure, met in verdicts(results):
        print(f"{what}: {figure}: {'met' if met else 'MISSED'}")


def verdicts(results: dict[str, float]) -> list[tuple[str, str, bool]]:
    target = TARGETS["loopback_requests_per_second"]
    rate = results["loopback_requests_per_second"]
    errors = results["loopback_errors"] + results.get("netns_errors", 0)
    return [
        ("(a) loopback", f"{rate:,.0f} requests/s, target >= {target:,.0f}", rate >= target),
        ("errors", f"{errors:.0f} non-200 answers, target 0", errors == 0),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.net_metadata", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load", nargs=2, metavar=("HOST", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--netns", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.serve:
        asyncio.run(serve(options.netns))
        return 0
    if options.load:
        host, port = options.load
        asyncio.run(load(host, int(port), options.connections, options.seconds, options.netns))
        return 0
    try:
        results = measure_metadata(options.seconds, options.connections)
    except BenchFailed as error:
        print(f"bench.net_metadata: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "bench.net_metadata: interrupted; its processes and namespaces are gone",
            file=sys.stderr,
        )
        return 130
    if options.json:
        print(json.dumps(results, indent=2))
    else:
        report(results, options.seconds, options.connections)
    return 0 if all(met for _, _, met in verdicts(results)) else 1


if __name__ == "__main__":
    sys.exit(main())
