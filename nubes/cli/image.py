"""`nubes image ...`: commands about guest images; today, building the tiny demo image."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from nubes.tinyimage.builder import build_tiny_image, default_cache_directory

app = typer.Typer(name="image", help="Guest images.", no_args_is_help=True)


class OutputFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


@app.command("build-tiny")
def build_tiny(
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir",
            help="Where images are built and cached [default: $NUBES_CACHE_DIR/images/tiny "
            "or ${XDG_CACHE_HOME:-~/.cache}/nubes/images/tiny].",
        ),
    ] = None,
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", help="Output format.")
    ] = OutputFormat.TEXT,
) -> None:
    """Build the nubes tiny guest image from Debian packages, or find it already built."""
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
