"""`nubes store copy`: moves the cloud's state from the configured store (the SQLite file
of a one-machine cloud) into an empty etcd cluster, the first step to adding hosts."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from nubes.cli.common import reporting
from nubes.cli.output import OutputFormat, OutputOption, print_json

app = typer.Typer(
    name="store", help="The store that holds the cloud's state.", no_args_is_help=True
)


@app.command("copy")
def copy(
    to: Annotated[
        str,
        typer.Option(
            "--to",
            metavar="ENDPOINTS",
            help="The etcd cluster's client endpoints, comma-separated address:port.",
        ),
    ],
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Copy every record of the configured store into an empty etcd cluster.

    Stop every nubes daemon first; afterwards set [store] engine = "etcd" and the
    endpoints in nubes.toml on every host, and start the daemons again.
    """
    endpoints = [part.strip() for part in to.split(",") if part.strip()]
    with reporting(output):
        copied, skipped = asyncio.run(_copy(endpoints))
    if output is OutputFormat.JSON:
        print_json({"copied": copied, "leased_skipped": skipped, "endpoints": endpoints})
        return
    typer.echo(f"copied {copied} records to etcd at {', '.join(endpoints)}")
    typer.echo('now set [store] engine = "etcd" and these endpoints in nubes.toml on every host')


async def _copy(endpoints: list[str]) -> tuple[int, int]:
    from nubes.config import load_config
    from nubes.errors import InvalidInput
    from nubes.store import open_store
    from nubes.store.copy import copy_store
    from nubes.store.etcd import EtcdStore

    if not endpoints:
        raise InvalidInput("--to names no etcd endpoint", hint="e.g. --to 10.0.0.1:2379")
    config = load_config()
    source = await open_store(config)
    try:
        target = await EtcdStore.connect(endpoints, timeout=config.store.timeout)
        try:
            result = await copy_store(source, target)
        finally:
            await target.close()
    finally:
        await source.close()
    return result.copied, result.leased_skipped
