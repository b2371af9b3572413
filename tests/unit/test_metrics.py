"""Metrics parts without a running agent: /proc parsing, rendering samples, the timed store,
and the agent's tiny /metrics server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from nubes.errors import LeaseNotFound
from nubes.metrics import http as metrics_http
from nubes.metrics.api import ClusterView, HostView, render_cluster
from nubes.metrics.http import MetricsServer
from nubes.metrics.procfs import (
    parse_cpu_seconds,
    parse_net_dev,
    parse_resident_bytes,
    sample_process,
)
from nubes.metrics.reconcile import ReconcileMetrics
from nubes.metrics.samples import (
    AgentSnapshot,
    DiskCounters,
    HostSample,
    VmSample,
    nic_counters_from_tap,
    parse_blockstats,
    render_snapshot,
)
from nubes.metrics.store import MeteredStore, StoreMetrics
from nubes.store.base import Compare, Put
from nubes.store.sqlite import SqliteStore

# A QEMU whose comm holds a space and a parenthesis: fields follow the last ")".
STAT = (
    "4242 (qemu (vm) x) S 1 4241 4241 0 -1 4194560 51234 0 12 0 "
    "1500 250 0 0 20 0 5 0 123456 1019281408 30000 18446744073709551615"
)
STATUS = "Name:\tqemu-system-x86\nState:\tS (sleeping)\nVmRSS:\t  117760 kB\nThreads:\t5\n"
NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
tp-abcdefghij:    1180      5    0    0    0     0          0         0     2952      12    0    0    0     0       0          0
"""  # noqa: E501 - the kernel's own header


def values(text: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Sample name and sorted labels -> value, from an exposition text."""
    found = {}
    decoded = text.decode() if isinstance(text, bytes) else text
    for family in text_string_to_metric_families(decoded):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_cpu_seconds_are_user_plus_system_ticks_over_the_clock_rate() -> None:
    assert parse_cpu_seconds(STAT, ticks_per_second=100) == pytest.approx(17.5)


def test_a_line_that_is_not_a_stat_line_is_refused() -> None:
    with pytest.raises(ValueError, match="stat"):
        parse_cpu_seconds("4242 qemu S 1")


def test_resident_memory_is_vmrss_in_bytes_and_zero_without_it() -> None:
    assert parse_resident_bytes(STATUS) == 117760 * 1024
    assert parse_resident_bytes("Name:\tqemu\nState:\tZ (zombie)\n") == 0


def test_net_dev_gives_each_interface_its_counters() -> None:
    interfaces = parse_net_dev(NET_DEV)
    assert set(interfaces) == {"lo", "tp-abcdefghij"}
    tap = interfaces["tp-abcdefghij"]
    assert (tap.rx_bytes, tap.rx_packets, tap.tx_bytes, tap.tx_packets) == (1180, 5, 2952, 12)


def test_this_process_can_be_sampled_and_a_missing_one_cannot() -> None:
    import os

    sample = sample_process(os.getpid())
    assert sample is not None
    assert sample.cpu_seconds > 0
    assert sample.resident_bytes > 0
    assert "lo" in sample.interfaces
    assert sample_process(2**22 + 1) is None  # above pid_max


def test_a_tap_receives_what_the_guest_transmits() -> None:
    nic = nic_counters_from_tap("port-x", "tp-x", 1180, 5, 2952, 12)
    assert (nic.transmit_bytes, nic.transmit_packets) == (1180, 5)
    assert (nic.receive_bytes, nic.receive_packets) == (2952, 12)


def test_blockstats_give_guest_side_counters_per_block_node() -> None:
    answer = [
        {
            "device": "",
            "node-name": "root",
            "qdev": "/machine/peripheral/disk-root/virtio-backend",
            "stats": {"rd_bytes": 4096, "wr_bytes": 512, "rd_operations": 3, "wr_operations": 1},
            "parent": {"node-name": "#block006", "stats": {"rd_bytes": 99}},
        },
        {"device": "", "stats": {"rd_bytes": 7}},  # no node name: not one of ours
    ]
    assert parse_blockstats(answer) == [DiskCounters("root", 4096, 512, 3, 1)]
    assert parse_blockstats({"unexpected": True}) == []


def test_a_block_node_with_counters_that_are_not_numbers_is_left_out() -> None:
    answer = [
        {"node-name": "vol-bad", "stats": {"rd_bytes": "many"}},
        {"node-name": "vol-none", "stats": {"wr_bytes": None}},
        {"node-name": "root", "stats": {"rd_bytes": 1, "wr_bytes": 2}},
    ]
    assert parse_blockstats(answer) == [DiskCounters("root", 1, 2, 0, 0)]


def snapshot() -> AgentSnapshot:
    host = HostSample(
        host="h1",
        capacity_vcpus=8,
        capacity_memory_bytes=16 << 30,
        capacity_disk_bytes=100 << 30,
        state_dir_free_bytes=50 << 30,
        state_dir_size_bytes=100 << 30,
    )
    vm = VmSample(
        vm="i-abcdefghij",
        project="p1",
        vcpus=2,
        memory_bytes=512 << 20,
        cpu_seconds=12.5,
        resident_bytes=300 << 20,
        disks=[DiskCounters("root", 4096, 512, 3, 1)],
        nics=[nic_counters_from_tap("port-abcdefghij", "tp-abcdefghij", 10, 1, 20, 2)],
    )
    return AgentSnapshot(host=host, vms=[vm])


def test_a_snapshot_renders_host_and_per_vm_metrics() -> None:
    registry = CollectorRegistry()

    class Fixed:
        def collect(self):  # type: ignore[no-untyped-def]
            return list(render_snapshot(snapshot()))

    registry.register(Fixed())
    found = values(generate_latest(registry))
    vm = (("project", "p1"), ("vm", "i-abcdefghij"))
    assert found[("nubes_agent_up", (("host", "h1"),))] == 1
    assert found[("nubes_host_capacity_vcpus", (("host", "h1"),))] == 8
    assert found[("nubes_host_used_vcpus", (("host", "h1"),))] == 2
    assert found[("nubes_host_used_memory_bytes", (("host", "h1"),))] == 512 << 20
    assert found[("nubes_host_vms_running", (("host", "h1"),))] == 1
    assert found[("nubes_vm_cpu_seconds_total", vm)] == 12.5
    assert found[("nubes_vm_resident_memory_bytes", vm)] == 300 << 20
    assert found[("nubes_vm_memory_bytes", vm)] == 512 << 20
    assert found[("nubes_vm_disk_read_bytes_total", (("disk", "root"), *vm))] == 4096
    assert found[("nubes_vm_disk_write_ops_total", (("disk", "root"), *vm))] == 1
    nic = (("interface", "tp-abcdefghij"), ("port", "port-abcdefghij"), *vm)
    assert found[("nubes_vm_network_transmit_bytes_total", tuple(sorted(nic)))] == 10
    assert found[("nubes_vm_network_receive_packets_total", tuple(sorted(nic)))] == 2


def test_the_api_and_the_agent_describe_the_metrics_both_serve_alike() -> None:
    cluster = ClusterView(vms_by_state={"running": 1}, hosts=[HostView(name="h1", up=True)])
    api = {family.name: family for family in render_cluster(cluster)}
    agent = {family.name: family for family in render_snapshot(snapshot())}
    both = sorted(api.keys() & agent.keys())
    assert both == [
        "nubes_host_capacity_disk_bytes",
        "nubes_host_capacity_memory_bytes",
        "nubes_host_capacity_vcpus",
    ]
    for name in both:
        assert (api[name].documentation, api[name].type) == (
            agent[name].documentation,
            agent[name].type,
        ), name
    assert "disk_gb" in api["nubes_host_capacity_disk_bytes"].documentation


def test_reconcile_passes_are_timed_and_failures_counted_by_controller() -> None:
    metrics = ReconcileMetrics()
    registry = CollectorRegistry()
    metrics.register(registry)
    metrics.observe("vm", 0.02, failed=False)
    metrics.observe("vm", 3.0, failed=True)
    found = values(generate_latest(registry))
    assert found[("nubes_reconcile_seconds_count", (("controller", "vm"),))] == 2
    assert found[("nubes_reconcile_seconds_bucket", (("controller", "vm"), ("le", "0.025")))] == 1
    assert found[("nubes_reconcile_errors_total", (("controller", "vm"),))] == 1


async def test_the_metered_store_times_each_request_by_operation(tmp_path: Path) -> None:
    metrics = StoreMetrics()
    registry = CollectorRegistry()
    metrics.register(registry)
    async with MeteredStore(await SqliteStore.open(tmp_path / "db"), metrics) as store:
        await store.put("/a", 1)
        await store.get("/a")
        await store.get("/b")
        await store.txn([Compare.absent("/c")], [Put("/c", 2)])
        await store.range("/")
        with pytest.raises(LeaseNotFound):
            await store.lease_keepalive(12345)
        async with store.watch("/", 1) as watch:  # a stream: passed through, not timed
            assert (await anext(watch)).key == "/a"
    found = values(generate_latest(registry))

    def count(operation: str) -> float:
        return found.get(("nubes_store_request_seconds_count", (("operation", operation),)), 0)

    assert (count("put"), count("get"), count("txn"), count("range")) == (1, 2, 1, 1)
    assert count("lease_keepalive") == 1
    assert found[("nubes_store_errors_total", (("operation", "lease_keepalive"),))] == 1
    assert found[("nubes_store_errors_total", (("operation", "get"),))] == 0
    assert found[("nubes_store_request_seconds_sum", (("operation", "get"),))] > 0


async def test_the_agent_endpoint_serves_metrics_and_nothing_else() -> None:
    async def render() -> bytes:
        return b"# HELP x y\n# TYPE x gauge\nx 1.0\n"

    server = MetricsServer(render, listen="127.0.0.1", port=0)
    await server.start()
    try:
        base = f"http://127.0.0.1:{server.bound_port}"
        async with httpx.AsyncClient(base_url=base) as client:
            answer = await client.get("/metrics")
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("text/plain")
            assert values(answer.text)[("x", ())] == 1
            assert (await client.get("/other")).status_code == 404
            assert (await client.post("/metrics")).status_code == 405
    finally:
        await server.stop()


async def test_a_scrape_that_fails_to_render_is_answered_500() -> None:
    async def render() -> bytes:
        raise ValueError("odd /proc")

    server = MetricsServer(render, listen="127.0.0.1", port=0)
    await server.start()
    try:
        base = f"http://127.0.0.1:{server.bound_port}"
        async with httpx.AsyncClient(base_url=base) as client:
            answer = await client.get("/metrics")
        assert answer.status_code == 500
        assert "could not be gathered" in answer.text
    finally:
        await server.stop()


async def test_stopping_the_server_ends_the_connections_still_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Long enough that only stop() can end the idle connection within the test.
    monkeypatch.setattr(metrics_http, "REQUEST_TIMEOUT_SECONDS", 600.0)
    rendering, render_cancelled = asyncio.Event(), asyncio.Event()

    async def stuck_render() -> bytes:
        rendering.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            render_cancelled.set()
            raise
        return b""

    server = MetricsServer(stuck_render, listen="127.0.0.1", port=0)
    await server.start()
    port = server.bound_port
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    scrape_reader, scrape_writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        scrape_writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        await scrape_writer.drain()
        async with asyncio.timeout(60):
            await rendering.wait()
            await server.stop()
            # Both are closed by the server, without an answer (the agent is stopping).
            assert await idle_reader.read() == b""
            assert await scrape_reader.read() == b""
        assert render_cancelled.is_set()
    finally:
        for writer in (idle_writer, scrape_writer):
            writer.close()
        await server.stop()


async def test_a_taken_port_fails_to_bind_with_an_os_error() -> None:
    async def render() -> bytes:
        return b""

    first = MetricsServer(render, listen="127.0.0.1", port=0)
    await first.start()
    try:
        second = MetricsServer(render, listen="127.0.0.1", port=first.bound_port)
        with pytest.raises(OSError, match="in use"):
            await second.start()
    finally:
        await first.stop()
