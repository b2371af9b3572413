"""Fixtures for the storage tests: a SQLite store, disk files made with the real qemu-img,
and a local HTTP server to import from; everything lives under the test's tmp_path."""

from __future__ import annotations

import functools
import http.server
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nubes.agent.storage.images import CachedImage, ImageCache, import_image
from nubes.model.image import ImageRecord
from nubes.store.keys import Kind, kind_prefix
from nubes.store.sqlite import SqliteStore

MIB = 1 << 20


def qemu_img(*argv: str) -> str:
    return subprocess.run(["qemu-img", *argv], check=True, capture_output=True, text=True).stdout


def qemu_io(path: Path, command: str) -> subprocess.CompletedProcess[str]:
    """Runs one qemu-io command on a qcow2 (a read whose pattern mismatches exits 1)."""
    return subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, str(path)],
        check=False,
        capture_output=True,
        text=True,
    )


def make_qcow2(path: Path, size: int = 64 * MIB) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", str(path), str(size))
    return path


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def make_bzimage(path: Path, size: int = 8192) -> Path:
    """A file with the bzImage header magic: all validation looks at (it never boots)."""
    content = bytearray(size)
    content[0x202:0x206] = b"HdrS"
    path.write_bytes(bytes(content))
    return path


def entries(directory: Path) -> list[str]:
    """The names in `directory`, sorted; none when it does not exist."""
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


async def image_records(store: SqliteStore) -> list[str]:
    return [kv.key for kv in (await store.range(kind_prefix(Kind.IMAGE))).kvs]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "db")
    yield opened
    await opened.close()


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    return tmp_path / "images"


@pytest.fixture
async def qcow2_image(store: SqliteStore, image_dir: Path, sources: Path) -> ImageRecord:
    """A registered 64 MiB qcow2 image with a kernel and an initrd."""
    return await import_image(
        store,
        image_dir,
        str(make_qcow2(sources / "base.qcow2")),
        name="base",
        kernel=str(make_bzimage(sources / "vmlinuz")),
        initrd=str(write(sources / "initrd", b"070701" + bytes(100))),
        cmdline="console=ttyS0",
    )


@pytest.fixture
async def cached_image(qcow2_image: ImageRecord, image_dir: Path, tmp_path: Path) -> CachedImage:
    return await ImageCache(image_dir, tmp_path / "cache").ensure(qcow2_image)


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    directory = tmp_path / "sources"
    directory.mkdir()
    return directory


@dataclass(frozen=True)
class HttpServer:
    root: Path
    base_url: str

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server(sources: Path) -> Iterator[HttpServer]:
    """Serves `sources` on 127.0.0.1 at a free port; shut down after the test."""
    handler = functools.partial(_QuietHandler, directory=str(sources))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="test-http", daemon=True
    )
    thread.start()
    try:
        yield HttpServer(sources, f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
