"""An agent's metrics over a real AgentContext and real processes (no QEMU, no root): live
processes are sampled, zombies are not, a VM whose /proc cannot be read is left out while
the rest is served, and a taken port leaves the agent without metrics but running."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nubes.agent.compute.cgroup import CpuWeights
from nubes.agent.compute.process import ProcessState, process_state
from nubes.agent.compute.qemu_cmdline import Accelerator
from nubes.agent.context import AgentContext
from nubes.agent.paths import AgentPaths
from nubes.agent.runtime import LaunchRecord, VmRuntime
from nubes.agent.storage.images import ImageCache
from nubes.config import AgentConfig
from nubes.ids import IdKind, new_id
from nubes.metrics import procfs
from nubes.metrics.agent import AgentMetrics
from nubes.metrics.store import MeteredStore
from nubes.model.host import HostCapacity
from nubes.model.vm import Flavor
from nubes.store.sqlite import SqliteStore

FLAVOR = Flavor(name="small", vcpus=2, memory_mb=512, disk_gb=1)


@pytest.fixture
def live_and_zombie() -> Iterator[tuple[int, int]]:
    """A running child and one that exited and is not reaped (a zombie), by pid."""
    live = subprocess.Popen(["sleep", "60"])
    zombie = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while process_state(zombie.pid) is not ProcessState.ZOMBIE:
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        yield live.pid, zombie.pid
    finally:
        for child in (live, zombie):
            child.kill()
            child.wait()


def runtime_of(pid: int, vm_id: str) -> VmRuntime:
    launch = LaunchRecord(vm_id=vm_id, flavor=FLAVOR, disks=[], argv=["qemu"])
    return VmRuntime(pid=pid, launch=launch)


async def context(tmp_path: Path, **config: object) -> AgentContext:
    store = MeteredStore(await SqliteStore.open(tmp_path / "nubes.db"))
    return AgentContext(
        store=store,
        config=AgentConfig(host="h1", **config),  # type: ignore[arg-type]
        paths=AgentPaths(state_dir=tmp_path, run_dir=tmp_path / "run"),
        accel=Accelerator.TCG,
        images=ImageCache(tmp_path / "images", tmp_path / "cache"),
        cpu_weights=CpuWeights("tmet"),
        capacity=HostCapacity(vcpus=8, memory_mb=4096, disk_gb=20),
    )


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_live_processes_are_sampled_and_zombies_are_not(
    tmp_path: Path, live_and_zombie: tuple[int, int]
) -> None:
    live, zombie = live_and_zombie
    live_vm, zombie_vm = new_id(IdKind.VM), new_id(IdKind.VM)
    ctx = await context(tmp_path)
    runtimes = {live_vm: runtime_of(live, live_vm), zombie_vm: runtime_of(zombie, zombie_vm)}
    ctx.runtimes = lambda: runtimes
    try:
        await ctx.store.put("/x", 1)
        found = samples(await AgentMetrics(ctx).scrape())
    finally:
        await ctx.store.close()
    vm = (("project", ""), ("vm", live_vm))
    assert found[("nubes_vm_resident_memory_bytes", vm)] > 0
    assert found[("nubes_vm_memory_bytes", vm)] == 512 << 20
    assert ("nubes_vm_cpu_seconds_total", vm) in found
    assert not [key for key in found if ("vm", zombie_vm) in key[1]]
    host = (("host", "h1"),)
    assert found[("nubes_host_vms_running", host)] == 1
    assert found[("nubes_host_used_vcpus", host)] == 2
    assert found[("nubes_host_capacity_memory_bytes", host)] == 4096 << 20
    assert found[("nubes_host_state_dir_size_bytes", host)] > 0
    assert found[("nubes_store_request_seconds_count", (("operation", "put"),))] == 1


@pytest.fixture
def three_live() -> Iterator[list[int]]:
    children = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    try:
        yield [child.pid for child in children]
    finally:
        for child in children:
            child.kill()
            child.wait()


def odd_proc(root: Path, good: int, garbled: int, unreadable: int) -> Path:
    """A /proc of our making: the good VM's entry is the real one, the garbled VM's stat is
    not a stat line (ValueError), the other's net/dev is a directory (an OSError other
    than the process being gone)."""
    proc = root / "proc"
    proc.mkdir()
    (proc / str(good)).symlink_to(f"/proc/{good}")
    for pid in (garbled, unreadable):
        (proc / str(pid) / "net").mkdir(parents=True)
        (proc / str(pid) / "status").write_text("VmRSS:\t 100 kB\n")
    (proc / str(garbled) / "stat").write_text("not a stat line")
    (proc / str(garbled) / "net" / "dev").write_text("")
    (proc / str(unreadable) / "stat").write_text(Path(f"/proc/{unreadable}/stat").read_text())
    (proc / str(unreadable) / "net" / "dev").mkdir()
    return proc


async def test_a_vm_whose_proc_files_cannot_be_read_is_left_out_and_the_rest_served(
    tmp_path: Path,
    three_live: list[int],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good, garbled, unreadable = three_live
    monkeypatch.setattr(procfs, "_PROC", odd_proc(tmp_path, good, garbled, unreadable))
    vms = {pid: new_id(IdKind.VM) for pid in three_live}
    ctx = await context(tmp_path)
    runtimes = {vm_id: runtime_of(pid, vm_id) for pid, vm_id in vms.items()}
    ctx.runtimes = lambda: runtimes
    try:
        with caplog.at_level(logging.WARNING):
            found = samples(await AgentMetrics(ctx).scrape())
    finally:
        await ctx.store.close()
    assert found[("nubes_vm_cpu_seconds_total", (("project", ""), ("vm", vms[good])))] >= 0
    for pid in (garbled, unreadable):
        assert not [key for key in found if ("vm", vms[pid]) in key[1]]
        assert f"cannot sample VM {vms[pid]}" in caplog.text
    host = (("host", "h1"),)
    assert found[("nubes_agent_up", host)] == 1
    assert found[("nubes_host_vms_running", host)] == 1


async def test_a_taken_port_turns_metrics_off_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ctx = await context(tmp_path, metrics_port=taken.getsockname()[1])
        metrics = AgentMetrics(ctx)
        try:
            with caplog.at_level(logging.WARNING):
                await metrics.start()
            assert metrics.server is None
            assert "agent metrics are off" in caplog.text
            assert "metrics_port" in caplog.text
        finally:
            await metrics.stop()
            await ctx.store.close()


async def test_port_zero_serves_nothing(tmp_path: Path) -> None:
    ctx = await context(tmp_path, metrics_port=0)
    metrics = AgentMetrics(ctx)
    try:
        await metrics.start()
        assert metrics.server is None
    finally:
        await ctx.store.close()
