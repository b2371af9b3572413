"""Tenant networking benchmark: the three figures of docs/benchmarks.md, in one run.

    .venv/bin/python -m bench.network [--runs 7] [--seconds 5] [--json]

(a) a VM with one port, from its record written to the guest's `dhcp-bound` serial line
    (the agent makes the VPC namespace, bridge, VXLAN, tap, firewall, dnsmasq entry and
    metadata listener first), against a bare QEMU with the same command line on a
    namespace, tap and dnsmasq made by hand before the clock starts; trials alternate,
    target: median ratio <= 1.10. Every nubes trial starts from a host without the VPC
    (the previous VM and its port are deleted, so the namespace goes too).
(b) iperf3 TCP throughput between two ports across a VPC bridge with a 1,000-rule
    security group against no ruleset (bench/net_datapath.py); target ratio >= 0.9.
(c) metadata requests per second (bench/net_metadata.py); target >= 2,000.

Needs root. Everything it makes is removed however the run ends; exits 1 when a target
is missed, after printing every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.compute import BareQemus, BenchFailed, machine
from nubes.agent.compute.process import signal_process
from nubes.agent.compute.qemu_cmdline import NicPlan
from nubes.ipam import random_mac
from nubes.model.vm import Flavor
from nubes.store.keys import Kind
from nubes.tinyimage.builder import build_tiny_image, default_cache_directory
from tests.support.agent_lab import AgentLab
from tests.support.network_lab import NETWORK_SETTINGS, NetLab

DHCP_TARGET = 1.10
DATAPATH_TARGET = 0.9
METADATA_TARGET = 2000.0
BOOT_TIMEOUT = 60.0
FLAVOR = Flavor(name="bench", vcpus=1, memory_mb=96, disk_gb=0)
DHCP_LINE = "nubes-guest: dhcp-bound "


async def wait_line(path: Path, text: str, timeout: float = BOOT_TIMEOUT) -> float:
    """The moment `text` first appears in the file at `path` (polled every 5 ms)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError):
            if text in path.read_text(errors="replace"):  # noqa: ASYNC240 - a small file
                return time.monotonic()
        if time.monotonic() > deadline:
            raise BenchFailed(f"no {text!r} in {path} within {timeout} s")
        await asyncio.sleep(0.005)


class HandMadeNetwork:
    """A namespace with a tap carrying the gateway address and a dnsmasq serving one
    static lease: the network a person would make by hand for one VM."""

    def __init__(self, directory: Path) -> None:
        self.netns = "bn" + secrets.token_hex(3)
        self.tap = "tap0"
        self.mac = random_mac()
        self.directory = directory
        self.pidfile = directory / "dnsmasq.pid"

    def __enter__(self) -> HandMadeNetwork:
        try:
            for argv in (
                ["ip", "netns", "add", self.netns],
                ["ip", "-n", self.netns, "link", "set", "lo", "up"],
                ["ip", "-n", self.netns, "tuntap", "add", self.tap, "mode", "tap"],
                ["ip", "-n", self.netns, "addr", "add", "198.18.30.1/24", "dev", self.tap],
                ["ip", "-n", self.netns, "link", "set", self.tap, "up"],
            ):
                subprocess.run(argv, check=True, capture_output=True)
            subprocess.run(
                [
                    "ip", "netns", "exec", self.netns, "dnsmasq",
                    "--conf-file=/dev/null", "--port=0", "--no-hosts", "--no-resolv",
                    f"--interface={self.tap}", "--bind-interfaces",
                    "--dhcp-range=198.18.30.0,static,255.255.255.0,infinite",
                    f"--dhcp-host={self.mac},198.18.30.10,infinite",
                    "--dhcp-option=option:router,198.18.30.1",
                    "--dhcp-authoritative", "--leasefile-ro",
                    f"--pid-file={self.pidfile}",
                ],
                check=True,
                capture_output=True,
            )  # fmt: skip
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exception: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pidfile.read_text().split()[0])
            signal_process(pid, 9)
        subprocess.run(["ip", "netns", "del", self.netns], check=False, capture_output=True)


async def nubes_trial(net: NetLab, subnet: Any) -> float:
    port = await net.port(subnet)
    started = time.monotonic()
    vm_id = await net.lab.create_vm(name="bench", ports=[port.id], flavor=FLAVOR)
    serial = net.lab.agent_state / "vms" / vm_id / "serial.log"
    bound = await wait_line(serial, DHCP_LINE)
    await net.lab.delete(Kind.VM, vm_id)
    await net.lab.wait_gone(vm_id, timeout=60)
    await net.lab.db.delete(f"/nubes/{Kind.PORT.value}/{port.id}")
    await net.lab.wait_for(
        port.id, lambda v: v is None or v == "record-deleted" or v.get("state") == "down"
    )
    return bound - started


async def bare_trial(bare: BareQemus, hand: HandMadeNetwork) -> float:
    vm = bare.prepare(nics=(NicPlan(id="net0", tap=hand.tap, mac=hand.mac),), netns=hand.netns)
    assert vm.serial_log is not None
    started = time.monotonic()
    await bare.start(vm)
    bound = await wait_line(vm.serial_log, DHCP_LINE)
    await bare.stop(vm)
    return bound - started


async def measure_dhcp(runs: int) -> dict[str, Any]:
    image = build_tiny_image(default_cache_directory())
    bare = BareQemus(image, FLAVOR)
    try:
        async with AgentLab(agent_settings=NETWORK_SETTINGS, resync_interval=30.0) as lab:
            net = NetLab(lab)
            vpc = await net.network()
            subnet = await net.subnet(vpc, "198.18.31.0/24")
            ours: list[float] = []
            theirs: list[float] = []
            with HandMadeNetwork(bare.directory) as hand:
                for index in range(runs):
                    if index % 2 == 0:
                        ours.append(await nubes_trial(net, subnet))
                        theirs.append(await bare_trial(bare, hand))
                    else:
                        theirs.append(await bare_trial(bare, hand))
                        ours.append(await nubes_trial(net, subnet))
                    print(
                        f"dhcp round {index + 1}: nubes {ours[-1]:.3f} s, bare {theirs[-1]:.3f} s",
                        file=sys.stderr,
                    )
            leftovers = lab.leftovers()
    finally:
        await bare.close()
        shutil.rmtree(bare.directory, ignore_errors=True)
    ratio = statistics.median(ours) / statistics.median(theirs)
    return {
        "nubes_seconds": ours,
        "bare_seconds": theirs,
        "nubes_median": statistics.median(ours),
        "bare_median": statistics.median(theirs),
        "ratio": ratio,
        "target": DHCP_TARGET,
        "met": ratio <= DHCP_TARGET,
        "leftovers": leftovers,
    }


async def measure(options: argparse.Namespace) -> dict[str, Any]:
    from bench.net_datapath import measure_datapath
    from bench.net_metadata import measure_metadata

    results: dict[str, Any] = {"machine": machine()}
    results["dhcp"] = await measure_dhcp(options.runs)
    datapath = await asyncio.to_thread(measure_datapath, options.seconds)
    results["datapath"] = datapath
    metadata = await asyncio.to_thread(measure_metadata, options.seconds)
    results["metadata"] = metadata
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    results = asyncio.run(measure(options))
    dhcp = results["dhcp"]
    datapath = results["datapath"]
    metadata = results["metadata"]
    if options.json:
        print(json.dumps(results, indent=2, default=str))
    print(
        f"(a) spec -> dhcp-bound: nubes median {dhcp['nubes_median']:.3f} s, bare "
        f"{dhcp['bare_median']:.3f} s, ratio {dhcp['ratio']:.3f} (limit {DHCP_TARGET})"
    )
    print(
        f"(b) iperf3 across the bridge, 1,000-rule group vs none: ratio "
        f"{datapath['ratio']:.3f} (limit >= {DATAPATH_TARGET})"
    )
    print(
        f"(c) metadata: {metadata['loopback_requests_per_second']:.0f} requests/s "
        f"(limit >= {METADATA_TARGET:.0f})"
    )
    met = (
        dhcp["met"]
        and not dhcp["leftovers"]
        and datapath["ratio"] >= DATAPATH_TARGET
        and metadata["loopback_requests_per_second"] >= METADATA_TARGET
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
