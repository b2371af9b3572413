"""`nubes host ...`: this host as its agent sees it; `gc` sweeps what the store forgot."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from nubes.agent.gc import Orphan, find_orphans, remove_orphans
from nubes.agent.paths import AgentPaths
from nubes.cli.output import OutputFormat, OutputOption, print_json, print_table
from nubes.config import load_config
from nubes.store import open_store

app = typer.Typer(name="host", help="This host and its agent.", no_args_is_help=True)


@app.command("gc")
def gc(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only list the orphans; remove nothing.")
    ] = False,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Find QEMU processes, VM files, volumes, cached images and cgroups with this
    agent's marks that the store does not know, and remove them."""
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
