"""Store benchmark: CAS writes/s, range of 10,000 keys and watch latency, per engine.

    .venv/bin/python -m bench.store [--engine sqlite|etcd|all] [--json]

Each engine is also measured without nubes in the same run (raw sqlite3
statements; raw gRPC calls on aetcd's stubs), so the ratio shows what the
nubes layer costs on this machine, whatever its speed today. The watch
latency is measured across processes: a writer process stamps each value
with the wall clock, this process watches and subtracts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nubes.store import Compare, Put, Store
from nubes.store.etcd import EtcdStore
from nubes.store.sqlite import SqliteStore
from tests.support.etcd import running_etcd

CAS_WRITES = 6_000
ROUNDS = 3
RANGE_KEYS = 10_000
WATCH_WRITES = 300
WATCH_INTERVAL = 0.01
REPO = Path(__file__).resolve().parents[1]


async def cas_rate(store: Store, writers: int, total: int) -> float:
    """CAS writes per second: each writer swaps its own key, guarded by the last revision."""
    run = f"/bench/cas-{time.monotonic_ns()}/"

    async def writer(number: int) -> None:
        key, revision = f"{run}{number}", 0
        for index in range(total // writers):
            result = await store.txn([Compare.mod_revision(key, "==", revision)], [Put(key, index)])
            assert result.succeeded
            revision = result.revision

    started = time.perf_counter()
    await asyncio.gather(*(writer(number) for number in range(writers)))
    return total / (time.perf_counter() - started)


async def range_milliseconds(store: Store) -> float:
    prefix = f"/bench/range-{time.monotonic_ns()}/"
    for start in range(0, RANGE_KEYS, 100):
        await store.txn(
            [],
            [Put(f"{prefix}{index:05d}", {"index": index}) for index in range(start, start + 100)],
        )
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        result = await store.range(prefix)
        timings.append((time.perf_counter() - started) * 1000)
        assert len(result.kvs) == RANGE_KEYS
    return statistics.median(timings)


async def watch_latency(store: Store, writer_command: list[str]) -> tuple[float, float]:
    """p50 and p99 milliseconds from a write in another process to its arrival here."""
    prefix = "/bench/watch/"
    latencies: list[float] = []
    async with store.watch(prefix) as events:
        writer = await asyncio.create_subprocess_exec(*writer_command, cwd=REPO)
        try:
            async for event in events:
                latencies.append((time.time() - event.value["t"]) * 1000)
                if len(latencies) == WATCH_WRITES:
                    break
        finally:
            await asyncio.wait_for(writer.wait(), 60)
    latencies.sort()
    return statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1]


async def timed_writes(store: Store) -> None:
    """The writer side of the latency benchmark (run in its own process)."""
    await asyncio.sleep(0.3)  # let the watcher settle
    for index in range(WATCH_WRITES):
        await store.put(f"/bench/watch/{index % 10}", {"t": time.time(), "index": index})
        await asyncio.sleep(WATCH_INTERVAL)


# -- baselines: the same work without nubes -------------------------------------


def raw_sqlite_cas_rate(path: Path, total: int) -> float:
    """Conditional updates with plain sqlite3 in WAL mode: the floor under the SQLite engine."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.execute("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v BLOB, rev INTEGER)")
    connection.execute("INSERT OR REPLACE INTO t VALUES ('k', x'00', 0)")
    started = time.perf_counter()
    for revision in range(total):
        connection.execute("BEGIN IMMEDIATE")
        updated = connection.execute(
            "UPDATE t SET v = ?, rev = ? WHERE k = 'k' AND rev = ?",
            (json.dumps(revision).encode(), revision + 1, revision),
        ).rowcount
        assert updated == 1
        connection.execute("COMMIT")
    rate = total / (time.perf_counter() - started)
    connection.close()
    return rate


async def raw_etcd_cas_rate(endpoint: str, writers: int, total: int) -> float:
    """Txn calls straight on the gRPC stubs: the floor under the etcd engine."""
    import grpc
    from aetcd import rpc

    async with grpc.aio.insecure_channel(endpoint) as channel:
        kv = rpc.KVStub(channel)
        run = f"/bench/raw-{time.monotonic_ns()}/"

        async def writer(number: int) -> None:
            key, revision = f"{run}{number}".encode(), 0
            for index in range(total // writers):
                request = rpc.TxnRequest(
                    compare=[
                        rpc.Compare(
                            key=key,
                            target=rpc.Compare.MOD,
                            result=rpc.Compare.EQUAL,
                            mod_revision=revision,
                        )
                    ],
                    success=[
                        rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=b"%d" % index))
                    ],
                )
                response = await kv.Txn(request)
                assert response.succeeded
                revision = response.header.revision

        started = time.perf_counter()
        await asyncio.gather(*(writer(number) for number in range(writers)))
        return total / (time.perf_counter() - started)


# -- per engine ---------------------------------------------------------------


async def measure(
    open_store: Callable[[], Awaitable[Store]],
    writer_command: list[str],
    baseline: Callable[[int], Awaitable[float]],
) -> dict[str, Any]:
    store = await open_store()
    figures: dict[str, Any] = {}
    try:
        for writers, name in [(1, "1_writer"), (16, "16_writers")]:
            # Baseline and nubes rounds alternate, so drift in the engine (a growing
            # database, a compaction) weighs on both alike; the median is reported.
            ours, theirs = [], []
            for _ in range(ROUNDS):
                theirs.append(await baseline(writers))
                total = CAS_WRITES // 2 if writers == 1 else CAS_WRITES
                ours.append(await cas_rate(store, writers, total))
            figures[f"cas_{name}_per_s"] = statistics.median(ours)
            figures[f"baseline_cas_{name}_per_s"] = statistics.median(theirs)
            figures[f"ratio_cas_{name}"] = statistics.median(
                mine / base for mine, base in zip(ours, theirs, strict=True)
            )
        figures["range_10k_keys_ms"] = await range_milliseconds(store)
        p50, p99 = await watch_latency(store, writer_command)
        figures["watch_latency_p50_ms"], figures["watch_latency_p99_ms"] = p50, p99
    finally:
        await store.close()
    return figures


async def bench_sqlite(workdir: Path) -> dict[str, Any]:
    path = workdir / "nubes.db"

    async def baseline(writers: int) -> float:
        # One SQLite file takes one writer at a time: 16 writers share one lock,
        # so the single-writer loop is the floor for both.
        return await asyncio.to_thread(raw_sqlite_cas_rate, workdir / "raw.db", CAS_WRITES // 2)

    return await measure(
        lambda: SqliteStore.open(path),
        [sys.executable, "-m", "bench.store", "--writer", "sqlite", str(path)],
        baseline,
    )


async def bench_etcd(workdir: Path) -> dict[str, Any]:
    with running_etcd(workdir) as server:

        async def baseline(writers: int) -> float:
            total = CAS_WRITES // 2 if writers == 1 else CAS_WRITES
            return await raw_etcd_cas_rate(server.endpoint, writers, total)

        return await measure(
            lambda: EtcdStore.connect([server.endpoint]),
            [sys.executable, "-m", "bench.store", "--writer", "etcd", server.endpoint],
            baseline,
        )


async def run_writer(engine: str, target: str) -> None:
    opened: Store
    if engine == "sqlite":
        opened = await SqliteStore.open(Path(target))
    else:
        opened = await EtcdStore.connect([target])
    async with opened as store:
        await timed_writes(store)


TARGETS = {
    "sqlite": {"cas_1_writer_per_s": 5_000, "watch_latency_p50_ms": 20},
    "etcd": {"cas_16_writers_per_s": 1_000, "watch_latency_p50_ms": 20},
}


def report(results: dict[str, dict[str, Any]]) -> None:
    rows = [
        ("CAS writes/s, 1 writer", "cas_1_writer_per_s", "{:,.0f}"),
        ("CAS writes/s, 16 writers", "cas_16_writers_per_s", "{:,.0f}"),
        ("baseline CAS/s, 1 writer", "baseline_cas_1_writer_per_s", "{:,.0f}"),
        ("baseline CAS/s, 16 writers", "baseline_cas_16_writers_per_s", "{:,.0f}"),
        ("ratio to baseline, 1 writer", "ratio_cas_1_writer", "{:.2f}"),
        ("ratio to baseline, 16 writers", "ratio_cas_16_writers", "{:.2f}"),
        ("range of 10,000 keys (ms)", "range_10k_keys_ms", "{:.1f}"),
        ("watch latency p50 (ms)", "watch_latency_p50_ms", "{:.2f}"),
        ("watch latency p99 (ms)", "watch_latency_p99_ms", "{:.2f}"),
    ]
    engines = list(results)
    print("| figure | " + " | ".join(engines) + " |")
    print("|---|" + "---:|" * len(engines))
    for label, name, shape in rows:
        cells = [shape.format(results[engine][name]) for engine in engines]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for engine in engines:
        for name, target in TARGETS[engine].items():
            value = results[engine][name]
            met = value <= target if name.endswith("_ms") else value >= target
            print(
                f"{engine}: {name} = {value:,.2f}, target {target:,}: {'met' if met else 'MISSED'}"
            )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=["sqlite", "etcd", "all"], default="all")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--writer", nargs=2, metavar=("ENGINE", "TARGET"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.writer:
        await run_writer(*arguments.writer)
        return
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="nubes-bench-") as workdir:
        if arguments.engine in ("sqlite", "all"):
            (Path(workdir) / "sqlite").mkdir()
            results["sqlite"] = await bench_sqlite(Path(workdir) / "sqlite")
        if arguments.engine in ("etcd", "all"):
            results["etcd"] = await bench_etcd(Path(workdir) / "etcd")
    if arguments.json:
        print(json.dumps(results, indent=2))
    else:
        report(results)


if __name__ == "__main__":
    asyncio.run(main())
