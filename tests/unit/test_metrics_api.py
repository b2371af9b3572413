"""The API's /metrics on a real SQLite store, in-process: VMs by state, hosts, requests by
route template and store latency, read after real writes and requests."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nubes.ids import IdKind, new_id
from nubes.metrics.api import read_cluster
from nubes.metrics.store import MeteredStore
from nubes.model.common import now
from nubes.model.host import HostCapacity, HostRecord
from nubes.model.vm import Flavor, VmRecord, VmSpec, VmState, VmStatus
from nubes.scheduler.binding import Allocation, HostAllocations
from nubes.store.base import RangeResult
from nubes.store.keys import Kind, host_alive_key, host_allocations_key, resource_key, status_key
from tests.support.api_lab import ApiLab

FLAVOR = Flavor(name="small", vcpus=2, memory_mb=512, disk_gb=1)


def values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def put_vm(lab: ApiLab, state: VmState | None, host: str | None = None) -> str:
    vm_id = new_id(IdKind.VM)
    spec = VmSpec(name=vm_id, flavor=FLAVOR, image=new_id(IdKind.IMAGE), host=host)
    record = VmRecord(id=vm_id, spec=spec, created_at=now())
    await lab.store.put(resource_key(Kind.VM, vm_id), record.to_json())
    if state is not None:
        status = VmStatus(state=state, host=host, updated_at=now())
        await lab.store.put(status_key(Kind.VM, vm_id), status.to_json())
    return vm_id


async def put_host(lab: ApiLab, name: str, *, alive: bool, vms: dict[str, Any]) -> None:
    record = HostRecord(
        name=name,
        capacity=HostCapacity(vcpus=16, memory_mb=32768, disk_gb=500),
        accel="tcg",
        agent_version="test",
        boot_id="boot",
        started_at=datetime.now(UTC),
    )
    await lab.store.put(resource_key(Kind.HOST, name), record.to_json())
    allocations = HostAllocations(vms={vm: Allocation(**size) for vm, size in vms.items()})
    await lab.store.put(host_allocations_key(name), allocations.to_json())
    if alive:
        await lab.store.put(host_alive_key(name), {"at": "now"})


async def scrape(
    lab: ApiLab, client: httpx.AsyncClient | None = None
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics of `client`'s app (each lab client has its own app, so its own counters)."""
    answer = await (client or lab.client()).get("/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return values(answer.text)


async def test_vms_are_counted_by_the_state_clients_see(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        await put_vm(lab, VmState.RUNNING, "h1")
        await put_vm(lab, VmState.RUNNING, "h1")
        await put_vm(lab, VmState.STOPPED, "h1")
        await put_vm(lab, None)  # no host, no status yet: pending
        await put_vm(lab, None, "h1")  # bound, the agent has not reported: scheduled
        found = await scrape(lab)
    assert found[("nubes_vms", (("state", "running"),))] == 2
    assert found[("nubes_vms", (("state", "stopped"),))] == 1
    assert found[("nubes_vms", (("state", "pending"),))] == 1
    assert found[("nubes_vms", (("state", "scheduled"),))] == 1
    assert found[("nubes_vms", (("state", "error"),))] == 0


async def test_hosts_show_liveness_capacity_and_allocations(tmp_path: Path) -> None:
    size = {"vcpus": 2, "memory_mb": 512, "disk_gb": 1}
    async with ApiLab.open(tmp_path) as lab:
        await put_host(lab, "h1", alive=True, vms={"i-aaaaaaaaaa": size, "i-bbbbbbbbbb": size})
        await put_host(lab, "h2", alive=False, vms={})
        found = await scrape(lab)
    assert found[("nubes_hosts", (("liveness", "up"),))] == 1
    assert found[("nubes_hosts", (("liveness", "down"),))] == 1
    h1, h2 = (("host", "h1"),), (("host", "h2"),)
    assert (found[("nubes_host_up", h1)], found[("nubes_host_up", h2)]) == (1, 0)
    assert found[("nubes_host_capacity_vcpus", h1)] == 16
    assert found[("nubes_host_capacity_memory_bytes", h1)] == 32768 << 20
    assert found[("nubes_host_allocated_vms", h1)] == 2
    assert found[("nubes_host_allocated_vcpus", h1)] == 4
    assert found[("nubes_host_allocated_memory_bytes", h1)] == 1024 << 20
    assert found[("nubes_host_allocated_vcpus", h2)] == 0


async def test_requests_are_counted_by_route_template_and_code(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        vm_id = new_id(IdKind.VM)
        assert (await admin.get("/v1/health")).status_code == 200
        assert (await admin.get(f"/v1/vms/{vm_id}")).status_code == 404
        assert (await admin.get(f"/v1/vms/{new_id(IdKind.VM)}")).status_code == 404
        assert (await admin.get("/no/such/path")).status_code == 404
        found = await scrape(lab, admin)
    health = (("code", "200"), ("method", "GET"), ("route", "/v1/health"))
    assert found[("nubes_api_requests_total", health)] == 1
    one_vm = (("code", "404"), ("method", "GET"), ("route", "/v1/vms/{vm}"))
    assert found[("nubes_api_requests_total", one_vm)] == 2  # one series, not one per id
    unknown = (("code", "404"), ("method", "GET"), ("route", "unmatched"))
    assert found[("nubes_api_requests_total", unknown)] == 1
    latency = (("method", "GET"), ("route", "/v1/health"))
    assert found[("nubes_api_request_seconds_count", latency)] == 1


async def test_unknown_methods_share_one_label_whatever_a_client_sends(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        client = lab.client()  # no token: requests are counted before authentication
        for method in ("BREW", "PROPFIND", "X-AAAA", "X-BBBB"):
            await client.request(method, "/v1/health")
        await client.request("OPTIONS", "/v1/health")
        found = await scrape(lab, client)
    # The scrape itself is counted once its answer starts, after it was rendered.
    by_method: dict[str, float] = {}
    for (name, labels), value in found.items():
        if name == "nubes_api_request_seconds_count":
            method = dict(labels)["method"]
            by_method[method] = by_method.get(method, 0) + value
    assert by_method == {"other": 4, "OPTIONS": 1}
    requests = {dict(labels)["method"] for name, labels in found if "requests" in name}
    assert requests == {"other", "OPTIONS"}


async def test_the_cluster_is_read_in_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page_size = 3
    async with ApiLab.open(tmp_path) as lab:
        for _ in range(7):  # 14 keys under the VM prefix: a record and a status each
            await put_vm(lab, VmState.RUNNING, "h1")
        for name in ("h1", "h2", "h3", "h4"):  # 3 keys each
            await put_host(lab, name, alive=True, vms={})
        limits: list[int | None] = []
        unpaged = lab.store.range

        async def range_noting_its_limit(
            prefix: str, *, limit: int | None = None, start: str | None = None
        ) -> RangeResult:
            limits.append(limit)
            return await unpaged(prefix, limit=limit, start=start)

        monkeypatch.setattr(lab.store, "range", range_noting_its_limit)
        lab.client()  # builds the app, as in a running API: nubes.api.vmops imports after it
        view = await read_cluster(lab.store, page_size=page_size)
    assert view.vms_by_state["running"] == 7
    assert [host.name for host in view.hosts] == ["h1", "h2", "h3", "h4"]
    assert all(host.up for host in view.hosts)
    assert set(limits) == {page_size}  # not one read without a limit
    assert len(limits) >= 14 // page_size + 12 // page_size


async def test_store_latency_is_served_when_the_store_is_metered(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        lab.ctx.store = MeteredStore(lab.store)  # as open_store gives it to `nubes api`
        admin = await lab.admin()
        assert (await admin.get("/v1/vms")).status_code == 200
        found = await scrape(lab)
    assert found[("nubes_store_request_seconds_count", (("operation", "range"),))] >= 1
    assert found[("nubes_store_request_seconds_count", (("operation", "get"),))] >= 1


async def test_the_cluster_is_read_again_only_after_a_few_seconds(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        client = lab.client()
        await put_vm(lab, VmState.RUNNING, "h1")
        first = values((await client.get("/metrics")).text)
        await put_vm(lab, VmState.RUNNING, "h1")
        cached = values((await client.get("/metrics")).text)
        client._transport.app.state.metrics.cluster_view_seconds = 0  # type: ignore[attr-defined]
        fresh = values((await client.get("/metrics")).text)
    running = ("nubes_vms", (("state", "running"),))
    assert (first[running], cached[running], fresh[running]) == (1, 1, 2)


async def test_metrics_can_be_turned_off(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        lab.ctx.config = lab.ctx.config.model_copy(
            update={"api": lab.ctx.config.api.model_copy(update={"metrics": False})}
        )
        answer = await lab.client().get("/metrics")
    assert answer.status_code == 404
    assert answer.json()["code"] == "not_found"
