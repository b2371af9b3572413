"""Fetch an image file from a local path, an http(s) URL or an upload's byte stream into a
new file, hashing it on the way.

The size limit is enforced while the bytes flow, so neither a lying Content-Length nor a
compressed response can fill the disk; other URL schemes are refused before any I/O, and
with an allow-list every hop of a download (redirects too) must go to an allowed host.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import stat
from collections.abc import AsyncIterable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit, urlunsplit

import httpx

from nubes.errors import ImageInvalid, InvalidInput, NubesError

Progress = Callable[[int, int | None], None]
"""Called with (bytes done, bytes in all or None when unknown) as a file arrives."""

ALLOWED_SCHEMES = frozenset({"http", "https"})
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
_CHUNK = 1 << 20
_HTTP_TIMEOUT = httpx.Timeout(30.0)


IMPORT_ALLOW_HINT = (
    "an admin lists the hosts images may come from in the settings: "
    'import_allow = ["images.example.org"] in the [api] section ("*" allows any host)'
)


class TooLarge(ImageInvalid):
    """An image file is larger than the limit (HTTP 413)."""

    code = "too_large"
    http_status = 413


class ImportNotAllowed(NubesError):
    """A URL's host is not one images may be imported from on this cloud."""

    code = "import_not_allowed"
    http_status = 403


@dataclass(frozen=True)
class Fetched:
    size: int
    sha256: str


@dataclass(frozen=True)
class StreamSource:
    """Bytes that arrive from elsewhere (an upload's body): fetched like a path or a URL.

    `total` is the size announced for progress reports, when known.
    """

    chunks: AsyncIterable[bytes]
    description: str = "upload"
    total: int | None = None


ImageSource = str | StreamSource
"""Where a file of an image comes from: a local path, an http(s) URL, or a stream."""


def is_url(source: str) -> bool:
    """True when `source` is written as a URL (`scheme://...`), whatever the scheme."""
    return _URL.match(source) is not None


def check_source(source: str) -> None:
    """Refuse a source that is neither a plain path nor an http(s) URL, before any I/O.

    Raises:
        InvalidInput: an empty source, or a URL of another scheme (file://, ftp://, ...).
    """
    if not source:
        raise InvalidInput("an image source is a file path or an http(s) URL, got nothing")
    match = _URL.match(source)
    if match is not None and match.group("scheme").lower() not in ALLOWED_SCHEMES:
        raise InvalidInput(
            f"the URL scheme {match.group('scheme')!r} is not supported",
            hint="give an http:// or https:// URL, or the path of a local file",
        )


def check_url_allowed(url: str, allow_hosts: Collection[str]) -> None:
    """Refuse anything but an http(s) URL whose host is in `allow_hosts` ("*" allows any).

    Raises:
        InvalidInput: `url` is not an http(s) URL.
        ImportNotAllowed: `allow_hosts` is empty, or does not hold the URL's host.
    """
    if not is_url(url):
        raise InvalidInput(
            f"{url!r} is not a URL", hint="give an http:// or https:// URL of the image"
        )
    check_source(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing it is the check
    except ValueError as error:
        raise InvalidInput(f"the URL cannot be read: {error}", hint="correct the URL") from None
    host = (parts.hostname or "").lower().rstrip(".")
    allowed = {entry.lower().rstrip(".") for entry in allow_hosts}
    if not allowed:
        raise ImportNotAllowed(
            "importing images from URLs is turned off on this cloud", hint=IMPORT_ALLOW_HINT
        )
    if "*" not in allowed and host not in allowed:
        raise ImportNotAllowed(
            f"images may not be imported from {host or 'a URL without a host'} "
            f"(allowed: {', '.join(sorted(allowed))})",
            hint="upload the file instead, or " + IMPORT_ALLOW_HINT,
        )


def describe_source(source: ImageSource) -> str:
    """`source` as recorded for people: a URL loses its credentials, query and fragment
    (a presigned URL's token must not end up in the store); a path becomes absolute."""
    if isinstance(source, StreamSource):
        return source.description
    if not is_url(source):
        return str(Path(source).absolute())
    parts = urlsplit(source)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


async def fetch(
    source: ImageSource,
    target: Path,
    *,
    max_bytes: int,
    progress: Progress | None = None,
    allow_hosts: Collection[str] | None = None,
) -> Fetched:
    """Copy, download or receive `source` into the new file `target` (mode 0600), returning
    its size and sha256. On failure `target` is removed.

    With `allow_hosts` (None: no restriction), only an http(s) URL whose host, and the host
    of every redirect, is in it is fetched: never a local path.

    Raises:
        InvalidInput: the scheme is not http(s); the local file does not exist or is not a
            regular file; the server cannot be reached or answers other than 200.
        ImportNotAllowed: `allow_hosts` does not allow the URL or a redirect's target.
        TooLarge: the file is larger than `max_bytes` (an ImageInvalid).
        Exception: whatever the stream of a StreamSource raises.
    """
    if isinstance(source, str):
        check_source(source)
        if allow_hosts is not None:
            check_url_allowed(source, allow_hosts)
    try:
        with _create(target) as output:
            if isinstance(source, StreamSource):
                return await _receive(source, output, max_bytes, progress)
            if is_url(source):
                return await _download(source, output, max_bytes, progress, allow_hosts)
            return await _copy(Path(source), output, max_bytes, progress)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        raise


def _create(target: Path) -> BinaryIO:
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    return os.fdopen(descriptor, "wb")


async def _receive(
    source: StreamSource, output: BinaryIO, max_bytes: int, progress: Progress | None
) -> Fetched:
    if source.total is not None and source.total > max_bytes:
        raise _too_large(source.description, max_bytes)
    digest = hashlib.sha256()
    done = 0
    async for chunk in source.chunks:
        done += len(chunk)
        if done > max_bytes:
            raise _too_large(source.description, max_bytes)
        digest.update(chunk)
        await asyncio.to_thread(output.write, chunk)
        if progress is not None:
            progress(done, source.total)
    return Fetched(done, digest.hexdigest())


async def _download(
    url: str,
    output: BinaryIO,
    max_bytes: int,
    progress: Progress | None,
    allow_hosts: Collection[str] | None = None,
) -> Fetched:
    shown = describe_source(url)
    digest = hashlib.sha256()
    done = 0

    async def check_hop(request: httpx.Request) -> None:
        # Every request, redirects included: an allowed host must not bounce us elsewhere.
        if allow_hosts is not None:
            check_url_allowed(str(request.url), allow_hosts)

    try:
        async with (
            httpx.AsyncClient(
                follow_redirects=True,
                timeout=_HTTP_TIMEOUT,
                event_hooks={"request": [check_hop]},
            ) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != httpx.codes.OK:
                raise InvalidInput(
                    f"{shown} answered HTTP {response.status_code} {response.reason_phrase}",
                    hint="check the URL",
                )
            total = _content_length(response)
            if total is not None and total > max_bytes:
                raise _too_large(shown, max_bytes)
            async for chunk in response.aiter_bytes(_CHUNK):
                done += len(chunk)
                if done > max_bytes:
                    raise _too_large(shown, max_bytes)
                digest.update(chunk)
                output.write(chunk)
                if progress is not None:
                    progress(done, total)
    except httpx.HTTPError as error:
        raise InvalidInput(
            f"cannot download {shown}: {error or type(error).__name__}",
            hint="check the URL and that this machine can reach it",
        ) from None
    return Fetched(done, digest.hexdigest())


def _content_length(response: httpx.Response) -> int | None:
    """The size the body will have once decoded, when the headers tell it."""
    if response.headers.get("content-encoding", "identity") != "identity":
        return None
    try:
        length = int(response.headers["content-length"])
    except (KeyError, ValueError):
        return None
    return length if length >= 0 else None


async def _copy(path: Path, output: BinaryIO, max_bytes: int, progress: Progress | None) -> Fetched:
    try:
        source = path.open("rb")
    except FileNotFoundError:
        raise InvalidInput(
            f"{path} does not exist", hint="give the path of an image file"
        ) from None
    except OSError as error:
        raise InvalidInput(f"cannot read {path}: {error.strerror}") from None
    with source:
        # Checked on the open file, so that what is read is what was checked.
        status = os.fstat(source.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise InvalidInput(
                f"{path} is not a regular file", hint="give the path of an image file"
            )
        if status.st_size > max_bytes:
            raise _too_large(str(path), max_bytes)
        digest = hashlib.sha256()
        done = 0
        while chunk := await asyncio.to_thread(_copy_chunk, source, output, digest):
            done += chunk
            if done > max_bytes:  # the file grew while we read it
                raise _too_large(str(path), max_bytes)
            if progress is not None:
                progress(done, status.st_size)
    return Fetched(done, digest.hexdigest())


def _copy_chunk(source: BinaryIO, output: BinaryIO, digest: hashlib._Hash) -> int:
    chunk = source.read(_CHUNK)
    digest.update(chunk)
    output.write(chunk)
    return len(chunk)


def _too_large(shown: str, max_bytes: int) -> TooLarge:
    return TooLarge(
        f"{shown} is larger than the limit of {max_bytes} bytes",
        hint="use a smaller file, or raise the limit",
    )
