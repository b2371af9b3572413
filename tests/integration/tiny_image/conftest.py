"""Fixtures for the tiny image tests: one fresh build per session in a temporary cache."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nubes.tinyimage.builder import BuildResult, build_tiny_image
from tests.support.guest_lab import GuestLab


@pytest.fixture(scope="session")
def tiny_image_cache() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="nubes-tiny-cache-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_image(tiny_image_cache: Path) -> BuildResult:
    """The image built from scratch (empty cache): the build's own figures are checked."""
    return build_tiny_image(tiny_image_cache)


@pytest.fixture
def lab(tiny_image: BuildResult) -> Iterator[GuestLab]:
    if os.geteuid() != 0:
        pytest.fail("the tiny image boot tests need root (namespaces, taps, dnsmasq)")
    with GuestLab(tiny_image.manifest, tiny_image.directory) as bed:
        yield bed
