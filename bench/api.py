"""API benchmarks: listing at scale, and API create call -> VM running against bare QEMU.

    .venv/bin/python -m bench.api list [--vms 10000] [--page 100] [--rounds 3]
    .venv/bin/python -m bench.api create [--runs 7]

(c) `list`: 10,000 VM records (each with a `running` status) in a fresh SQLite store
    behind the real API (uvicorn on 127.0.0.1, real HTTP with keep-alive); every page of
    `GET /v1/vms?limit=100` is timed while paging through all of them, `--rounds`
    times. The baseline in the same run is `GET /v1/health` on the same connection: the
    cost of an HTTP round trip with no store work.
(a) `create`: see bench/api_create.py (needs root, QEMU and the agent).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from nubes.ids import IdKind, new_id
from nubes.model.common import now
from nubes.model.vm import Flavor, VmRecord, VmSpec, VmState, VmStatus
from nubes.store.base import Put, TxnOperation
from nubes.store.keys import Kind, resource_key, status_key
from nubes.store.sqlite import SqliteStore
from tests.support.api_server import serve_api

TARGET_PAGE_MS = 50.0


async def write_vms(path: Path, count: int) -> None:
    """`count` running VMs of the default project, written the way the API and agent do."""
    store = await SqliteStore.open(path)
    try:
        flavor = Flavor(name="tiny", vcpus=1, memory_mb=96, disk_gb=0)
        operations: list[TxnOperation] = []
        for index in range(count):
            vm_id = new_id(IdKind.VM)
            record = VmRecord(
                id=vm_id,
                spec=VmSpec(name=f"vm-{index:05d}", flavor=flavor, host="host-1"),
                created_at=now(),
            )
            status = VmStatus(
                state=VmState.RUNNING, host="host-1", pid=1000 + index, updated_at=now()
            )
            operations.append(Put(resource_key(Kind.VM, vm_id), record.to_json()))
            operations.append(Put(status_key(Kind.VM, vm_id), status.to_json()))
            if len(operations) >= 100:
                await store.txn([], operations)
                operations = []
        if operations:
            await store.txn([], operations)
    finally:
        await store.close()


def page_through(client: httpx.Client, page: int) -> tuple[list[float], int]:
    """Seconds per page, and how many VMs were seen."""
    seconds: list[float] = []
    seen = 0
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"limit": page}
        if cursor:
            params["cursor"] = cursor
        started = time.perf_counter()
        response = client.get("/v1/vms", params=params)
        seconds.append(time.perf_counter() - started)
        response.raise_for_status()
        body = response.json()
        seen += len(body["items"])
        cursor = body["next"]
        if cursor is None:
            return seconds, seen


def bench_list(options: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="nubes-bench-api-") as directory:
        root = Path(directory)
        started = time.perf_counter()
        asyncio.run(write_vms(root / "nubes.db", options.vms))
        written = time.perf_counter() - started
        with (
            serve_api(root) as api,
            httpx.Client(
                base_url=api.url, headers={"Authorization": f"Bearer {api.token()}"}, timeout=30
            ) as client,
        ):
            pages: list[float] = []
            health: list[float] = []
            for _ in range(options.rounds):
                seconds, seen = page_through(client, options.page)
                if seen != options.vms:
                    print(f"listed {seen} VMs, expected {options.vms}", file=sys.stderr)
                    return 2
                pages.extend(seconds)
                for _ in range(len(seconds)):
                    started = time.perf_counter()
                    client.get("/v1/health").raise_for_status()
                    health.append(time.perf_counter() - started)
    p50 = statistics.median(pages) * 1000
    p95 = statistics.quantiles(pages, n=20)[-1] * 1000
    base = statistics.median(health) * 1000
    print(
        f"(c) {options.vms:,} VMs ({written:.1f} s to write), {options.page} per page, "
        f"{len(pages)} pages over {options.rounds} rounds, real HTTP on 127.0.0.1"
    )
    print("| figure | ms |")
    print("|---|---:|")
    print(f"| page p50 | {p50:.1f} |")
    print(f"| page p95 | {p95:.1f} |")
    print(f"| page max | {max(pages) * 1000:.1f} |")
    print(f"| baseline GET /v1/health p50 | {base:.2f} |")
    print(f"| ratio page / baseline | {p50 / base:.1f} |")
    met = p50 <= TARGET_PAGE_MS
    print(
        f"(c) page p50 {p50:.1f} ms, target <= {TARGET_PAGE_MS:.0f} ms: "
        f"{'met' if met else 'MISSED'}"
    )
    return 0 if met else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.api", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="(c) paging through 10,000 VMs")
    listing.add_argument("--vms", type=int, default=10_000)
    listing.add_argument("--page", type=int, default=100)
    listing.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args(argv)
    return bench_list(options)


if __name__ == "__main__":
    sys.exit(main())
