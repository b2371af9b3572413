"""The pure parts of live migration: who serves an incoming move, what QEMU's answers
mean for the source, the progress figures, and the store transactions that switch a VM
to its target or roll it back (on a real SQLite store)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from nubes.agent.compute.qemu_cmdline import Accelerator, QemuPlan, RuntimePaths, build_qemu_argv
from nubes.agent.migration import _figures, _outgoing_state, incoming_here
from nubes.agent.migration_records import roll_back, switch_host
from nubes.model.common import now
from nubes.model.migration import MigrationRequest, MigrationState, MigrationStatus
from nubes.model.network import PortStatus
from nubes.model.vm import Flavor, VmRecord, VmSpec
from nubes.scheduler.binding import HostAllocations, allocation_of, read_allocations
from nubes.store.keys import Kind, host_allocations_key, migration_key, resource_key, status_key
from nubes.store.sqlite import SqliteStore

TINY = Flavor(name="tiny", vcpus=1, memory_mb=96, disk_gb=0)
REQUEST = MigrationRequest(target="h2", source="h1", live=True, counter=3)


def vm(**spec: object) -> VmRecord:
    fields: dict[str, object] = {"name": "web", "host": "h1", "flavor": TINY, **spec}
    return VmRecord(id="i-abcdefghij", spec=VmSpec.model_validate(fields), created_at=now())


def test_only_the_target_serves_a_move_and_only_before_the_switch() -> None:
    moving = vm(migration=REQUEST)
    assert incoming_here(moving, "h2")
    assert not incoming_here(moving, "h1")
    assert not incoming_here(moving, "h3")
    switched = vm(host="h2", migration=REQUEST)
    assert not incoming_here(switched, "h2")
    cold = vm(migration=REQUEST.model_copy(update={"live": False}))
    assert incoming_here(cold, "h2")  # the target receives the disk
    assert not incoming_here(moving.model_copy(update={"deleting": True}), "h2")


def test_a_qemu_that_came_by_migration_is_judged_by_its_own_outgoing_fields() -> None:
    # It reports its own incoming move "completed" for ever: not ours until `downtime`.
    assert _outgoing_state({"status": "completed", "ram": {}}, None) == "active"
    assert _outgoing_state({"status": "completed", "ram": {}}, "active") == "active"
    assert _outgoing_state({"status": "completed", "downtime": 12}, "active") == "completed"
    assert _outgoing_state({"status": "active"}, None) == "active"
    assert _outgoing_state({"status": "completed"}, "failed") == "failed"
    assert _outgoing_state({"status": "cancelled"}, None) == "cancelled"


def test_progress_figures_add_ram_and_disk_and_keep_qemus_times() -> None:
    info = {
        "status": "completed",
        "downtime": 40,
        "total-time": 900,
        "ram": {"transferred": 100, "remaining": 0, "total": 1000},
        "disk": {"transferred": 50, "remaining": 10, "total": 500},
    }
    assert _figures(info) == {
        "transferred_bytes": 150,
        "remaining_bytes": 10,
        "total_bytes": 1500,
        "downtime_ms": 40,
        "total_ms": 900,
    }
    assert "downtime_ms" not in _figures({"status": "active", "ram": {"total": 5}})


def test_percent_and_pause_read_from_the_record() -> None:
    moment = now()
    status = MigrationStatus(
        counter=1,
        state=MigrationState.RUNNING,
        source="h1",
        target="h2",
        total_bytes=1000,
        remaining_bytes=250,
        started_at=moment,
        updated_at=moment,
    )
    assert status.percent == 75
    assert status.paused_ms is None
    done = status.model_copy(
        update={
            "state": MigrationState.COMPLETED,
            "paused_at": moment,
            "resumed_at": moment + timedelta(milliseconds=87),
        }
    )
    assert (done.percent, done.paused_ms) == (100, 87)


def test_an_incoming_qemu_waits_for_its_stream_and_boots_nothing() -> None:
    paths = RuntimePaths(
        qmp_socket=Path("/run/q.sock"),
        serial_socket=Path("/run/s.sock"),
        serial_log=Path("/var/s.log"),
        pidfile=Path("/run/q.pid"),
        guest_agent_socket=Path("/run/g.sock"),
    )
    plan = QemuPlan(
        vm_id="i-abcdefghij",
        prefix="nb",
        accel=Accelerator.TCG,
        machine="q35",
        vcpus=1,
        memory_mb=96,
        paths=paths,
    )
    plain = build_qemu_argv(plan)
    incoming = build_qemu_argv(QemuPlan(**{**plan.__dict__, "incoming": True}))
    assert "-incoming" not in plain
    at = incoming.index("-incoming")
    assert incoming[at : at + 2] == ["-incoming", "defer"]
    # The rest is the same line: the devices must match the source's one for one.
    assert incoming[:at] + incoming[at + 2 :] == plain


async def seeded(tmp_path: Path) -> tuple[SqliteStore, VmRecord]:
    store = await SqliteStore.open(tmp_path / "store.db")
    record = vm(migration=REQUEST, ports=["port-abcdefghij"])
    await store.put(resource_key(Kind.VM, record.id), record.to_json())
    await store.put(resource_key(Kind.PORT, "port-abcdefghij"), {"placeholder": True})
    both = HostAllocations(vms={record.id: allocation_of(record)})
    await store.put(host_allocations_key("h1"), both.to_json())
    await store.put(host_allocations_key("h2"), both.to_json())
    moment = now()
    progress = MigrationStatus(
        counter=3,
        state=MigrationState.RUNNING,
        source="h1",
        target="h2",
        started_at=moment,
        updated_at=moment,
    )
    await store.put(migration_key(record.id), progress.to_json())
    return store, record


async def progress_of(store: SqliteStore, vm_id: str) -> MigrationStatus:
    kv = await store.get(migration_key(vm_id))
    assert kv is not None
    return MigrationStatus.from_json(kv.value)


async def test_the_switch_moves_the_vm_its_booking_and_its_ports_at_once(tmp_path: Path) -> None:
    store, record = await seeded(tmp_path)
    try:
        assert await switch_host(store, record.id, REQUEST, downtime_ms=12)
        kv = await store.get(resource_key(Kind.VM, record.id))
        assert kv is not None
        moved = VmRecord.from_json(kv.value)
        assert (moved.spec.host, moved.spec.migration) == ("h2", None)
        assert record.id not in read_allocations(await store.get(host_allocations_key("h1"))).vms
        assert record.id in read_allocations(await store.get(host_allocations_key("h2"))).vms
        port = await store.get(status_key(Kind.PORT, "port-abcdefghij"))
        assert port is not None
        assert PortStatus.from_json(port.value).host == "h2"
        done = await progress_of(store, record.id)
        assert (done.state, done.downtime_ms) == (MigrationState.COMPLETED, 12)
        # Once: the request is gone, so a second switch or a rollback does nothing.
        assert not await switch_host(store, record.id, REQUEST)
        assert not await roll_back(store, record.id, REQUEST, "too late")
    finally:
        await store.close()


async def test_a_rollback_keeps_the_vm_home_and_frees_the_target(tmp_path: Path) -> None:
    store, record = await seeded(tmp_path)
    try:
        assert await roll_back(store, record.id, REQUEST, "the target broke")
        kv = await store.get(resource_key(Kind.VM, record.id))
        assert kv is not None
        kept = VmRecord.from_json(kv.value)
        assert (kept.spec.host, kept.spec.migration) == ("h1", None)
        assert record.id in read_allocations(await store.get(host_allocations_key("h1"))).vms
        assert record.id not in read_allocations(await store.get(host_allocations_key("h2"))).vms
        port = await store.get(status_key(Kind.PORT, "port-abcdefghij"))
        assert port is not None
        assert PortStatus.from_json(port.value).host == "h1"
        failed = await progress_of(store, record.id)
        assert (failed.state, failed.reason) == (MigrationState.FAILED, "the target broke")
        assert not await switch_host(store, record.id, REQUEST)
    finally:
        await store.close()
