"""Cache keys and manifests of the tiny image."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from nubes.tinyimage.manifest import (
    ImageFile,
    Manifest,
    compute_cache_key,
    describe_file,
    image_version,
    verify_files,
)

PACKAGES = {"busybox-static": "1:1.35.0-4", "linux-image-6.1.0-56-cloud-amd64": "6.1.192-2"}
FILES = {"guest/rootfs/usr/lib/nubes/boot": "a" * 64, "builder.py": "b" * 64}


def test_the_cache_key_depends_only_on_the_inputs_not_their_order() -> None:
    key = compute_cache_key("1", PACKAGES, FILES)
    assert key == compute_cache_key("1", dict(reversed(PACKAGES.items())), FILES)
    assert len(key) == 64


@pytest.mark.parametrize(
    ("builder_version", "packages", "files"),
    [
        ("2", PACKAGES, FILES),
        ("1", {**PACKAGES, "busybox-static": "1:1.35.0-5"}, FILES),
        ("1", PACKAGES, {**FILES, "guest/rootfs/usr/lib/nubes/boot": "c" * 64}),
        ("1", {**PACKAGES, "zlib1g": "1.2"}, FILES),
    ],
)
def test_any_changed_input_changes_the_cache_key(
    builder_version: str, packages: dict[str, str], files: dict[str, str]
) -> None:
    assert compute_cache_key(builder_version, packages, files) != compute_cache_key(
        "1", PACKAGES, FILES
    )


def make_manifest(directory: Path) -> Manifest:
    for name in ("disk.qcow2", "vmlinuz", "initrd.img"):
        (directory / name).write_bytes(name.encode())
    key = compute_cache_key("1", PACKAGES, FILES)
    return Manifest(
        name="nubes-tiny",
        version=image_version("1", key),
        format="qcow2",
        architecture="x86_64",
        disk=describe_file(directory / "disk.qcow2"),
        kernel=describe_file(directory / "vmlinuz"),
        initrd=describe_file(directory / "initrd.img"),
        cmdline="console=ttyS0",
        root_fs_uuid="6e756265-732d-7469-6e79-2d726f6f7466",
        disk_virtual_size=1 << 20,
        kernel_release="6.1.0-56-cloud-amd64",
        packages=PACKAGES,
        builder_version="1",
        cache_key=key,
        source_date_epoch=0,
    )


def test_a_manifest_survives_its_json_and_checks_its_files(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path)
    assert Manifest.model_validate_json(manifest.to_json()) == manifest
    assert manifest.version.startswith("1+")
    assert manifest.version[2:] == manifest.cache_key[:12]
    assert verify_files(manifest, tmp_path) == []
    (tmp_path / "initrd.img").write_bytes(b"initrd.imX")  # same size, other content
    (tmp_path / "vmlinuz").unlink()
    assert verify_files(manifest, tmp_path) == [
        "vmlinuz is missing",
        "initrd.img does not match its sha256",
    ]


def test_file_entries_cannot_point_outside_the_image_directory() -> None:
    with pytest.raises(ValidationError):
        ImageFile(path="../etc/passwd", sha256="0" * 64, size=1)
