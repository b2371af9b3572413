"""The in-process qcow2 overlay writer against qemu-img: same metadata, a clean check,
and a disk QEMU reads through to its backing file and writes to."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nubes.agent.storage.qcow2 import overlay_bytes, write_overlay
from nubes.errors import InvalidInput

pytestmark = pytest.mark.integration

MIB = 1 << 20


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.qcow2"
    assert _run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(64 * MIB)).returncode == 0
    assert _run("qemu-io", "-c", "write -P 0x5a 0 1M", str(path)).returncode == 0
    return path


@pytest.mark.parametrize("size", [64 * MIB, 1 << 30, 600 << 30, 5 << 40])
def test_the_overlay_passes_qemu_img_check_and_matches_qemu_img_create(
    tmp_path: Path, base: Path, size: int
) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    write_overlay(ours, base, "qcow2", size)
    made = _run(
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", "-u",
        str(theirs), str(size),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    check = _run("qemu-img", "check", str(ours))
    assert check.returncode == 0, check.stdout + check.stderr
    info = _run("qemu-img", "info", "--output=json", str(ours)).stdout
    assert f'"virtual-size": {size}' in info
    assert f'"backing-filename": "{base}"' in info
    assert '"backing-filename-format": "qcow2"' in info
    # The same header fields as qemu-img's (both end their header at byte 112), but for
    # where the backing file name sits: qemu-img also writes a feature name table.
    mine, reference = ours.read_bytes()[:112], theirs.read_bytes()[:112]
    assert mine[:8] == reference[:8]
    assert mine[16:] == reference[16:]
    assert ours.stat().st_size == theirs.stat().st_size


def test_qemu_reads_the_backing_data_through_the_overlay_and_writes_to_it(
    tmp_path: Path, base: Path
) -> None:
    overlay = tmp_path / "root.qcow2"
    write_overlay(overlay, base, "qcow2", 128 * MIB)
    assert _run("qemu-io", "-c", "read -P 0x5a 0 1M", str(overlay)).returncode == 0
    assert _run("qemu-io", "-c", "write -P 0x33 100M 2M", str(overlay)).returncode == 0
    assert _run("qemu-io", "-c", "read -P 0x33 100M 2M", str(overlay)).returncode == 0
    assert _run("qemu-img", "check", str(overlay)).returncode == 0
    assert _run("qemu-io", "-c", "read -P 0x5a 0 1M", str(base)).returncode == 0  # untouched


def test_an_existing_file_is_never_overwritten(tmp_path: Path, base: Path) -> None:
    path = tmp_path / "root.qcow2"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        write_overlay(path, base, "qcow2", 64 * MIB)
    assert path.read_bytes() == b"precious"
    assert list(tmp_path.glob(".*partial")) == []


@pytest.mark.parametrize("size", [0, -512, 1000])
def test_a_size_qcow2_cannot_hold_is_refused(size: int) -> None:
    with pytest.raises(InvalidInput, match="multiple of 512"):
        overlay_bytes("/base", "qcow2", size)
