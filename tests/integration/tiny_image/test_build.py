"""Building the tiny image: size and time limits, cache hits, reproducible bytes."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from nubes.tinyimage.builder import BuildResult, build_tiny_image
from nubes.tinyimage.manifest import MANIFEST_FILE, verify_files

pytestmark = pytest.mark.integration

MAX_IMAGE_BYTES = 40 * 1000 * 1000
MAX_BUILD_SECONDS = 180


def test_a_fresh_build_is_small_and_fast(tiny_image: BuildResult) -> None:
    assert not tiny_image.cache_hit
    total = sum(entry.size for entry in tiny_image.manifest.files())
    assert total < MAX_IMAGE_BYTES, f"image is {total} bytes"
    assert tiny_image.seconds < MAX_BUILD_SECONDS
    assert verify_files(tiny_image.manifest, tiny_image.directory) == []


def test_the_manifest_records_the_package_versions_and_boot_line(tiny_image: BuildResult) -> None:
    manifest = tiny_image.manifest
    kernel_packages = [name for name in manifest.packages if name.startswith("linux-image-")]
    assert kernel_packages == [f"linux-image-{manifest.kernel_release}"]
    assert {"busybox-static", "dropbear-bin", "libc6"} <= set(manifest.packages)
    assert f"root=UUID={manifest.root_fs_uuid}" in manifest.cmdline
    assert "console=ttyS0" in manifest.cmdline
    on_disk = (tiny_image.directory / MANIFEST_FILE).read_text()
    assert on_disk == manifest.to_json()


def test_a_second_build_is_a_cache_hit_that_touches_nothing(
    tiny_image: BuildResult, tiny_image_cache: Path
) -> None:
    before = {path: path.stat().st_mtime_ns for path in tiny_image.directory.iterdir()}
    again = build_tiny_image(tiny_image_cache)
    assert again.cache_hit
    assert again.manifest == tiny_image.manifest
    assert again.directory == tiny_image.directory
    assert {path: path.stat().st_mtime_ns for path in again.directory.iterdir()} == before


def test_a_damaged_cached_image_is_rebuilt(tiny_image: BuildResult) -> None:
    cache = Path(tempfile.mkdtemp(prefix="nubes-tiny-damaged-"))
    try:
        first = build_tiny_image(cache)
        (first.directory / first.manifest.initrd.path).write_bytes(b"damaged")
        second = build_tiny_image(cache)
        assert not second.cache_hit
        assert verify_files(second.manifest, second.directory) == []
        # Same inputs, same bytes: the build is reproducible across cache directories.
        assert second.manifest == tiny_image.manifest
    finally:
        shutil.rmtree(cache, ignore_errors=True)
