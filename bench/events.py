"""Event recorder benchmark: does the event log keep up with a burst of VM changes?

    .venv/bin/python -m bench.events [--engine sqlite|etcd|all] [--vms 5000] [--json]

An event recorder runs in its own process (as it does in `nubes scheduler`). This
process then writes a burst as the API and the agents would: every VM record, 100 per
transaction, then every VM's `running` status, 100 per transaction, as fast as the store
takes them. The clock starts at the first write; the burst's own duration is the
baseline. The recorder is done when its cursor (written with its events) reaches the
burst's last revision. Figures: the burst, the recorder's finish, its lag after the
burst, and the ratio finish / burst (1.0 = the log keeps pace with the writers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nubes.config import EventsConfig
from nubes.events.recorder import EventRecorder
from nubes.ids import IdKind, new_id
from nubes.model.common import now
from nubes.model.vm import Flavor, VmRecord, VmSpec, VmState, VmStatus
from nubes.store import Put, Store
from nubes.store.etcd import EtcdStore
from nubes.store.keys import EVENT_CURSOR_KEY, Kind, resource_key, status_key
from nubes.store.sqlite import SqliteStore
from tests.support.etcd import running_etcd

WRITE_BATCH = 100
FLAVOR = Flavor(name="small", vcpus=1, memory_mb=1024, disk_gb=10)
DONE_TIMEOUT = 600.0


def burst(count: int) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """The VM records, then their `running` statuses on one host."""
    records, statuses = [], []
    for index in range(count):
        vm = new_id(IdKind.VM)
        spec = VmSpec(name=f"vm-{index:05d}", host="host-1", flavor=FLAVOR, image=None)
        record = VmRecord(id=vm, project="bench", spec=spec, created_at=now())
        records.append((resource_key(Kind.VM, vm), record.to_json()))
        status = VmStatus(state=VmState.RUNNING, host="host-1", pid=1000 + index, updated_at=now())
        statuses.append((status_key(Kind.VM, vm), status.to_json()))
    return records, statuses


async def write(store: Store, writes: list[tuple[str, Any]]) -> int:
    revision = 0
    for start in range(0, len(writes), WRITE_BATCH):
        chunk = writes[start : start + WRITE_BATCH]
        result = await store.txn([], [Put(key, value) for key, value in chunk])
        revision = result.revision
    return revision


async def recorder_worker(engine: str, target: str) -> None:
    """The recorder, alone in this process until SIGTERM."""
    store = await open_store(engine, target)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    recorder = EventRecorder(store, EventsConfig())
    try:
        await recorder.run(stop)
    finally:
        await store.close()


async def open_store(engine: str, target: str) -> Store:
    if engine == "sqlite":
        return await SqliteStore.open(Path(target))
    return await EtcdStore.connect(target.split(","))


def start_worker(worker: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(worker)


async def measure(opener: Callable[[], Awaitable[Store]], worker: list[str], vms: int) -> Any:
    store = await opener()
    process = start_worker(worker)
    try:
        await asyncio.sleep(2.0)  # the recorder lists the (empty) store and starts watching
        if process.poll() is not None:
            raise SystemExit(f"the recorder process ended early ({process.returncode})")
        records, statuses = burst(vms)
        started = time.perf_counter()
        await write(store, records)
        last = await write(store, statuses)
        burst_done = time.perf_counter() - started
        deadline = time.monotonic() + DONE_TIMEOUT
        while True:
            cursor = await store.get(EVENT_CURSOR_KEY)
            if cursor is not None and isinstance(cursor.value, int) and cursor.value >= last:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the recorder did not reach revision {last} in time")
            await asyncio.sleep(0.01)
        recorded = time.perf_counter() - started
        return {
            "vms": vms,
            "changes": 2 * vms,
            "burst_s": round(burst_done, 3),
            "recorded_s": round(recorded, 3),
            "lag_s": round(recorded - burst_done, 3),
            "ratio": round(recorded / burst_done, 2),
            "changes_per_s": round(2 * vms / recorded),
        }
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        await store.close()


def report(results: dict[str, Any]) -> None:
    print(
        f"(e) event recorder keeping up with a burst; {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )
    print("| engine | VM changes | burst (s) | recorded (s) | lag (s) | ratio | changes/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for engine, figures in results.items():
        print(
            f"| {engine} | {figures['changes']} | {figures['burst_s']} | "
            f"{figures['recorded_s']} | {figures['lag_s']} | {figures['ratio']} | "
            f"{figures['changes_per_s']} |"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--engine", choices=["sqlite", "etcd", "all"], default="all")
    parser.add_argument("--vms", type=int, default=5_000)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "TARGET"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        await recorder_worker(*arguments.worker)
        return
    results: dict[str, Any] = {}
    worker = [sys.executable, "-m", "bench.events", "--worker"]
    with tempfile.TemporaryDirectory(prefix="nubes-bench-") as workdir:
        if arguments.engine in ("sqlite", "all"):
            path = Path(workdir) / "nubes.db"
            results["sqlite"] = await measure(
                lambda: SqliteStore.open(path), [*worker, "sqlite", str(path)], arguments.vms
            )
        if arguments.engine in ("etcd", "all"):
            with running_etcd(Path(workdir) / "etcd") as server:
                results["etcd"] = await measure(
                    lambda: EtcdStore.connect([server.endpoint]),
                    [*worker, "etcd", server.endpoint],
                    arguments.vms,
                )
    if arguments.json:
        print(json.dumps(results, indent=2))
    else:
        report(results)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
