"""The per-host image cache: hard links (or copies) verified once, never half visible."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nubes.agent.storage.images import ImageCache, delete_image
from nubes.errors import ImageInvalid, NotFound
from nubes.model.image import ImageRecord
from nubes.store.sqlite import SqliteStore
from tests.integration.storage.conftest import entries

pytestmark = pytest.mark.integration


def inode(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino


async def test_ensure_hard_links_every_file_read_only_and_marks_it_verified(
    qcow2_image: ImageRecord, image_dir: Path, tmp_path: Path
) -> None:
    cache = ImageCache(image_dir, tmp_path / "cache")
    cached = await cache.ensure(qcow2_image)

    directory = tmp_path / "cache" / qcow2_image.id
    assert cached.disk == directory / "disk"
    assert cached.kernel == directory / "kernel"
    assert cached.initrd == directory / "initrd"
    assert cached.cmdline == "console=ttyS0"
    assert cached.virtual_size == qcow2_image.virtual_size
    for name in ("disk", "kernel", "initrd"):
        assert inode(directory / name) == inode(image_dir / qcow2_image.id / name)
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o444
    assert cache.cached_ids() == [qcow2_image.id]
    assert entries(tmp_path / "cache") == [qcow2_image.id]


async def test_concurrent_callers_share_one_copy(
    qcow2_image: ImageRecord, image_dir: Path, tmp_path: Path
) -> None:
    cache = ImageCache(image_dir, tmp_path / "cache")
    results = await asyncio.gather(*(cache.ensure(qcow2_image) for _ in range(5)))
    assert len(set(results)) == 1
    assert entries(tmp_path / "cache") == [qcow2_image.id]


async def test_a_tampered_store_file_is_detected_and_nothing_is_cached(
    qcow2_image: ImageRecord, image_dir: Path, tmp_path: Path
) -> None:
    stored = image_dir / qcow2_image.id / "kernel"
    stored.chmod(0o644)
    with stored.open("r+b") as stream:
        stream.seek(4000)
        stream.write(b"evil")
    cache = ImageCache(image_dir, tmp_path / "cache")
    with pytest.raises(ImageInvalid, match=r"kernel file of image .* does not match its sha256"):
        await cache.ensure(qcow2_image)
    assert entries(tmp_path / "cache") == []
    assert cache.cached_ids() == []


async def test_once_verified_the_cache_is_used_without_hashing_again(
    qcow2_image: ImageRecord, image_dir: Path, tmp_path: Path
) -> None:
    cache = ImageCache(image_dir, tmp_path / "cache")
    first = await cache.ensure(qcow2_image)
    marker = tmp_path / "cache" / qcow2_image.id / ".verified"
    before = marker.stat().st_mtime_ns
    assert await ImageCache(image_dir, tmp_path / "cache").ensure(qcow2_image) == first
    assert marker.stat().st_mtime_ns == before


async def test_evict_removes_the_copy_but_not_the_image_store(
    qcow2_image: ImageRecord, image_dir: Path, tmp_path: Path
) -> None:
    cache = ImageCache(image_dir, tmp_path / "cache")
    await cache.ensure(qcow2_image)
    await cache.evict(qcow2_image.id)
    await cache.evict(qcow2_image.id)
    assert cache.cached_ids() == []
    assert entries(tmp_path / "cache") == []
    assert entries(image_dir / qcow2_image.id) == ["disk", "initrd", "kernel"]


async def test_an_image_deleted_from_the_store_cannot_be_cached(
    store: SqliteStore, qcow2_image: ImageRecord, image_dir: Path, tmp_path: Path
) -> None:
    await delete_image(store, image_dir, qcow2_image.id)
    with pytest.raises(NotFound, match="no disk file in the image store"):
        await ImageCache(image_dir, tmp_path / "cache").ensure(qcow2_image)
    assert entries(tmp_path / "cache") == []


@pytest.fixture
def other_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A directory on /dev/shm (tmpfs), another file system than tmp_path's."""
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's tmp_path")
    directory = Path(tempfile.mkdtemp(prefix="nubes-cache-test-", dir="/dev/shm"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_across_file_systems_the_cache_copies_and_verifies(
    qcow2_image: ImageRecord, image_dir: Path, other_filesystem: Path
) -> None:
    cached = await ImageCache(image_dir, other_filesystem).ensure(qcow2_image)
    stored = image_dir / qcow2_image.id / "disk"
    assert inode(cached.disk) != inode(stored)
    assert cached.disk.read_bytes() == stored.read_bytes()
    assert stat.S_IMODE(cached.disk.stat().st_mode) == 0o444
