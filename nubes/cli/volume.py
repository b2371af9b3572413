"""`nubes volume ...`: block volumes, their snapshots, and reverting to one."""

from __future__ import annotations

from typing import Annotated

import typer

from nubes.cli.common import (
    OUTPUT,
    Ref,
    add_read_verbs,
    api,
    columns,
    field,
    label,
    say,
    show_many,
    show_one,
)
from nubes.cli.output import OutputFormat
from nubes.client.base import VOLUME

app = typer.Typer(name="volume", help="Block volumes.", no_args_is_help=True)
snapshot_app = typer.Typer(name="snapshot", help="Snapshots of a volume.", no_args_is_help=True)
app.add_typer(snapshot_app)

VOLUME_COLUMNS = columns(
    "id",
    "spec.name",
    ("size_gb", field("spec.size_gb")),
    ("state", field("status.state")),
    ("attached to", field("status.attached_to")),
)
SNAPSHOT_COLUMNS = columns("name", "state", "created_at")
Timeout = Annotated[float, typer.Option("--timeout", help="Seconds to wait at most.")]
add_read_verbs(app, VOLUME, VOLUME_COLUMNS)


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="The volume's name.")],
    size_gb: Annotated[
        int | None, typer.Option("--size", help="GiB (default: the image's size).")
    ] = None,
    image: Annotated[str | None, typer.Option("--image", help="Start from this image.")] = None,
    pool: Annotated[
        str | None, typer.Option("--pool", help="Storage pool (default: local).")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until it is available.")] = False,
    timeout: Timeout = 300.0,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Make a volume, empty (--size) or from an image (--image)."""
    with api(output) as client:
        made = client.create_volume(name, size_gb, image, pool)
        if wait:
            made = client.wait_volume(made["id"], "available", timeout)
        say(output, made, f"made volume {label(made)}")


@app.command("resize")
def resize(
    ref: Ref,
    size_gb: Annotated[int, typer.Option("--size", help="The new size in GiB (grows only).")],
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Grow a volume."""
    with api(output) as client:
        show_one("volume", client.resize_volume(ref, size_gb), output)


@app.command("wait")
def wait(
    ref: Ref,
    state: Annotated[str, typer.Option("--state", help="The state to wait for.")] = "available",
    timeout: Timeout = 300.0,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Wait until a volume reaches a state (fails at once if it goes to error)."""
    with api(output) as client:
        volume = client.wait_volume(ref, state, timeout)
        say(output, volume, f"volume {label(volume)} is {state}")


@app.command("revert")
def revert(
    ref: Ref,
    snapshot: Annotated[str, typer.Option("--snapshot", help="The snapshot's name.")],
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Put a volume back to a snapshot (the VM using it must be stopped)."""
    with api(output) as client:
        say(output, client.revert_volume(ref, snapshot), f"reverting {ref} to {snapshot}")


@snapshot_app.command("create")
def snapshot_create(
    volume: Ref,
    name: Annotated[str, typer.Argument(help="The snapshot's name.")],
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Take a snapshot of a volume."""
    with api(output) as client:
        say(output, client.create_snapshot(volume, name), f"snapshot {name} of {volume} wanted")


@snapshot_app.command("list")
def snapshot_list(volume: Ref, output: OUTPUT = OutputFormat.TEXT) -> None:
    """List a volume's snapshots."""
    with api(output) as client:
        show_many(f"snapshots of {volume}", client.list_snapshots(volume), output, SNAPSHOT_COLUMNS)


@snapshot_app.command("delete")
def snapshot_delete(
    volume: Ref,
    name: Annotated[str, typer.Argument(help="The snapshot's name.")],
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Delete a snapshot of a volume."""
    with api(output) as client:
        answer = client.delete_snapshot(volume, name)
        say(output, answer or {"name": name, "deleted": True}, f"deleting snapshot {name}")
