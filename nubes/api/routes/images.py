"""Images: upload a disk (streamed into the image store), import one from an allowed URL
(polled for progress), list, get and delete; a project sees its own and the public ones.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import Field
from starlette.requests import ClientDisconnect

from nubes.agent.storage.fetch import StreamSource, TooLarge, check_url_allowed, describe_source
from nubes.agent.storage.images import (
    MAX_INITRD_BYTES,
    MAX_KERNEL_BYTES,
    check_import_request,
    remove_image_files,
)
from nubes.api.app import ErrorBody
from nubes.api.context import Caller, CallerDep, ContextDep
from nubes.api.imageops import (
    BodyParts,
    ImportJob,
    find_image,
    image_users,
    max_image_bytes,
    public_name_claim,
)
from nubes.api.netops import references_key, references_snapshot
from nubes.api.params import CursorQuery, LimitQuery
from nubes.api.records import DEFAULT_PAGE, Guards, Records, not_found
from nubes.errors import Conflict, Forbidden, InvalidInput
from nubes.ids import IdKind, is_id
from nubes.model.common import NAME_PATTERN, Model
from nubes.model.image import ImageFormat, ImageRecord, ImageState, ImageStatus
from nubes.store.base import Delete
from nubes.store.keys import Kind, name_key, status_key

router = APIRouter(tags=["images"])

_TOO_LARGE: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorBody, "description": "a file is larger than this cloud accepts"}
}
_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "the kernel's bytes (when kernel_size is given), then the initrd's "
        "(when initrd_size is given), then the disk's, back to back",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


class ImageView(ImageRecord):
    status: ImageStatus | None = None


class ImagePage(Model):
    items: list[ImageView]
    next: str | None = None


class ImageImportCreate(Model):
    name: str = Field(pattern=NAME_PATTERN)
    url: str = Field(min_length=1, max_length=4096, description="http(s) URL of the disk")
    kernel_url: str | None = Field(default=None, max_length=4096, description="a bzImage")
    initrd_url: str | None = Field(default=None, max_length=4096)
    cmdline: str | None = Field(default=None, max_length=4096)
    format: ImageFormat | None = Field(default=None, description="refuse any other format")
    public: bool = Field(default=False, description="readable by every project (admin)")


class ImageImportView(Model):
    """An import's progress: poll it until `state` is not `importing`."""

    id: str = Field(description="the img- id the image has once active")
    state: ImageState
    name: str
    project: str
    public: bool
    source: str
    file: str | None = Field(description="the file arriving: kernel, initrd or disk")
    bytes_done: int
    bytes_total: int | None
    code: str | None = Field(description="the error code when failed")
    reason: str | None = Field(description="why it failed")
    updated_at: datetime
    image: ImageView | None = Field(default=None, description="the image, once active")


def _import_view(image_id: str, status: ImageStatus, image: ImageView | None) -> ImageImportView:
    return ImageImportView(id=image_id, image=image, **status.model_dump())


@router.post("/images", status_code=201, responses=_TOO_LARGE, openapi_extra=_UPLOAD_BODY)
async def upload_image(
    request: Request,
    ctx: ContextDep,
    caller: CallerDep,
    name: Annotated[str, Query(pattern=NAME_PATTERN)],
    disk_format: Annotated[
        ImageFormat | None, Query(alias="format", description="refuse any other format")
    ] = None,
    kernel_size: Annotated[int | None, Query(ge=1, le=MAX_KERNEL_BYTES)] = None,
    initrd_size: Annotated[int | None, Query(ge=1, le=MAX_INITRD_BYTES)] = None,
    cmdline: Annotated[str | None, Query(max_length=4096)] = None,
    public: bool = False,
) -> ImageView:
    """Upload an image: the body streams the disk (after the kernel and initrd, if any)."""
    if public:
        caller.require_admin("make public images")
    if kernel_size is None and (initrd_size is not None or cmdline is not None):
        raise InvalidInput(
            "an initrd or a kernel command line needs a kernel",
            hint="send kernel_size and put the kernel's bytes first in the body",
        )
    limit = max_image_bytes(ctx)
    length = _content_length(request)
    parts_size = (kernel_size or 0) + (initrd_size or 0)
    disk_total = None if length is None else length - parts_size
    if disk_total is not None and disk_total <= 0:
        raise InvalidInput(
            "the body holds no disk after the kernel and initrd",
            hint="kernel_size and initrd_size are the sizes of the files sent before the disk",
        )
    if disk_total is not None and disk_total > limit:
        raise TooLarge(
            f"the disk is {disk_total} bytes, larger than the limit of {limit} bytes",
            hint="use a smaller disk (qemu-img convert -c compresses a qcow2)",
        )
    job = ImportJob(ctx, caller, name, source="upload", public=public)
    await job.begin()
    body = BodyParts(request.stream())
    try:
        record = await job.run(
            StreamSource(body.rest(), "the uploaded disk", disk_total),
            kernel=None
            if kernel_size is None
            else StreamSource(body.take(kernel_size, "kernel"), "the kernel", kernel_size),
            initrd=None
            if initrd_size is None
            else StreamSource(body.take(initrd_size, "initrd"), "the initrd", initrd_size),
            cmdline=cmdline,
            disk_format=disk_format,
        )
    except ClientDisconnect:
        await job.discard()
        raise InvalidInput(
            "the upload was cut off before the end", hint="send the image again"
        ) from None
    except BaseException:
        await job.discard()
        raise
    await job.finish()
    return ImageView(**record.model_dump(), status=job.status(ImageState.ACTIVE))


@router.post("/images/import", status_code=202, responses=_TOO_LARGE)
async def import_image_from_url(
    body: ImageImportCreate, ctx: ContextDep, caller: CallerDep
) -> ImageImportView:
    """Import an image from URLs on an allowed host; poll GET /images/imports/{id}."""
    if body.public:
        caller.require_admin("make public images")
    check_import_request(body.url, body.name, body.kernel_url, body.initrd_url, body.cmdline)
    for url in (body.url, body.kernel_url, body.initrd_url):
        if url is not None:
            check_url_allowed(url, ctx.import_allow)
    job = ImportJob(ctx, caller, body.name, source=describe_source(body.url), public=body.public)
    status = await job.begin()
    job.start_in_background(
        body.url,
        kernel=body.kernel_url,
        initrd=body.initrd_url,
        cmdline=body.cmdline,
        disk_format=body.format,
        allow_hosts=ctx.import_allow,
    )
    return _import_view(job.image_id, status, None)


@router.get("/images/imports/{image_id}")
async def get_image_import(image_id: str, ctx: ContextDep, caller: CallerDep) -> ImageImportView:
    """How an import goes (kept an hour after it failed)."""
    records = Records(ctx.store)
    status = (
        await records.status(Kind.IMAGE, ImageStatus, image_id) if _is_image_id(image_id) else None
    )
    if status is None or status.project != caller.project:
        raise not_found(Kind.IMAGE, image_id)
    image = None
    if status.state is ImageState.ACTIVE:
        _, record = await find_image(ctx.store, caller, image_id)
        image = ImageView(**record.model_dump(), status=status)
    return _import_view(image_id, status, image)


@router.get("/images")
async def list_images(
    ctx: ContextDep,
    caller: CallerDep,
    limit: LimitQuery = DEFAULT_PAGE,
    cursor: CursorQuery = None,
    name: Annotated[str | None, Query(max_length=64)] = None,
    public: Annotated[bool | None, Query(description="only public (true) or own (false)")] = None,
) -> ImagePage:
    """The project's images and the public ones, by id."""

    def keep(record: ImageRecord) -> bool:
        if record.project != caller.project and not record.public:
            return False
        if public is not None and record.public != public:
            return False
        return name is None or record.name == name

    items, following = await Records(ctx.store).page(
        Kind.IMAGE,
        ImageRecord,
        None,
        limit=limit,
        cursor=cursor,
        keep=keep,
        status_model=ImageStatus,
    )
    return ImagePage(
        items=[ImageView(**record.model_dump(), status=status) for record, status in items],
        next=following,
    )


@router.get("/images/{image}")
async def get_image(image: str, ctx: ContextDep, caller: CallerDep) -> ImageView:
    """One image, by id or name."""
    _, record = await find_image(ctx.store, caller, image)
    status = await Records(ctx.store).status(Kind.IMAGE, ImageStatus, record.id)
    return ImageView(**record.model_dump(), status=status)


@router.delete("/images/{image}", status_code=204)
async def delete_image(image: str, ctx: ContextDep, caller: CallerDep) -> Response:
    """Delete an image no volume or VM uses (public ones: admin); or a failed import."""
    records = Records(ctx.store)
    if _is_image_id(image) and await _forget_failed_import(records, caller, image):
        return Response(status_code=204)
    kv, record = await find_image(ctx.store, caller, image)
    if record.public and not caller.is_admin:
        raise Forbidden(
            f"image {record.name} is public: only an admin may delete it",
            hint="ask an admin of this cloud",
        )
    # Read before looking for users: a VM or volume made meanwhile changes it, and the
    # delete below then fails instead of leaving them on an image without files.
    referenced = await references_snapshot(ctx.store, record.id)
    users = await image_users(ctx.store, record.id)
    if users:
        shown = ", ".join(users[:5]) + (" ..." if len(users) > 5 else "")
        raise Conflict(
            f"image {record.name} ({record.id}) is used by {shown}",
            hint="delete those volumes and VMs first",
        )
    released: list[str] = []
    for key in (name_key(Kind.IMAGE, record.project, record.name), public_name_claim(record.name)):
        guard = await ctx.store.get(key)
        if guard is not None and guard.value == record.id:
            released.append(key)
    guards = Guards(
        released_names=released,
        compares=[referenced],
        operations=[Delete(references_key(record.id))],
    )
    if await records.remove(caller, kv, guards) is None:
        raise Conflict(f"image {record.id} changed while it was being deleted", hint="try again")
    remove_image_files(ctx.image_dir, record.id)
    return Response(status_code=204)


async def _forget_failed_import(records: Records, caller: Caller, image_id: str) -> bool:
    status_kv = await records.store.get(status_key(Kind.IMAGE, image_id))
    if status_kv is None:
        return False
    status = ImageStatus.from_json(status_kv.value)
    if status.state is not ImageState.FAILED or status.project != caller.project:
        return False
    await records.store.delete(status_kv.key)
    return True


def _is_image_id(value: str) -> bool:
    return is_id(value, IdKind.IMAGE)


def _content_length(request: Request) -> int | None:
    try:
        length = int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None
    return length if length >= 0 else None
