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
    public: bool = Field(default=False, description="readable by every project (made by admins)")
    created_at: datetime


class ImageState(StrEnum):
    IMPORTING = "importing"
    ACTIVE = "active"
    FAILED = "failed"


class ImageStatus(Model):
    """How an image's import goes, written by the API process that runs it.

    It exists before the record does (an import in progress, bound to a lease so that it
    vanishes with a crashed API), and stays next to it once the image is active.
    """

    state: ImageState
    project: str
    name: str = Field(pattern=NAME_PATTERN)
    public: bool = False
    source: str
    file: str | None = Field(default=None, description="the file arriving: kernel, initrd or disk")
    bytes_done: int = Field(default=0, ge=0, description="of the file arriving")
    bytes_total: int | None = Field(default=None, description="of the file arriving, when known")
    code: str | None = Field(default=None, description="the error code of a failed import")
    reason: str | None = Field(default=None, description="why the import failed")
    updated_at: datetime
