"""Errors a user can cause when building the tiny image end with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

from nubes.tinyimage.builder import build_tiny_image
from nubes.tinyimage.errors import ImageBuildError


def test_an_unusable_cache_directory_is_a_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ImageBuildError, match=r"cannot use .* as the image cache") as caught:
        build_tiny_image(blocker / "cache")
    assert caught.value.hint is not None
    assert "--cache-dir" in caught.value.hint
