"""The image manifest (what a built image is) and the cache key (what it is built from).

Both are pure: the key is a digest of the builder's version, the resolved package
versions and the content of the builder and guest files; the manifest is JSON.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FILE = "manifest.json"
_CHUNK = 1 << 20


class ImageFile(BaseModel):
    """One file of the image, named relative to the manifest's directory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Manifest(BaseModel):
    """A built tiny image: a qcow2 root disk booted directly with kernel, initrd and cmdline."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    format: Literal["qcow2"]
    architecture: str
    disk: ImageFile
    kernel: ImageFile
    initrd: ImageFile
    cmdline: str
    root_fs_uuid: str
    disk_virtual_size: int = Field(gt=0)
    kernel_release: str
    packages: dict[str, str]
    builder_version: str
    cache_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    source_date_epoch: int

    def files(self) -> tuple[ImageFile, ...]:
        return (self.disk, self.kernel, self.initrd)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def image_version(builder_version: str, cache_key: str) -> str:
    """A short version string that changes exactly when the cache key does."""
    return f"{builder_version}+{cache_key[:12]}"


def compute_cache_key(
    builder_version: str,
    packages: Mapping[str, str],
    builder_files: Mapping[str, str],
) -> str:
    """The digest that names a build: same inputs, same key; any input changed, new key.

    `packages` maps Debian package names to versions; `builder_files` maps the builder's
    and guest files' relative paths to the sha256 of their content.
    """
    document = {
        "builder_version": builder_version,
        "packages": dict(sorted(packages.items())),
        "builder_files": dict(sorted(builder_files.items())),
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_file(path: Path) -> ImageFile:
    """The manifest entry of a file that sits next to the manifest."""
    return ImageFile(path=path.name, sha256=sha256_of_file(path), size=path.stat().st_size)


def verify_files(manifest: Manifest, directory: Path) -> list[str]:
    """Problems with the image's files in DIRECTORY (missing or changed); empty when intact."""
    problems = []
    for entry in manifest.files():
        path = directory / entry.path
        if not path.is_file():
            problems.append(f"{entry.path} is missing")
        elif path.stat().st_size != entry.size or sha256_of_file(path) != entry.sha256:
            problems.append(f"{entry.path} does not match its sha256")
    return problems
