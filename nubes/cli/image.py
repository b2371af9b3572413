"""`nubes image ...`: upload, import, show, list and delete guest images through the API;
build the tiny one; `register`, `register-tiny` and `list`/`delete` without --api work on
this host's store directly (no API), for setup scripts.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from nubes.cli.common import Ref, api, columns, field, say, show_many, show_one
from nubes.cli.output import OutputFormat, OutputOption, print_json, print_table

if TYPE_CHECKING:
    from nubes.agent.storage.fetch import Progress as ProgressCallback
    from nubes.model.image import ImageRecord
    from nubes.tinyimage.builder import BuildResult

app = typer.Typer(name="image", help="Guest images.", no_args_is_help=True)

TINY_IMAGE_NAME = "nubes-tiny"
_CACHE_DIR_HELP = (
    "Where images are built and cached [default: $NUBES_CACHE_DIR/images/tiny "
    "or ${XDG_CACHE_HOME:-~/.cache}/nubes/images/tiny]."
)


@app.command("build-tiny")
def build_tiny(
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir",
            help=_CACHE_DIR_HELP,
        ),
    ] = None,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Build the nubes tiny guest image from Debian packages, or find it already built."""
    from nubes.tinyimage.builder import build_tiny_image, default_cache_directory

    result = build_tiny_image(cache_dir or default_cache_directory())
    if output is OutputFormat.JSON:
        document = {
            "cache_hit": result.cache_hit,
            "seconds": round(result.seconds, 3),
            "directory": str(result.directory),
            "manifest_path": str(result.manifest_path),
            "manifest": result.manifest.model_dump(mode="json"),
        }
        typer.echo(json.dumps(document, indent=2))
        return
    how = "cached" if result.cache_hit else f"built in {result.seconds:.1f} s"
    size = sum(entry.size for entry in result.manifest.files()) / (1 << 20)
    typer.echo(f"{result.manifest.name} {result.manifest.version} ({how}, {size:.1f} MiB)")
    typer.echo(f"manifest: {result.manifest_path}")


@app.command("register")
def register(
    source: Annotated[str, typer.Argument(help="The disk (qcow2 or raw): a file path or URL.")],
    name: Annotated[str, typer.Option("--name", help="The image's name.")],
    kernel: Annotated[
        str | None, typer.Option("--kernel", help="A bzImage to boot directly: path or URL.")
    ] = None,
    initrd: Annotated[
        str | None, typer.Option("--initrd", help="The initrd for --kernel: path or URL.")
    ] = None,
    cmdline: Annotated[
        str | None, typer.Option("--cmdline", help="The kernel command line for --kernel.")
    ] = None,
    project: Annotated[str, typer.Option("--project", help="The owning project.")] = "default",
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Import a disk image (and a kernel and initrd for direct boot) from files or http(s)."""
    with _progress_bar(enabled=output is OutputFormat.TEXT) as progress:
        record = asyncio.run(_register(source, name, kernel, initrd, cmdline, project, progress))
    _print_records([record], output, single=True)


@app.command("register-tiny")
def register_tiny(
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help=_CACHE_DIR_HELP)] = None,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Build (or find) the tiny image and register it, unless it is registered already."""
    from nubes.tinyimage.builder import build_tiny_image, default_cache_directory

    built = build_tiny_image(cache_dir or default_cache_directory())
    record = asyncio.run(_register_tiny(built))
    _print_records([record], output, single=True)


API_COLUMNS = columns(
    "id",
    "name",
    "format",
    ("size", lambda r: _human_size(int(r.get("virtual_size") or 0))),
    ("state", field("status.state")),
    "public",
)
_API_HELP = "Ask the API (your project's and the public images) instead of this host's store."


@app.command("list")
def list_command(
    through_api: Annotated[bool, typer.Option("--api", help=_API_HELP)] = False,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """List the images (this host's store, or the API's with --api)."""
    if through_api:
        with api(output) as client:
            show_many("images", client.list_images(), output, API_COLUMNS)
        return
    _print_records(asyncio.run(_list()), output, single=False)


@app.command("delete")
def delete(
    image_id: Annotated[
        str, typer.Argument(metavar="ID", help="The image's id (img-...), or name with --api.")
    ],
    through_api: Annotated[bool, typer.Option("--api", help=_API_HELP)] = False,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Delete an image: its record and its files (with --api, only when nothing uses it)."""
    if through_api:
        with api(output) as client:
            client.delete_image(image_id)
            say(output, {"id": image_id, "deleted": True}, f"deleted image {image_id}")
        return
    record = asyncio.run(_delete(image_id))
    if output is OutputFormat.JSON:
        print_json({"id": record.id, "deleted": True})
        return
    typer.echo(f"deleted {record.id} ({record.name})")


@app.command("show")
def show(ref: Ref, output: OutputOption = OutputFormat.TEXT) -> None:
    """Show an image the API knows."""
    with api(output) as client:
        show_one("image", client.get_image(ref), output)


@app.command("upload")
def upload(
    path: Annotated[Path, typer.Argument(help="The disk file (qcow2 or raw).")],
    name: Annotated[str, typer.Option("--name", help="The image's name.")],
    kernel: Annotated[
        Path | None, typer.Option("--kernel", help="A bzImage to boot directly.")
    ] = None,
    initrd: Annotated[
        Path | None, typer.Option("--initrd", help="The initrd for --kernel.")
    ] = None,
    cmdline: Annotated[
        str | None, typer.Option("--cmdline", help="The kernel command line for --kernel.")
    ] = None,
    disk_format: Annotated[
        str | None, typer.Option("--format", help="qcow2 or raw: refuse anything else.")
    ] = None,
    public: Annotated[
        bool, typer.Option("--public", help="Every project sees it (admin).")
    ] = False,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Upload an image file to the API, streamed with a progress bar."""
    with api(output) as client, _progress_bar(enabled=output is OutputFormat.TEXT) as progress:
        image = client.upload_image(
            name,
            path,
            kernel=kernel,
            initrd=initrd,
            cmdline=cmdline,
            disk_format=disk_format,
            public=public,
            progress=progress,
        )
        say(output, image, f"uploaded image {image['name']} ({image['id']})")


@app.command("import")
def import_command(
    url: Annotated[str, typer.Argument(help="The disk's http(s) URL.")],
    name: Annotated[str, typer.Option("--name", help="The image's name.")],
    kernel_url: Annotated[str | None, typer.Option("--kernel-url", help="A bzImage.")] = None,
    initrd_url: Annotated[str | None, typer.Option("--initrd-url", help="Its initrd.")] = None,
    cmdline: Annotated[str | None, typer.Option("--cmdline", help="Kernel command line.")] = None,
    disk_format: Annotated[
        str | None, typer.Option("--format", help="qcow2 or raw: refuse anything else.")
    ] = None,
    public: Annotated[
        bool, typer.Option("--public", help="Every project sees it (admin).")
    ] = False,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Return once the API has started the import.")
    ] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait.")] = 3600.0,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Have the API fetch an image from a URL; waits for it with a progress bar."""
    with api(output) as client:
        started = client.import_image(
            name,
            url,
            kernel_url=kernel_url,
            initrd_url=initrd_url,
            cmdline=cmdline,
            disk_format=disk_format,
            public=public,
        )
        if no_wait:
            say(output, started, f"importing image {name} ({started['id']})")
            return
        with _progress_bar(enabled=output is OutputFormat.TEXT) as progress:

            def report(state: dict[str, Any]) -> None:
                done, total = state.get("bytes_done"), state.get("bytes_total")
                if progress is not None and isinstance(done, int):
                    progress(done, total if isinstance(total, int) else None)

            image = client.wait_import(started["id"], timeout, progress=report)
        say(output, image, f"imported image {image['name']} ({image['id']})")


@app.command("import-status")
def import_status(
    image_id: Annotated[str, typer.Argument(metavar="ID", help="The import's img- id.")],
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """How an import goes: state, bytes so far, and why it failed."""
    with api(output) as client:
        show_one("import", client.image_import(image_id), output)


async def _register(
    source: str,
    name: str,
    kernel: str | None,
    initrd: str | None,
    cmdline: str | None,
    project: str,
    progress: ProgressCallback | None,
) -> ImageRecord:
    from nubes.agent.storage.images import import_image
    from nubes.config import load_config
    from nubes.store import open_store

    config = load_config()
    async with await open_store(config) as store:
        return await import_image(
            store,
            config.image_dir,
            source,
            name=name,
            project=project,
            kernel=kernel,
            initrd=initrd,
            cmdline=cmdline,
            progress=progress,
        )


async def _register_tiny(built: BuildResult) -> ImageRecord:
    from nubes.agent.storage.images import import_image, list_images
    from nubes.config import load_config
    from nubes.store import open_store

    config = load_config()
    manifest = built.manifest
    async with await open_store(config) as store:
        for record in await list_images(store):
            if record.name == TINY_IMAGE_NAME and record.disk.sha256 == manifest.disk.sha256:
                return record
        return await import_image(
            store,
            config.image_dir,
            str(built.directory / manifest.disk.path),
            name=TINY_IMAGE_NAME,
            kernel=str(built.directory / manifest.kernel.path),
            initrd=str(built.directory / manifest.initrd.path),
            cmdline=manifest.cmdline,
        )


async def _list() -> list[ImageRecord]:
    from nubes.agent.storage.images import list_images
    from nubes.config import load_config
    from nubes.store import open_store

    async with await open_store(load_config()) as store:
        return await list_images(store)


async def _delete(image_id: str) -> ImageRecord:
    from nubes.agent.storage.images import delete_image
    from nubes.config import load_config
    from nubes.store import open_store

    config = load_config()
    async with await open_store(config) as store:
        return await delete_image(store, config.image_dir, image_id)


@contextmanager
def _progress_bar(*, enabled: bool) -> Iterator[ProgressCallback | None]:
    """A progress callback drawing a bar on stderr (stdout stays for the result)."""
    if not enabled:
        yield None
        return
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("fetching", total=None)

        def report(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield report


def _print_records(records: list[ImageRecord], output: OutputFormat, *, single: bool) -> None:
    if output is OutputFormat.JSON:
        documents = [record.to_json() for record in records]
        print_json(documents[0] if single else documents)
        return
    print_table(
        "image" if single else "images",
        ["id", "name", "format", "size", "boots from"],
        [
            (
                record.id,
                record.name,
                record.format.value,
                _human_size(record.virtual_size),
                "kernel" if record.kernel else "disk",
            )
            for record in records
        ],
    )


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.4g} {unit}"
        value /= 1024
    return f"{value:.4g} TiB"
