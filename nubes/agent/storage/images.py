"""The image store: import (fetch, hash, validate, publish, record), list and delete images,
and the per-host cache that VM disks are overlays on.

An image's files live in `<image_dir>/<img-id>/{disk,kernel,initrd}`, read-only; its record
is written only once they are there, and an import that fails leaves neither behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from nubes.agent.storage import qemu_img
from nubes.agent.storage.fetch import (
    ImageSource,
    Progress,
    check_source,
    describe_source,
    fetch,
)
from nubes.agent.storage.qemu_img import DiskInfo
from nubes.errors import CommandFailed, Conflict, ImageInvalid, InvalidInput, NotFound
from nubes.ids import IdKind, new_id, validate_id
from nubes.model.common import NAME_PATTERN, now
from nubes.model.image import ImageFile, ImageFormat, ImageRecord
from nubes.model.volume import MAX_VOLUME_GB
from nubes.store import Compare, Delete, Put, Store
from nubes.store.keys import Kind, kind_prefix, name_key, resource_key

GIB = 1 << 30
MIB = 1 << 20
ALLOWED_FORMATS = frozenset({ImageFormat.QCOW2.value, ImageFormat.RAW.value})
MAX_VIRTUAL_SIZE = MAX_VOLUME_GB * GIB
MAX_IMAGE_BYTES = 64 * GIB
MAX_KERNEL_BYTES = 256 * MIB
MAX_INITRD_BYTES = 1 * GIB
BZIMAGE_MAGIC = b"HdrS"
BZIMAGE_MAGIC_OFFSET = 0x202
_CONVERT_HINT = "convert it to qcow2 first: qemu-img convert -O qcow2 SOURCE image.qcow2"
_CHUNK = 1 << 20


def validate_disk(
    info: DiskInfo,
    file_size: int,
    *,
    max_virtual_size: int = MAX_VIRTUAL_SIZE,
    expected_format: str | None = None,
) -> None:
    """Refuse a disk nubes will not run: QEMU must never be led to open any other file.

    `info` is what `qemu-img info` probed; `expected_format`, when given, is what the
    user declared, and the probe must agree with it.

    Raises:
        ImageInvalid: a format other than qcow2/raw or than declared, a backing file, an
            external data file, encryption, a virtual size of 0 or over the maximum, or an
            empty raw file. The message says which, and the hint what to do.
    """
    if info.format not in ALLOWED_FORMATS:
        raise ImageInvalid(f"disk format {info.format!r} is not accepted", hint=_CONVERT_HINT)
    if expected_format is not None and info.format != expected_format:
        raise ImageInvalid(
            f"the disk was declared {expected_format} but qemu-img reads it as {info.format}",
            hint="declare the format the file really has",
        )
    if info.backing_filename is not None:
        raise ImageInvalid(
            f"the disk has a backing file ({info.backing_filename!r}): an image must be "
            "self-contained, never refer to other files",
            hint="flatten it first: qemu-img convert -O qcow2 SOURCE flat.qcow2",
        )
    if info.data_file is not None:
        raise ImageInvalid(
            f"the disk keeps its data in an external file ({info.data_file!r})",
            hint="flatten it first: qemu-img convert -O qcow2 SOURCE flat.qcow2",
        )
    if info.encrypted:
        raise ImageInvalid(
            "the disk is encrypted; nubes cannot hand keys to images",
            hint="decrypt it and convert it to plain qcow2",
        )
    if info.format == ImageFormat.RAW and file_size == 0:
        raise ImageInvalid("the raw disk file is empty", hint="import a file that holds a disk")
    if info.virtual_size <= 0:
        raise ImageInvalid("the disk has a virtual size of 0 bytes", hint="import a real disk")
    if info.virtual_size > max_virtual_size:
        raise ImageInvalid(
            f"the disk's virtual size of {info.virtual_size} bytes is over the maximum "
            f"of {max_virtual_size} bytes",
            hint="shrink the guest file system and the disk first",
        )


def validate_kernel(header: bytes, size: int) -> None:
    """Refuse a file that is not an x86 bzImage; `header` is at least its first 0x206 bytes.

    Raises:
        ImageInvalid: too large, or no "HdrS" magic at 0x202 (a vmlinux ELF, a
            compressed file, or not a kernel).
    """
    if size > MAX_KERNEL_BYTES:
        raise ImageInvalid(f"the kernel is {size} bytes, over the limit of {MAX_KERNEL_BYTES}")
    end = BZIMAGE_MAGIC_OFFSET + len(BZIMAGE_MAGIC)
    if len(header) < end or header[BZIMAGE_MAGIC_OFFSET:end] != BZIMAGE_MAGIC:
        raise ImageInvalid(
            "the kernel is not an x86 bzImage (no 'HdrS' at offset 0x202)",
            hint="give the distribution's vmlinuz, not a vmlinux or a compressed file",
        )


def validate_initrd(size: int) -> None:
    """Refuse an empty or oversized initrd.

    Raises:
        ImageInvalid: it is empty or over MAX_INITRD_BYTES.
    """
    if size == 0:
        raise ImageInvalid("the initrd is empty", hint="give the initrd the kernel boots with")
    if size > MAX_INITRD_BYTES:
        raise ImageInvalid(f"the initrd is {size} bytes, over the limit of {MAX_INITRD_BYTES}")


def check_import_request(
    source: ImageSource,
    name: str,
    kernel: ImageSource | None,
    initrd: ImageSource | None,
    cmdline: str | None,
) -> None:
    """Refuse an import that cannot succeed, before anything is fetched.

    Raises:
        InvalidInput: a bad name, an unsupported URL scheme, an initrd or cmdline without
            a kernel, or a cmdline over 4096 characters.
    """
    if not re.fullmatch(NAME_PATTERN, name):
        raise InvalidInput(
            f"{name!r} is not a valid image name",
            hint="1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    for given in (source, kernel, initrd):
        if isinstance(given, str):
            check_source(given)
    if kernel is None and (initrd is not None or cmdline is not None):
        raise InvalidInput("an initrd or a kernel command line needs a kernel", hint="add --kernel")
    if cmdline is not None and len(cmdline) > 4096:
        raise InvalidInput("the kernel command line is longer than 4096 characters")


Register = Callable[[ImageRecord], Awaitable[None]]
"""Writes the record of an image whose files are in place (with whatever guards it needs)."""


async def import_image(
    store: Store,
    image_dir: Path,
    source: ImageSource,
    *,
    name: str,
    project: str = "default",
    kernel: ImageSource | None = None,
    initrd: ImageSource | None = None,
    cmdline: str | None = None,
    progress: Progress | None = None,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_virtual_size: int = MAX_VIRTUAL_SIZE,
    disk_format: ImageFormat | None = None,
    image_id: str | None = None,
    public: bool = False,
    allow_hosts: Collection[str] | None = None,
    register: Register | None = None,
    on_file: Callable[[str], None] | None = None,
) -> ImageRecord:
    """Fetch, validate and register an image; sources are local paths, http(s) URLs or
    streams (an upload), read in the order kernel, initrd, disk.

    `progress` hears (bytes done, total or None) for each file in turn (kernel, initrd,
    then disk), counting from 0 for each. With `allow_hosts`, only URLs to those hosts are
    fetched (see fetch). `register` writes the record (default: a plain create). `on_file`
    hears the name of each file ("kernel", "initrd", "disk") as it starts. On any failure
    no file and no record remain.

    Raises:
        InvalidInput: a bad name or source (see check_import_request), a source that
            cannot be read or downloaded.
        ImportNotAllowed: `allow_hosts` refuses a URL.
        ImageInvalid: a file is larger than allowed (TooLarge), or a disk, kernel or initrd
            nubes will not run (see validate_disk, validate_kernel, validate_initrd).
        InvalidId: `image_id` is not an image id.
        Conflict: the id is taken already (practically never; import again).
        StoreUnavailable: the record cannot be written.
        NubesError: whatever `register` raises.
    """
    check_import_request(source, name, kernel, initrd, cmdline)
    if image_id is None:
        image_id = new_id(IdKind.IMAGE)
    validate_id(image_id, IdKind.IMAGE)
    staging = _make_staging(image_dir, f".import-{image_id}-")
    final = image_dir / image_id
    published = False
    try:
        kernel_file = initrd_file = None
        started = on_file or (lambda _name: None)
        if kernel is not None:
            started("kernel")
            kernel_file = await _fetch_kernel(kernel, staging / "kernel", progress, allow_hosts)
        if initrd is not None:
            started("initrd")
            fetched = await fetch(
                initrd,
                staging / "initrd",
                max_bytes=MAX_INITRD_BYTES,
                progress=progress,
                allow_hosts=allow_hosts,
            )
            validate_initrd(fetched.size)
            initrd_file = ImageFile(name="initrd", size=fetched.size, sha256=fetched.sha256)
        started("disk")
        fetched = await fetch(
            source,
            staging / "disk",
            max_bytes=max_bytes,
            progress=progress,
            allow_hosts=allow_hosts,
        )
        info = await _inspect_untrusted(staging / "disk")
        expected = None if disk_format is None else disk_format.value
        validate_disk(
            info, fetched.size, max_virtual_size=max_virtual_size, expected_format=expected
        )
        # Only now: check opens backing and data files, which validate_disk has ruled out.
        if info.format == ImageFormat.QCOW2:
            await _check_consistent(staging / "disk")
        record = ImageRecord(
            id=image_id,
            project=project,
            name=name,
            format=ImageFormat(info.format),
            virtual_size=info.virtual_size,
            disk=ImageFile(name="disk", size=fetched.size, sha256=fetched.sha256),
            kernel=kernel_file,
            initrd=initrd_file,
            cmdline=cmdline,
            source=describe_source(source),
            public=public,
            created_at=now(),
        )
        _publish(staging, final)
        published = True
        if register is not None:
            await register(record)
        else:
            key = resource_key(Kind.IMAGE, image_id)
            written = await store.txn([Compare.absent(key)], [Put(key, record.to_json())])
            if not written.succeeded:
                raise Conflict(f"image {image_id} exists already", hint="import it again")
    except BaseException:
        shutil.rmtree(final if published else staging, ignore_errors=True)
        raise
    return record


def _make_staging(parent: Path, prefix: str) -> Path:
    """A new empty directory in `parent`, 0700 so nothing in it is visible until published."""
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def _publish(staging: Path, final: Path) -> None:
    """Make the staged files read-only and move them to their final name in one rename."""
    for path in staging.iterdir():
        path.chmod(0o444)
    staging.chmod(0o755)
    staging.rename(final)


async def list_images(store: Store, *, project: str | None = None) -> list[ImageRecord]:
    """Every image record (of `project` when given), in id order.

    Raises:
        StoreUnavailable: the store cannot be reached.
    """
    listing = await store.range(kind_prefix(Kind.IMAGE))
    depth = kind_prefix(Kind.IMAGE).count("/")
    records = [ImageRecord.from_json(kv.value) for kv in listing.kvs if kv.key.count("/") == depth]
    return [record for record in records if project is None or record.project == project]


async def delete_image(store: Store, image_dir: Path, image_id: str) -> ImageRecord:
    """Remove an image's record, then its files; return the record removed.

    Hosts that cached the image keep their copy until they evict it.

    Raises:
        InvalidId: `image_id` is not an image id.
        NotFound: there is no such image (stray files of it are removed all the same).
        StoreUnavailable: the store cannot be reached.
    """
    validate_id(image_id, IdKind.IMAGE)
    key = resource_key(Kind.IMAGE, image_id)
    current = await store.get(key)
    if current is not None:
        deleted = await store.txn([Compare.unchanged(current)], [Delete(key)])
        if not deleted.succeeded:
            current = None
    remove_image_files(image_dir, image_id)
    if current is None:
        raise NotFound(f"image {image_id} does not exist")
    record = ImageRecord.from_json(current.value)
    # Names registered through the API are guarded; free the guard if it is this image's.
    guard = await store.get(name_key(Kind.IMAGE, record.project, record.name))
    if guard is not None and guard.value == image_id:
        await store.txn([Compare.unchanged(guard)], [Delete(guard.key)])
    return record


def remove_image_files(image_dir: Path, image_id: str) -> None:
    """Remove the image store's files of `image_id` (nothing when there are none).

    Raises:
        InvalidId: `image_id` is not an image id (so it never names another path).
    """
    validate_id(image_id, IdKind.IMAGE)
    shutil.rmtree(image_dir / image_id, ignore_errors=True)


async def _fetch_kernel(
    source: ImageSource,
    target: Path,
    progress: Progress | None,
    allow_hosts: Collection[str] | None = None,
) -> ImageFile:
    fetched = await fetch(
        source, target, max_bytes=MAX_KERNEL_BYTES, progress=progress, allow_hosts=allow_hosts
    )
    with target.open("rb") as stream:
        header = stream.read(BZIMAGE_MAGIC_OFFSET + len(BZIMAGE_MAGIC))
    validate_kernel(header, fetched.size)
    return ImageFile(name="kernel", size=fetched.size, sha256=fetched.sha256)


async def _inspect_untrusted(path: Path) -> DiskInfo:
    try:
        return await qemu_img.inspect(path)
    except CommandFailed as error:
        raise ImageInvalid(
            f"qemu-img cannot read the disk: {error.stderr or error.message}",
            hint="check that the file is a complete qcow2 or raw disk",
        ) from None


async def _check_consistent(path: Path) -> None:
    try:
        consistent = await qemu_img.check(path, fmt=ImageFormat.QCOW2.value)
    except CommandFailed as error:
        consistent = False
        detail = f": {error.stderr}" if error.stderr else ""
    else:
        detail = ""
    if not consistent:
        raise ImageInvalid(
            f"the qcow2 disk is damaged or truncated (qemu-img check){detail}",
            hint="download it again, or repair it with qemu-img check -r all",
        )


@dataclass(frozen=True)
class CachedImage:
    """An image's files in a host's cache: what VM disks are overlays on, and boot from."""

    id: str
    disk: Path
    format: ImageFormat
    virtual_size: int
    kernel: Path | None
    initrd: Path | None
    cmdline: str | None


_VERIFIED_MARKER = ".verified"


class ImageCache:
    """A host's copy of the images its VMs use: hard links into the image store when it is
    on the same file system, copies otherwise; verified against the record's sha256 once.
    """

    def __init__(self, image_dir: Path, cache_dir: Path) -> None:
        self.image_dir = image_dir
        self.cache_dir = cache_dir
        self._locks: dict[str, asyncio.Lock] = {}

    async def ensure(self, image: ImageRecord) -> CachedImage:
        """The image in the cache, put there and verified when it was not yet.

        Concurrent callers for one image wait for a single copy; a copy in progress is
        never visible under the image's cache directory.

        Raises:
            NotFound: a file of the image is missing from the image store.
            ImageInvalid: a file in the image store does not match its recorded sha256.
        """
        validate_id(image.id, IdKind.IMAGE)
        async with self._lock(image.id):
            directory = self.cache_dir / image.id
            marker = _marker_document(image)
            if _read_marker(directory) != marker:
                await asyncio.to_thread(self._fill, image, directory, marker)
        return _cached(image, directory)

    def cached_ids(self) -> list[str]:
        """The ids of the images in the cache (complete and verified), sorted."""
        if not self.cache_dir.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.cache_dir.iterdir()
            if not entry.name.startswith(".") and (entry / _VERIFIED_MARKER).is_file()
        )

    async def evict(self, image_id: str) -> None:
        """Drop an image from the cache (nothing when absent). The caller makes sure no
        disk is an overlay on it any more.

        Raises:
            InvalidId: `image_id` is not an image id.
        """
        validate_id(image_id, IdKind.IMAGE)
        async with self._lock(image_id):
            await asyncio.to_thread(_remove_tree, self.cache_dir / image_id)

    def _lock(self, image_id: str) -> asyncio.Lock:
        return self._locks.setdefault(image_id, asyncio.Lock())

    def _fill(self, image: ImageRecord, directory: Path, marker: str) -> None:
        _remove_tree(directory)  # an unverified leftover, never in use
        staging = _make_staging(self.cache_dir, f".fill-{image.id}-")
        try:
            for entry in _files_of(image):
                source = self.image_dir / image.id / entry.name
                target = staging / entry.name
                _link_or_copy(source, target, image.id)
                if _sha256_of(target) != entry.sha256:
                    raise ImageInvalid(
                        f"the {entry.name} file of image {image.id} does not match its sha256",
                        hint="the image store's copy is damaged or was changed: register "
                        "the image again",
                    )
                target.chmod(0o444)
            (staging / _VERIFIED_MARKER).write_text(marker)
            staging.chmod(0o755)
            try:
                staging.rename(directory)
            except OSError as error:
                # Another process on this host filled it first; its copy is as good.
                if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                if _read_marker(directory) != marker:
                    raise
                _remove_tree(staging)
        except BaseException:
            _remove_tree(staging)
            raise


def _files_of(image: ImageRecord) -> list[ImageFile]:
    return [entry for entry in (image.disk, image.kernel, image.initrd) if entry is not None]


def _marker_document(image: ImageRecord) -> str:
    return json.dumps({entry.name: entry.sha256 for entry in _files_of(image)}, sort_keys=True)


def _read_marker(directory: Path) -> str | None:
    try:
        return (directory / _VERIFIED_MARKER).read_text()
    except OSError:
        return None


def _cached(image: ImageRecord, directory: Path) -> CachedImage:
    return CachedImage(
        id=image.id,
        disk=directory / "disk",
        format=image.format,
        virtual_size=image.virtual_size,
        kernel=None if image.kernel is None else directory / "kernel",
        initrd=None if image.initrd is None else directory / "initrd",
        cmdline=image.cmdline,
    )


def _link_or_copy(source: Path, target: Path, image_id: str) -> None:
    try:
        os.link(source, target)
    except FileNotFoundError:
        raise NotFound(
            f"image {image_id} has no {source.name} file in the image store ({source})",
            hint="the image was deleted or never imported completely: register it again",
        ) from None
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copyfile(source, target)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _remove_tree(directory: Path) -> None:
    """Remove a cache directory so that it never looks complete while half gone."""
    with contextlib.suppress(FileNotFoundError):
        (directory / _VERIFIED_MARKER).unlink()
    shutil.rmtree(directory, ignore_errors=True)
