"""Prometheus metrics read after real actions on a `nubes up` node: a VM boots under TCG on
the default network, and the agent's /metrics shows its CPU, memory, disk and network
counters growing and the host's capacity; the API's /metrics counts it running and shows
the store's latency; once the VM is stopped its per-VM series are gone."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.node.conftest import NodeLab

pytestmark = pytest.mark.integration

T = TypeVar("T")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    answer = httpx.get(url, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def series(samples: Samples, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return {key: v for (n, key), v in samples.items() if n == name and wanted <= set(key)}


def eventually(check: Callable[[], T | None], *, timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(1.0)


def cli(lab: NodeLab, *arguments: str) -> Any:
    completed = lab.nubes(*arguments, "-o", "json")
    assert completed.returncode == 0, f"nubes {' '.join(arguments)}:\n{completed.stderr}"
    return json.loads(completed.stdout) if completed.stdout.strip() else None


@pytest.mark.timeout(400)
def test_metrics_follow_a_vm_from_boot_to_stop(node_lab: NodeLab) -> None:
    lab = node_lab
    lab.up()
    agent_url = f"http://127.0.0.1:{lab.metrics_port}/metrics"
    api_url = f"{lab.url}/metrics"
    vm_id = cli(lab, "vm", "create", "m1", "--image", "tiny", "--flavor", "tiny",
                "--network", "default", "--wait")["id"]  # fmt: skip
    host = f"{lab.prefix}-host"

    # The guest asks for an address as it boots; its tap counts both ways once answered.
    def guest_talked() -> Samples | None:
        samples = scrape(agent_url)
        sent = series(samples, "nubes_vm_network_transmit_bytes_total", vm=vm_id)
        received = series(samples, "nubes_vm_network_receive_bytes_total", vm=vm_id)
        if sent and received and min(sent.values()) > 0 and min(received.values()) > 0:
            return samples
        return None

    first = eventually(guest_talked, timeout=150, what="the guest's DHCP on its tap")
    vm = (("project", "default"), ("vm", vm_id))
    assert first[("nubes_vm_resident_memory_bytes", vm)] > 0
    assert first[("nubes_vm_memory_bytes", vm)] == 96 * 1024 * 1024  # the tiny flavor
    root = tuple(sorted((*vm, ("disk", "root"))))
    assert first[("nubes_vm_disk_read_bytes_total", root)] > 0  # it booted from its disk
    assert first[("nubes_vm_disk_read_ops_total", root)] > 0
    (nic,) = series(first, "nubes_vm_network_transmit_packets_total", vm=vm_id)
    assert dict(nic)["interface"].startswith("tp-")
    assert dict(nic)["port"].startswith("port-")

    def cpu_grew() -> Samples | None:
        samples = scrape(agent_url)
        cpu = ("nubes_vm_cpu_seconds_total", vm)
        return samples if samples[cpu] > first[cpu] else None

    second = eventually(cpu_grew, timeout=30, what="the VM's CPU seconds to grow")
    # The host as its record in the store says, and what runs on it.
    record = cli(lab, "host", "show", host)
    capacity = record.get("capacity") or record["record"]["capacity"]
    on_host = (("host", host),)
    assert second[("nubes_agent_up", on_host)] == 1
    assert second[("nubes_host_capacity_vcpus", on_host)] == capacity["vcpus"]
    assert second[("nubes_host_capacity_memory_bytes", on_host)] == capacity["memory_mb"] << 20
    assert second[("nubes_host_vms_running", on_host)] == 1
    assert second[("nubes_host_used_vcpus", on_host)] == 1
    assert second[("nubes_host_state_dir_free_bytes", on_host)] > 0
    assert second[("nubes_reconcile_seconds_count", (("controller", "vm"),))] > 0
    assert second[("nubes_store_request_seconds_count", (("operation", "txn"),))] > 0

    # The API: the VM counted running, the host up with the VM allocated, store latency.
    api = scrape(api_url)
    assert api[("nubes_vms", (("state", "running"),))] == 1
    assert api[("nubes_hosts", (("liveness", "up"),))] == 1
    assert api[("nubes_host_allocated_vcpus", on_host)] == 1
    assert api[("nubes_host_capacity_vcpus", on_host)] == capacity["vcpus"]
    assert api[("nubes_store_request_seconds_count", (("operation", "range"),))] > 0
    created = (("code", "201"), ("method", "POST"), ("route", "/v1/vms"))
    assert api[("nubes_api_requests_total", created)] == 1

    # Stopped: its QEMU is gone, and so are its series (a zombie does not count).
    cli(lab, "vm", "stop", "m1", "--force")
    cli(lab, "vm", "wait", "m1", "--state", "stopped")

    def vm_series_gone() -> Samples | None:
        samples = scrape(agent_url)
        return None if series(samples, "nubes_vm_cpu_seconds_total", vm=vm_id) else samples

    stopped = eventually(vm_series_gone, timeout=30, what="the stopped VM's series to go")
    assert not series(stopped, "nubes_vm_network_transmit_bytes_total", vm=vm_id)
    assert stopped[("nubes_host_vms_running", on_host)] == 0
    assert stopped[("nubes_agent_up", on_host)] == 1
