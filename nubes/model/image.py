"""The image record: a registered disk image and, for direct kernel boot, its kernel files."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

from nubes.model.common import NAME_PATTERN, Model


class ImageFormat(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"


class ImageFile(Model):
    """One file of an image, as kept in the image store under the image's id."""

    name: str = Field(pattern=r"^(disk|kernel|initrd)$")
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ImageRecord(Model):
    """Written once the files are in the image store and validated; never changes after."""

    id: str
    project: str = "default"
    name: str = Field(pattern=NAME_PATTERN)
    format: ImageFormat
    virtual_size: int = Field(ge=1, description="bytes the guest sees")
    disk: ImageFile
    kernel: ImageFile | None = None
    initrd: ImageFile | None = None
    cmdline: str | None = Field(default=None, max_length=4096)
    source: str = Field(description="where it was imported from (a file name or URL), for people")
    created_at: datetime
