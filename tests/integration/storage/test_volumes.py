"""Volume and root disk files: overlays on cached images, grown, never shrunk, idempotent."""

from __future__ import annotations

from pathlib import Path

import pytest

from nubes.agent.storage import qemu_img
from nubes.agent.storage.images import CachedImage, ImageCache, import_image
from nubes.agent.storage.volumes import (
    GIB,
    delete_volume,
    ensure_root_disk,
    ensure_volume,
    grow_volume,
    root_disk_path,
    volume_path,
)
from nubes.errors import Conflict, InvalidInput
from nubes.store.sqlite import SqliteStore
from tests.integration.storage.conftest import MIB, entries, make_qcow2

pytestmark = pytest.mark.integration

VOLUME_ID = "vol-test000001"


async def test_a_volume_is_an_overlay_on_the_cached_image_disk(
    cached_image: CachedImage, tmp_path: Path
) -> None:
    path = volume_path(tmp_path / "agent", VOLUME_ID)
    info = await ensure_volume(path, 1, cached_image)
    assert info.format == "qcow2"
    assert info.virtual_size == GIB
    assert info.backing_filename == str(cached_image.disk)
    assert info.backing_format == "qcow2"
    assert entries(path.parent) == [path.name]


async def test_ensuring_an_existing_volume_again_changes_nothing(
    cached_image: CachedImage, tmp_path: Path
) -> None:
    path = volume_path(tmp_path / "agent", VOLUME_ID)
    first = await ensure_volume(path, 1, cached_image)
    modified = path.stat().st_mtime_ns
    again = await ensure_volume(path, 1, cached_image)
    assert again.virtual_size == first.virtual_size
    assert path.stat().st_mtime_ns == modified


async def test_a_blank_volume_has_no_backing_file(tmp_path: Path) -> None:
    info = await ensure_volume(volume_path(tmp_path, VOLUME_ID), 2, None)
    assert info.backing_filename is None
    assert info.virtual_size == 2 * GIB


async def test_an_existing_volume_on_another_backing_file_is_a_conflict(
    cached_image: CachedImage, tmp_path: Path
) -> None:
    path = volume_path(tmp_path, VOLUME_ID)
    await ensure_volume(path, 1, None)
    with pytest.raises(Conflict, match="backing file"):
        await ensure_volume(path, 1, cached_image)


async def test_a_volume_smaller_than_its_image_is_refused_saying_how_large_it_must_be(
    store: SqliteStore, image_dir: Path, sources: Path, tmp_path: Path
) -> None:
    large = make_qcow2(sources / "large.qcow2", GIB + MIB)
    record = await import_image(store, image_dir, str(large), name="large")
    cached = await ImageCache(image_dir, tmp_path / "cache").ensure(record)
    path = volume_path(tmp_path / "agent", VOLUME_ID)
    with pytest.raises(InvalidInput, match="smaller than image") as caught:
        await ensure_volume(path, 1, cached)
    assert caught.value.hint == "ask for at least 2 GiB"
    assert not path.exists()


async def test_volumes_grow_offline_and_never_shrink(tmp_path: Path) -> None:
    path = volume_path(tmp_path, VOLUME_ID)
    await ensure_volume(path, 1, None)
    assert await grow_volume(path, 3, running=False) == 3 * GIB
    assert (await qemu_img.inspect(path, fmt="qcow2")).virtual_size == 3 * GIB
    with pytest.raises(InvalidInput, match="cannot shrink"):
        await grow_volume(path, 2, running=False)
    with pytest.raises(InvalidInput, match="cannot shrink"):
        await grow_volume(path, 2, running=True)
    assert (await qemu_img.inspect(path, fmt="qcow2")).virtual_size == 3 * GIB


async def test_growing_a_running_volume_only_gives_the_size_for_block_resize(
    tmp_path: Path,
) -> None:
    path = volume_path(tmp_path, VOLUME_ID)
    await ensure_volume(path, 1, None)
    assert await grow_volume(path, 4, running=True) == 4 * GIB
    assert (await qemu_img.inspect(path, fmt="qcow2")).virtual_size == GIB


async def test_ensure_volume_grows_a_smaller_existing_volume(tmp_path: Path) -> None:
    path = volume_path(tmp_path, VOLUME_ID)
    await ensure_volume(path, 1, None)
    assert (await ensure_volume(path, 2, None)).virtual_size == 2 * GIB
    with pytest.raises(Conflict, match="never shrink"):
        await ensure_volume(path, 1, None)


async def test_delete_volume_is_idempotent(tmp_path: Path) -> None:
    path = volume_path(tmp_path, VOLUME_ID)
    await ensure_volume(path, 1, None)
    await delete_volume(path)
    await delete_volume(path)
    assert entries(path.parent) == []


async def test_a_failed_create_leaves_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    with pytest.raises(Exception, match="qemu-img"):
        await qemu_img.create_blank(path, 1 << 62)  # over the qcow2 maximum
    assert entries(tmp_path) == []


async def test_a_root_disk_of_size_zero_takes_the_image_size(
    cached_image: CachedImage, tmp_path: Path
) -> None:
    path = root_disk_path(tmp_path, "i-test000001")
    info = await ensure_root_disk(path, cached_image, 0)
    assert info.virtual_size == cached_image.virtual_size == 64 * MIB
    assert info.backing_filename == str(cached_image.disk)
    assert (await ensure_root_disk(path, cached_image, 0)).virtual_size == 64 * MIB
    other = root_disk_path(tmp_path, "i-test000002")
    assert (await ensure_root_disk(other, cached_image, 2)).virtual_size == 2 * GIB
