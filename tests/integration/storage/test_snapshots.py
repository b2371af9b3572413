"""Internal snapshots of volumes no QEMU holds, checked by the bytes a guest would read."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nubes.agent.storage import qemu_img
from nubes.agent.storage.snapshots import (
    create_snapshot,
    delete_snapshot,
    list_snapshots,
    revert_snapshot,
)
from nubes.agent.storage.volumes import ensure_volume, volume_path
from nubes.errors import Conflict, NotFound
from tests.integration.storage.conftest import qemu_io
from tests.support.processes import stop_process

pytestmark = pytest.mark.integration


def write_pattern(path: Path, pattern: int) -> None:
    written = qemu_io(path, f"write -P {pattern:#x} 0 64k")
    assert written.returncode == 0, written.stderr
    assert "wrote 65536/65536 bytes" in written.stdout


def reads_pattern(path: Path, pattern: int) -> bool:
    """Whether the first 64 KiB a guest would read are all `pattern`."""
    read = qemu_io(path, f"read -P {pattern:#x} 0 64k")
    if "Pattern verification failed" in read.stdout:
        return False
    assert read.returncode == 0, read.stderr
    assert "read 65536/65536 bytes" in read.stdout
    return True


@pytest.fixture
async def volume(tmp_path: Path) -> Path:
    path = volume_path(tmp_path, "vol-snapshot01")
    await ensure_volume(path, 1, None)
    return path


async def test_revert_brings_back_the_bytes_of_the_snapshot(volume: Path) -> None:
    write_pattern(volume, 0xAB)
    await create_snapshot(volume, "before")
    write_pattern(volume, 0xCD)
    assert reads_pattern(volume, 0xCD)

    await revert_snapshot(volume, "before")

    assert reads_pattern(volume, 0xAB)
    assert not reads_pattern(volume, 0xCD)


async def test_snapshots_are_listed_and_creating_one_twice_makes_one(volume: Path) -> None:
    await create_snapshot(volume, "one")
    await create_snapshot(volume, "two")
    await create_snapshot(volume, "one")
    listed = await list_snapshots(volume)
    assert [snapshot.name for snapshot in listed] == ["one", "two"]
    assert not any(snapshot.vm_state for snapshot in listed)


async def test_reverting_to_an_unknown_snapshot_is_not_found(volume: Path) -> None:
    await create_snapshot(volume, "known")
    with pytest.raises(NotFound, match="no snapshot 'unknown'") as caught:
        await revert_snapshot(volume, "unknown")
    assert caught.value.hint == "its snapshots: known"


async def test_delete_removes_a_snapshot_and_is_idempotent(volume: Path) -> None:
    await create_snapshot(volume, "gone")
    await create_snapshot(volume, "kept")
    await delete_snapshot(volume, "gone")
    await delete_snapshot(volume, "gone")
    assert [snapshot.name for snapshot in await list_snapshots(volume)] == ["kept"]


async def test_a_snapshot_named_like_another_ones_id_is_the_one_reverted_to(
    volume: Path,
) -> None:
    # qemu-img snapshot -a looks up ids before names: "2" would mean the snapshot "x".
    write_pattern(volume, 0x11)
    await create_snapshot(volume, "2")
    write_pattern(volume, 0x22)
    await create_snapshot(volume, "x")
    assert [(s.name, s.id) for s in await qemu_img.snapshot_list(volume)] == [
        ("2", "1"),
        ("x", "2"),
    ]
    await revert_snapshot(volume, "2")
    assert reads_pattern(volume, 0x11)
    await delete_snapshot(volume, "2")
    assert [s.name for s in await list_snapshots(volume)] == ["x"]


@pytest.fixture
def held(volume: Path) -> Iterator[Path]:
    """The volume held open (and locked) by a qemu-io process, as a running QEMU would."""
    holder = ["qemu-io", "-f", "qcow2", "-c", "sleep 10000", str(volume)]
    probe = ["qemu-img", "info", "-f", "qcow2", str(volume)]
    process = subprocess.Popen(holder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while True:
            assert time.monotonic() < deadline, "qemu-io did not lock the volume"
            if process.poll() is not None:
                # It lost the race for the lock to the probe: start it again.
                process = subprocess.Popen(
                    holder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            locked = subprocess.run(probe, capture_output=True, check=False).returncode != 0
            if locked and process.poll() is None:
                break
            time.sleep(0.02)
        yield volume
    finally:
        stop_process(process)


async def test_a_volume_held_by_a_running_process_is_a_conflict_but_can_be_listed(
    held: Path,
) -> None:
    with pytest.raises(Conflict, match="in use by another process"):
        await create_snapshot(held, "nope")
    assert await list_snapshots(held, force_share=True) == []
