"""Scheduler benchmark: VM records → all bound by two scheduler daemons, per engine.

    .venv/bin/python -m bench.scheduler [--engine sqlite|etcd|etcd3|all] [--hosts 1000]
                                        [--vms 10000] [--json]

Host records and alive keys are written first (varied sizes, a few labelled), then two
scheduler daemons start in their own processes. The clock starts before the first VM
record is written (records as the API writes them: `spec.host` None, 100 per
transaction, so the write side is no bottleneck) and stops when this process's watch
has seen every VM bound. The store is then checked: every VM bound exactly once, the
allocations match the records, no host over capacity (with overcommit), labels and
anti-affinity respected. A trickle of single VMs then measures one VM's time to bound.
`etcd` is one member; `etcd3` a three-member cluster on loopback, every client given
all three endpoints (each write then waits for a majority of members).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nubes.config import SchedulerConfig
from nubes.ids import IdKind, new_id
from nubes.model.common import now
from nubes.model.host import HostCapacity, HostRecord
from nubes.model.vm import Flavor, VmRecord, VmSpec
from nubes.scheduler.daemon import SchedulerDaemon
from nubes.store import Put, Store
from nubes.store.etcd import EtcdStore
from nubes.store.keys import Kind, host_alive_key, kind_prefix, resource_key
from nubes.store.listing import range_all
from nubes.store.sqlite import SqliteStore
from tests.support.etcd import EtcdCluster, running_etcd

REPO = Path(__file__).resolve().parents[1]
WRITE_BATCH = 100
TRICKLE = 50
SCHEDULERS = 2
HOST_SIZES = [
    HostCapacity(vcpus=8, memory_mb=32 * 1024, disk_gb=500),
    HostCapacity(vcpus=16, memory_mb=64 * 1024, disk_gb=1000),
    HostCapacity(vcpus=32, memory_mb=128 * 1024, disk_gb=2000),
    HostCapacity(vcpus=64, memory_mb=256 * 1024, disk_gb=4000),
]
FLAVORS = [
    Flavor(name="small", vcpus=1, memory_mb=1024, disk_gb=10),
    Flavor(name="medium", vcpus=2, memory_mb=4096, disk_gb=20),
    Flavor(name="large", vcpus=4, memory_mb=8192, disk_gb=40),
]
LABEL = {"gpu": "yes"}
TARGETS = {"sqlite": 1_000.0, "etcd": 300.0, "etcd3": 300.0}


def host_documents(count: int) -> list[tuple[str, Any]]:
    """Host records and alive keys: sizes cycle, every 50th host is labelled gpu=yes."""
    writes: list[tuple[str, Any]] = []
    for index in range(count):
        name = f"host-{index:05d}"
        record = HostRecord(
            name=name,
            capacity=HOST_SIZES[index % len(HOST_SIZES)],
            accel="kvm",
            labels=LABEL if index % 50 == 0 else {},
            agent_version="bench",
            boot_id="bench",
            started_at=now(),
        )
        writes.append((resource_key(Kind.HOST, name), record.to_json()))
        writes.append((host_alive_key(name), {"since": "bench"}))
    return writes


def vm_documents(count: int, rng: random.Random) -> list[tuple[str, Any]]:
    """VM records as the API writes them: 1 in 100 asks for gpu=yes, 1 in 20 is in one
    of 200 anti-affinity groups, flavors drawn at random."""
    writes = []
    for index in range(count):
        vm_id = new_id(IdKind.VM)
        spec = VmSpec(
            name=f"vm-{index}",
            flavor=rng.choice(FLAVORS),
            image="img-aaaaaaaaaa",
            host_labels=LABEL if index % 100 == 7 else {},
            anti_affinity_group=f"group-{index % 200}" if index % 20 == 3 else None,
        )
        record = VmRecord(id=vm_id, spec=spec, created_at=now())
        writes.append((resource_key(Kind.VM, vm_id), record.to_json()))
    return writes


async def write_all(store: Store, writes: list[tuple[str, Any]]) -> list[float]:
    """Writes in transactions of WRITE_BATCH; returns when each key was written."""
    stamps = []
    for start in range(0, len(writes), WRITE_BATCH):
        chunk = writes[start : start + WRITE_BATCH]
        await store.txn([], [Put(key, value) for key, value in chunk])
        stamps += [time.perf_counter()] * len(chunk)
    return stamps


@dataclass
class Check:
    """What the store holds after the run, against the rules."""

    problems: list[str] = field(default_factory=list)
    bound: int = 0
    hosts_used: int = 0
    fullest_vcpu_share: float = 0.0
    fullest_memory_share: float = 0.0


def verify(kvs: dict[str, Any], overcommit: SchedulerConfig) -> Check:
    """Checks VM records against host allocations: each VM bound once and recorded on its
    host only, with its flavor's size; no host over capacity; labels and anti-affinity."""
    check = Check()
    hosts: dict[str, HostRecord] = {}
    allocations: dict[str, dict[str, Any]] = {}
    vms: dict[str, VmRecord] = {}
    for key, value in kvs.items():
        parts = key.split("/")
        if parts[2] == "hosts" and len(parts) == 4:
            hosts[parts[3]] = HostRecord.from_json(value)
        elif parts[2] == "hosts" and parts[4:] == ["allocations"]:
            allocations[parts[3]] = value["vms"]
        elif parts[2] == "vms" and len(parts) == 4:
            vms[parts[3]] = VmRecord.from_json(value)
    recorded: Counter[str] = Counter()
    for host, entries in allocations.items():
        recorded.update(entries.keys())
        record = hosts.get(host)
        if record is None:
            check.problems.append(f"allocations on unknown host {host}")
            continue
        capacity = record.capacity
        vcpus = sum(e["vcpus"] for e in entries.values())
        memory = sum(e["memory_mb"] for e in entries.values())
        disk = sum(e["disk_gb"] for e in entries.values())
        if vcpus > capacity.vcpus * overcommit.cpu_overcommit:
            check.problems.append(f"{host}: {vcpus} vCPUs bound, over capacity")
        if memory > capacity.memory_mb * overcommit.memory_overcommit:
            check.problems.append(f"{host}: {memory} MiB bound, over capacity")
        if disk > capacity.disk_gb * overcommit.disk_overcommit:
            check.problems.append(f"{host}: {disk} GB bound, over capacity")
        groups = Counter(e["anti_affinity_group"] for e in entries.values())
        groups.pop(None, None)
        check.problems += [f"{host}: {n} VMs of group {g}" for g, n in groups.items() if n > 1]
        if entries:
            check.hosts_used += 1
            check.fullest_vcpu_share = max(
                check.fullest_vcpu_share, vcpus / (capacity.vcpus * overcommit.cpu_overcommit)
            )
            check.fullest_memory_share = max(
                check.fullest_memory_share,
                memory / (capacity.memory_mb * overcommit.memory_overcommit),
            )
    check.problems += [f"{vm} recorded on {n} hosts" for vm, n in recorded.items() if n > 1]
    check.problems += [f"{vm} recorded but has no record" for vm in recorded if vm not in vms]
    for vm_id, vm in vms.items():
        bound_to = vm.spec.host
        if bound_to is None:
            check.problems.append(f"{vm_id} is not bound")
            continue
        check.bound += 1
        entry = allocations.get(bound_to, {}).get(vm_id)
        flavor = vm.spec.flavor
        if entry is None:
            check.problems.append(f"{vm_id} bound to {bound_to} but not in its allocations")
        elif (entry["vcpus"], entry["memory_mb"], entry["disk_gb"]) != (
            flavor.vcpus,
            flavor.memory_mb,
            flavor.disk_gb,
        ):
            check.problems.append(f"{vm_id}: allocation differs from its flavor")
        labels = hosts[bound_to].labels if bound_to in hosts else {}
        if any(labels.get(k) != v for k, v in vm.spec.host_labels.items()):
            check.problems.append(f"{vm_id} on {bound_to}, which lacks its labels")
    return check


# -- one scheduler process ------------------------------------------------------


async def run_worker(engine: str, target: str) -> None:
    """A scheduler daemon until SIGTERM; prints `ready`, then its counts as JSON."""
    import signal

    store: Store
    if engine == "sqlite":
        store = await SqliteStore.open(Path(target))
    else:
        store = await EtcdStore.connect(target.split(","))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    daemon = SchedulerDaemon(store, SchedulerConfig(resync_interval=600))
    running = asyncio.create_task(daemon.run(stop))
    await daemon.ready.wait()
    print("ready", flush=True)
    await running
    await store.close()
    print(json.dumps({"bound": daemon.bound, "lost_races": daemon.lost_races}), flush=True)


# -- one engine -----------------------------------------------------------------


async def measure(
    open_store: Callable[[], Awaitable[Store]], worker: list[str], hosts: int, count: int
) -> dict[str, Any]:
    rng = random.Random(6)
    store = await open_store()
    workers: list[asyncio.subprocess.Process] = []
    try:
        await write_all(store, host_documents(hosts))
        for _ in range(SCHEDULERS):
            process = await asyncio.create_subprocess_exec(
                *worker, cwd=REPO, stdout=asyncio.subprocess.PIPE
            )
            workers.append(process)
        for process in workers:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            assert line.strip() == b"ready", line
        documents = vm_documents(count, rng)
        figures = await bind_all(store, documents)
        figures.update(await trickle(store, rng))
        for process in workers:
            process.terminate()
        counts = []
        for process in workers:
            assert process.stdout is not None
            output, _ = await asyncio.wait_for(process.communicate(), 60)
            counts.append(json.loads(output.decode().strip().splitlines()[-1]))
        figures["bound_per_scheduler"] = [c["bound"] for c in counts]
        figures["lost_races_per_scheduler"] = [c["lost_races"] for c in counts]
        listed = await range_all(store, "/nubes/")
        check = verify({kv.key: kv.value for kv in listed.kvs}, SchedulerConfig())
        figures["problems"] = check.problems[:20]
        figures["problem_count"] = len(check.problems)
        figures["vms_bound"] = check.bound
        figures["hosts_used"] = check.hosts_used
        figures["fullest_vcpu_share"] = check.fullest_vcpu_share
        figures["fullest_memory_share"] = check.fullest_memory_share
        figures["hosts"] = hosts
        figures["vms"] = count
    finally:
        for process in workers:
            if process.returncode is None:
                process.kill()
                await process.wait()
        await store.close()
    return figures


async def bind_all(store: Store, documents: list[tuple[str, Any]]) -> dict[str, Any]:
    wanted = {key for key, _ in documents}
    seen: dict[str, float] = {}
    revision = await store.current_revision()

    async def watch() -> None:
        async with store.watch(kind_prefix(Kind.VM), from_revision=revision + 1) as events:
            async for event in events:
                if event.key in wanted and event.value and event.value["spec"]["host"]:
                    seen.setdefault(event.key, time.perf_counter())
                    if len(seen) == len(wanted):
                        return

    watcher = asyncio.create_task(watch())
    started = time.perf_counter()
    stamps = await write_all(store, documents)
    written = time.perf_counter()
    await asyncio.wait_for(watcher, 600)
    finished = time.perf_counter()
    latencies = sorted(
        (seen[key] - stamp) * 1000 for (key, _), stamp in zip(documents, stamps, strict=True)
    )
    return {
        "write_s": written - started,
        "all_bound_s": finished - started,
        "placements_per_s": len(documents) / (finished - started),
        "bound_after_write_p50_ms": statistics.median(latencies),
        "bound_after_write_p99_ms": latencies[int(len(latencies) * 0.99) - 1],
    }


async def trickle(store: Store, rng: random.Random) -> dict[str, Any]:
    """One VM at a time on the loaded cluster: record written → seen bound."""
    timings = []
    async with store.watch(kind_prefix(Kind.VM)) as events:
        iterator = aiter(events)
        for key, value in vm_documents(TRICKLE, rng):
            started = time.perf_counter()
            await store.put(key, value)
            while True:
                event = await asyncio.wait_for(anext(iterator), 10)
                if event.key == key and event.value and event.value["spec"]["host"]:
                    break
            timings.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.01)
    timings.sort()
    return {
        "single_vm_p50_ms": statistics.median(timings),
        "single_vm_max_ms": timings[-1],
    }


def report(results: dict[str, dict[str, Any]]) -> None:
    rows = [
        ("hosts", "hosts", "{:,}"),
        ("VM records", "vms", "{:,}"),
        ("writing the records (s)", "write_s", "{:.2f}"),
        ("first write → all bound (s)", "all_bound_s", "{:.2f}"),
        ("placements/s", "placements_per_s", "{:,.0f}"),
        ("record written → bound, p50 (ms)", "bound_after_write_p50_ms", "{:,.0f}"),
        ("record written → bound, p99 (ms)", "bound_after_write_p99_ms", "{:,.0f}"),
        ("one VM alone → bound, p50 (ms)", "single_vm_p50_ms", "{:.1f}"),
        ("one VM alone → bound, max (ms)", "single_vm_max_ms", "{:.1f}"),
        ("VMs bound by each scheduler", "bound_per_scheduler", "{}"),
        ("batches that lost a race", "lost_races_per_scheduler", "{}"),
        ("VMs bound (checked)", "vms_bound", "{:,}"),
        ("hosts used", "hosts_used", "{:,}"),
        ("fullest host, vCPU share", "fullest_vcpu_share", "{:.2f}"),
        ("fullest host, memory share", "fullest_memory_share", "{:.2f}"),
        ("problems found", "problem_count", "{}"),
    ]
    engines = list(results)
    print("| figure | " + " | ".join(engines) + " |")
    print("|---|" + "---:|" * len(engines))
    for label, name, shape in rows:
        cells = [shape.format(results[engine][name]) for engine in engines]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for engine in engines:
        figures = results[engine]
        rate, target = figures["placements_per_s"], TARGETS[engine]
        verdict = "met" if rate >= target and figures["problem_count"] == 0 else "MISSED"
        print(f"{engine}: {rate:,.0f} placements/s, target {target:,.0f}: {verdict}")
        for problem in figures["problems"]:
            print(f"  {problem}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--engine", choices=["sqlite", "etcd", "etcd3", "all"], default="all")
    parser.add_argument("--hosts", type=int, default=1_000)
    parser.add_argument("--vms", type=int, default=10_000)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "TARGET"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        await run_worker(*arguments.worker)
        return
    results: dict[str, dict[str, Any]] = {}
    worker = [sys.executable, "-m", "bench.scheduler", "--worker"]
    with tempfile.TemporaryDirectory(prefix="nubes-bench-") as workdir:
        if arguments.engine in ("sqlite", "all"):
            path = Path(workdir) / "nubes.db"
            results["sqlite"] = await measure(
                lambda: SqliteStore.open(path),
                [*worker, "sqlite", str(path)],
                arguments.hosts,
                arguments.vms,
            )
        if arguments.engine in ("etcd", "all"):
            with running_etcd(Path(workdir) / "etcd") as server:
                results["etcd"] = await measure(
                    lambda: EtcdStore.connect([server.endpoint]),
                    [*worker, "etcd", server.endpoint],
                    arguments.hosts,
                    arguments.vms,
                )
        if arguments.engine in ("etcd3", "all"):
            with EtcdCluster(Path(workdir) / "etcd3") as cluster:
                endpoints = cluster.endpoints
                results["etcd3"] = await measure(
                    lambda: EtcdStore.connect(endpoints),
                    [*worker, "etcd3", ",".join(endpoints)],
                    arguments.hosts,
                    arguments.vms,
                )
    if arguments.json:
        print(json.dumps(results, indent=2))
    else:
        report(results)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    asyncio.run(main())
