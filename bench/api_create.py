"""API create call -> VM running, against bare QEMU start -> running, in one run.

    .venv/bin/python -m bench.api_create [--runs 7] [--network]

(a) The deployment of a split node: `nubes api` and `nubes scheduler` as processes and
    the agent of an AgentLab, on one SQLite store. Each nubes trial times
    `POST /v1/vms` (real HTTP, a token) until the VM's status `running` reaches the
    store (watched from this process); the API writes the record, the scheduler binds
    it, the agent starts QEMU. Each bare trial times a `qemu-system-x86_64 -daemonize`
    with the agent's command line until it answers QMP `query-status` (bench.compute).
    Trials alternate; VMs are deleted between trials. With `--network` the VM gets a
    port on a VPC subnet (namespace, bridge, tap, nftables, dnsmasq are made for it).

Needs root (QEMU, cgroups, namespaces). Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.compute import BareQemus, StatusClock, bare_start, host_busy, machine
from nubes.api.auth import mint_token
from nubes.api.bootstrap import DEFAULT_PROJECT, ensure_project, ensure_user
from nubes.model.common import now
from nubes.model.project import FlavorRecord, Role
from nubes.model.vm import Flavor
from nubes.store.keys import Kind, resource_key
from nubes.tinyimage.builder import build_tiny_image, default_cache_directory
from tests.support.agent_lab import AgentLab

TARGET_MEDIAN = 0.25
TARGET_RATIO = 2.0
MEMORY_MB = 96  # the tiny guest's kernel resets in a loop below 80 MiB
START_TIMEOUT = 60.0


class BenchFailed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_daemon(lab: AgentLab, verb: str, port: int) -> subprocess.Popen[bytes]:
    environment = {**os.environ, "NUBES_CONFIG": str(lab.config_path), "NUBES_API__PORT": str(port)}
    log = (lab.directory / f"{verb}.log").open("wb")
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("nubes")), verb, "--log-level", "warning"],
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def stop_daemon(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


async def wait_health(url: str, process: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=2) as client:
        for _ in range(300):
            if process.poll() is not None:
                raise BenchFailed(f"the API exited with {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get("/v1/health")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise BenchFailed("the API did not answer /v1/health within 30 s")


async def prepare(lab: AgentLab, client: httpx.AsyncClient, network: bool) -> dict[str, Any]:
    """The flavor and, with `network`, a VPC and subnet; the VM create body's fixed part."""
    flavor = FlavorRecord(name="bench", vcpus=1, memory_mb=MEMORY_MB, disk_gb=0, created_at=now())
    await lab.db.put(resource_key(Kind.FLAVOR, "bench"), flavor.to_json())
    assert lab.image is not None
    body: dict[str, Any] = {"flavor": "bench", "image": lab.image.id}
    if network:
        made = await client.post("/v1/networks", json={"name": "bench"})
        made.raise_for_status()
        subnet = await client.post(
            "/v1/subnets", json={"name": "bench", "network": "bench", "cidr": "198.18.40.0/24"}
        )
        subnet.raise_for_status()
        body["networks"] = [{"network": "bench"}]
    return body


async def nubes_trial(
    client: httpx.AsyncClient, clock: StatusClock, lab: AgentLab, body: dict[str, Any], index: int
) -> float:
    started = time.monotonic()
    response = await client.post("/v1/vms", json={**body, "name": f"bench-{index}"})
    if response.status_code != 201:
        raise BenchFailed(f"create answered {response.status_code}: {response.text}")
    vm_id = response.json()["id"]
    moment, _ = await clock.arrival(vm_id, "running", timeout=START_TIMEOUT)
    seconds = moment - started
    deleted = await client.delete(f"/v1/vms/{vm_id}")
    if deleted.status_code not in (202, 204):
        raise BenchFailed(f"delete answered {deleted.status_code}: {deleted.text}")
    await lab.wait_gone(vm_id, timeout=60)
    return seconds


async def measure(options: argparse.Namespace) -> dict[str, Any]:
    image = build_tiny_image(default_cache_directory())
    flavor = Flavor(name="bench", vcpus=1, memory_mb=MEMORY_MB, disk_gb=0)
    results: dict[str, Any] = {"machine": machine(), "busy_before": host_busy()}
    bare = BareQemus(image, flavor)
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        async with AgentLab() as lab, StatusClock(lab) as clock:
            await ensure_project(lab.db, DEFAULT_PROJECT)
            await ensure_user(
                lab.db, "bench", "bench-password", role=Role.ADMIN, projects=[DEFAULT_PROJECT]
            )
            token, _ = await mint_token(lab.db, "bench", DEFAULT_PROJECT)
            port = free_port()
            daemons.append(start_daemon(lab, "api", port))
            daemons.append(start_daemon(lab, "scheduler", port))
            url = f"http://127.0.0.1:{port}"
            await wait_health(url, daemons[0])
            headers = {"Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
                body = await prepare(lab, client, options.network)
                # Warm-up, not counted: image cache, page cache, lazy imports, first VPC.
                await nubes_trial(client, clock, lab, body, 0)
                await bare_start(bare, 1)
                ours: list[float] = []
                theirs: list[float] = []
                for index in range(1, options.runs + 1):
                    if index % 2:
                        ours.append(await nubes_trial(client, clock, lab, body, index))
                        theirs.append((await bare_start(bare, 1)).seconds)
                    else:
                        theirs.append((await bare_start(bare, 1)).seconds)
                        ours.append(await nubes_trial(client, clock, lab, body, index))
                    print(
                        f"round {index}: nubes {ours[-1]:.3f} s, bare {theirs[-1]:.3f} s",
                        file=sys.stderr,
                    )
            results["nubes"] = ours
            results["bare"] = theirs
    finally:
        for process in daemons:
            stop_daemon(process)
        await bare.close()
    return results


def report(results: dict[str, Any], network: bool) -> bool:
    ours, theirs = results["nubes"], results["bare"]
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    median, ratio = statistics.median(ours), statistics.median(ratios)
    info = results["machine"]
    print(
        f"(a) API create -> running{' with a VPC port' if network else ''}: q35, TCG, 1 vCPU, "
        f"{MEMORY_MB} MiB; {info['cpus']} CPUs, QEMU {info['qemu']}, {info['date']}; "
        f"CPUs {results['busy_before']:.0%} busy before the run"
    )
    print("| figure | median | min | max | target |")
    print("|---|---:|---:|---:|---|")
    rows = [
        ("nubes: POST /v1/vms -> status running (s)", ours, f"<= {TARGET_MEDIAN}"),
        ("bare: spawn -> query-status answered (s)", theirs, ""),
        (
            "ratio nubes / bare, per pair",
            ratios,
            "(bare has no network)" if network else f"<= {TARGET_RATIO}",
        ),
    ]
    for label, values, target in rows:
        print(
            f"| {label} | {statistics.median(values):.3f} | {min(values):.3f} "
            f"| {max(values):.3f} | {target} |"
        )
    # With --network nubes also builds a VPC (namespace, bridge, VXLAN, nftables,
    # dnsmasq) that the bare side does not have: only the median target applies.
    met = median <= TARGET_MEDIAN and (network or ratio <= TARGET_RATIO)
    print(f"(a) median {median:.3f} s, ratio {ratio:.2f}: {'met' if met else 'MISSED'}")
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.api_create", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--network", action="store_true", help="give each VM a VPC port")
    options = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (QEMU, cgroups, namespaces)")
    try:
        results = asyncio.run(measure(options))
    except BenchFailed as error:
        print(f"bench.api_create: {error}", file=sys.stderr)
        return 2
    return 0 if report(results, options.network) else 1


if __name__ == "__main__":
    sys.exit(main())
