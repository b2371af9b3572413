"""`nubes host ...`: the hosts the API knows (admin), and this host's `gc`, which sweeps
what the store forgot."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

import typer

from nubes.cli.common import api, columns, field, reporting, show_many, show_one
from nubes.cli.output import OutputFormat, OutputOption, print_json, print_table
from nubes.client.base import HOST

if TYPE_CHECKING:
    from nubes.agent.gc import Orphan

app = typer.Typer(name="host", help="Hosts and their agents.", no_args_is_help=True)

HOST_COLUMNS = columns(
    "name",
    ("state", lambda r: str(r.get("state", "up" if r.get("alive") else "down"))),
    "alive",
    "accel",
    ("vcpus", lambda r: f"{r['allocated']['vcpus']}/{r['capacity'].get('vcpus', '?')}"),
    (
        "memory MiB",
        lambda r: f"{r['allocated']['memory_mb']}/{r['capacity'].get('memory_mb', '?')}",
    ),
    "vms",
    ("labels", field("labels")),
)


@app.command("list")
def list_command(output: OutputOption = OutputFormat.TEXT) -> None:
    """List the hosts, their capacity and what is bound to them (admin)."""
    with api(output) as client:
        show_many("hosts", client.records(HOST), output, HOST_COLUMNS)


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The host's name.")],
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Show one host (admin)."""
    with api(output) as client:
        show_one("host", client.get(HOST, name), output)


@app.command("gc")
def gc(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only list the orphans; remove nothing.")
    ] = False,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Find QEMU processes, VM files, volumes, cached images and cgroups with this
    agent's marks that the store does not know, and remove them."""
    with reporting(output):
        found, removed = asyncio.run(_gc(remove=not dry_run))
    if output is OutputFormat.JSON:
        print_json(
            {
                "orphans": [orphan.to_dict() for orphan in found],
                "removed": [orphan.to_dict() for orphan in removed],
            }
        )
        return
    if not found:
        typer.echo("no orphans")
        return
    gone = {(orphan.kind, orphan.id) for orphan in removed}
    print_table(
        "orphans" if dry_run else "orphans (removed)",
        ["kind", "id", "where", "removed"],
        [(o.kind.value, o.id, o.where, "yes" if (o.kind, o.id) in gone else "no") for o in found],
    )


async def _gc(*, remove: bool) -> tuple[list[Orphan], list[Orphan]]:
    # The agent's modules load only for this verb: every other `nubes` command starts faster.
    from nubes.agent.gc import find_orphans, remove_orphans
    from nubes.agent.paths import AgentPaths
    from nubes.config import load_config
    from nubes.store import open_store

    config = load_config()
    paths = AgentPaths(state_dir=config.agent_state_dir, run_dir=config.agent.run_dir)
    store = await open_store(config)
    try:
        found = await find_orphans(store, config.agent.host, config.agent.prefix, paths)
        removed = []
        if remove:
            removed = await remove_orphans(
                store, config.agent.host, config.agent.prefix, paths, found
            )
        return found, removed
    finally:
        await store.close()
