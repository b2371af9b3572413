"""Overlay benchmark: TCP throughput between two ports on two hosts (over the VXLAN across
the underlay) against two ports on one host, in one run.

    .venv/bin/python -m bench.overlay [--seconds 4] [--rounds 4] [--json]

Two "hosts" are underlay namespaces joined by a veth (198.18.210.0/24). On each, a VPC
namespace is made by the agent's own code (links.ensure_netns, ensure_bridge, ensure_vxlan
with `underlay_netns`, forwarding.ensure_overlay with the l2pop entries); namespaces on
veths stand in for VMs, as in bench/net_datapath.py. The server port is on host B; one
client port is on host A (across the overlay), one on host B (same bridge). Both cases use
the VPC MTU (1450) end to end, no firewall in either. Rounds alternate the order (ABBA).
Needs root; everything is removed however the run ends. Exits 1 when the ratio misses.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import statistics
import subprocess
import sys
from typing import Any

from bench.net_datapath import BenchFailed, throughput_gbps
from nubes.agent.network import forwarding, links
from nubes.agent.network.overlay import OverlayPlan
from nubes.errors import ToolMissing
from tests.support.netlab import NetLab, Vm, eventually

TARGETS = {"ratio": 0.7}
IPERF_PORT = 5201
MTU = 1450
VNI = 4711
SUBNET_GATEWAY = ipaddress.IPv4Interface("198.18.211.1/24")
UNDERLAY = {"a": "198.18.210.1", "b": "198.18.210.2"}


def _vm(lab: NetLab, role: str, vpc: str, number: int) -> Vm:
    vm = lab.vm(
        role,
        vpc=vpc,
        bridge="br-x",
        mac=f"02:00:00:00:02:{number:02x}",
        ipv4=f"198.18.211.{10 + number}/24",
        gateway4=str(SUBNET_GATEWAY.ip),
    )
    lab.ip("-n", vpc, "link", "set", vm.tap, "mtu", str(MTU))
    lab.ip("-n", vm.netns, "link", "set", "eth0", "mtu", str(MTU))
    return vm


async def _make_hosts(lab: NetLab) -> dict[str, str]:
    """Host name -> VPC namespace, with the subnet's bridge and VXLAN as the agent makes them."""
    underlay = {name: lab.namespace(f"u{name}") for name in UNDERLAY}
    lab.veth(underlay["a"], "ula", underlay["b"], "ulb")
    for name, address in UNDERLAY.items():
        lab.ip("-n", underlay[name], "address", "add", f"{address}/24", "dev", f"ul{name}")
        lab.ip("-n", underlay[name], "link", "set", f"ul{name}", "up")
    vpcs = {}
    for name, address in UNDERLAY.items():
        vpc = f"{lab.prefix}-v{name}"
        lab.namespaces.append(vpc)  # removed with the lab's own
        await links.ensure_netns(vpc)
        await links.ensure_bridge(vpc, "br-x", mtu=MTU, addresses=[SUBNET_GATEWAY])
        await links.ensure_vxlan(
            vpc,
            "vx-x",
            staging_name=f"{lab.prefix}vx",
            vni=VNI,
            local=ipaddress.IPv4Address(address),
            bridge="br-x",
            mtu=MTU,
            underlay_netns=underlay[name],
        )
        vpcs[name] = vpc
    return vpcs


async def _program(vpcs: dict[str, str], where: dict[str, Vm]) -> None:
    """The l2pop entries of each host: every port on the other host (vm role -> host)."""
    for host, vpc in vpcs.items():
        (other,) = [h for h in vpcs if h != host]
        remote = ipaddress.IPv4Address(UNDERLAY[other])
        ports = [vm for role, vm in where.items() if role.endswith(other)]
        plan = OverlayPlan(
            flood=frozenset({remote}),
            fdb={vm.mac: remote for vm in ports},
            neighbours={vm.ipv4.ip: vm.mac for vm in ports if vm.ipv4 is not None},
        )
        await forwarding.ensure_overlay(vpc, "vx-x", plan)


def _iperf(lab: NetLab, client: Vm, server: Vm, seconds: float) -> float:
    assert server.ipv4 is not None
    argv = ["iperf3", "-J", "-c", str(server.ipv4.ip), "-p", str(IPERF_PORT), "-t", str(seconds)]
    completed = lab.run(client.netns, *argv, "-O", "1", check=False, timeout=seconds + 30)
    try:
        return throughput_gbps(json.loads(completed.stdout))
    except (ValueError, KeyError) as error:
        raise BenchFailed(f"iperf3 said: {completed.stdout[-500:]} {completed.stderr}") from error


def offloads(lab: NetLab, netns: str, link: str) -> dict[str, str]:
    """The segmentation and receive offloads of a link, as ethtool shows them."""
    try:
        completed = lab.run(netns, "ethtool", "-k", link, check=False)
    except ToolMissing:
        return {"ethtool": "not installed"}
    wanted = (
        "tcp-segmentation-offload",
        "generic-segmentation-offload",
        "generic-receive-offload",
        "tx-udp_tnl-segmentation",
    )
    found = {}
    for line in completed.stdout.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in wanted:
            found[key.strip()] = value.strip().split()[0]
    return found


def measure_overlay(seconds: float = 4, rounds: int = 4) -> dict[str, Any]:
    """Median iperf3 TCP throughput across hosts and on one host, and their ratio.

    Raises:
        BenchFailed: iperf3 failed or the topology does not carry traffic.
    """
    with NetLab() as lab:
        vpcs = asyncio.run(_make_hosts(lab))
        server = _vm(lab, "srvb", vpcs["b"], 1)
        local = _vm(lab, "clib", vpcs["b"], 2)
        remote = _vm(lab, "clia", vpcs["a"], 3)
        asyncio.run(_program(vpcs, {"srvb": server, "clib": local, "clia": remote}))
        assert server.ipv4 is not None
        if not lab.ping(remote.netns, str(server.ipv4.ip), count=2, wait=2):
            raise BenchFailed("the port on host A cannot reach the port on host B")
        lab.popen(
            server.netns, "iperf3", "-s", "-B", str(server.ipv4.ip), "-p", str(IPERF_PORT),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        listening = ["ss", "-Htln", f"sport = :{IPERF_PORT}"]
        eventually(lambda: bool(lab.run(server.netns, *listening).stdout.strip()), timeout=10)
        figures: dict[str, list[float]] = {"same_host": [], "across_hosts": []}
        for number in range(rounds):
            order = ["same_host", "across_hosts"]
            for case in order if number % 2 == 0 else reversed(order):
                client = local if case == "same_host" else remote
                figures[case].append(_iperf(lab, client, server, seconds))
        same, across = (statistics.median(figures[c]) for c in ("same_host", "across_hosts"))
        return {
            "same_host_gbps": round(same, 3),
            "across_hosts_gbps": round(across, 3),
            "ratio": round(across / same, 3) if same else 0.0,
            "rounds": rounds,
            "mtu": MTU,
            "underlay_offloads": offloads(lab, f"{lab.prefix}-ua", "ula"),
            "loadavg_1min": os.getloadavg()[0],
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench.overlay", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--seconds", type=float, default=4, help="length of one iperf3 run")
    parser.add_argument("--rounds", type=int, default=4, help="runs of each case")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    try:
        results = measure_overlay(options.seconds, options.rounds)
    except BenchFailed as error:
        print(f"bench.overlay: {error}", file=sys.stderr)
        return 2
    met = results["ratio"] >= TARGETS["ratio"]
    if options.json:
        print(json.dumps(results | {"target_ratio": TARGETS["ratio"], "met": met}, indent=2))
    else:
        print(f"iperf3 TCP, MTU {MTU}, {results['rounds']} rounds each (medians):")
        print(f"  two ports on one host          {results['same_host_gbps']:8.2f} Gbit/s")
        print(f"  two ports on two hosts (VXLAN) {results['across_hosts_gbps']:8.2f} Gbit/s")
        verdict = "met" if met else "MISSED"
        print(f"  ratio {results['ratio']:.3f} (target >= {TARGETS['ratio']}: {verdict})")
        print(f"  underlay veth offloads: {results['underlay_offloads']}")
        print(f"  load average at the end: {results['loadavg_1min']:.2f} (2 cores)")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
