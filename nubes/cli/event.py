"""`nubes event list`: the event log — who asked for what, what changed, which state each
resource reached and why — as a table, JSON, or followed as it grows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from nubes.cli.common import OUTPUT, Json, api
from nubes.cli.output import OutputFormat, print_json, print_table
from nubes.client import Client
from nubes.client.base import (
    FLOATING_IP,
    IMAGE,
    NETWORK,
    PORT,
    SECURITY_GROUP,
    SUBNET,
    VM,
    VOLUME,
    Resource,
)

app = typer.Typer(name="event", help="The event log.", no_args_is_help=True)

FOLLOW_OVERLAP = timedelta(seconds=5)
COLUMNS = ("time", "kind", "resource", "type", "actor", "state", "message")
# Kinds whose resources a name can stand for (resolved in the caller's project).
NAMED: dict[str, Resource] = {
    r.path.strip("/"): r for r in (VM, VOLUME, IMAGE, NETWORK, SUBNET, PORT, SECURITY_GROUP)
}
NAMED[FLOATING_IP.path.strip("/")] = FLOATING_IP


def event_time(event: Json) -> str:
    """`2025-01-31 12:00:00` (UTC) from the event's ISO time."""
    text = str(event.get("at") or "")
    return text[:19].replace("T", " ")


def state_text(event: Json) -> str:
    """`previous -> state`, `state`, or '' for events without one."""
    state, previous = event.get("state"), event.get("previous_state")
    if state and previous:
        return f"{previous} -> {state}"
    if previous and event.get("type") == "deleted":
        return f"{previous} -> (gone)"
    return str(state or "")


def event_row(event: Json) -> list[str]:
    """One table row: time, kind, resource, type, actor, state, message."""
    return [
        event_time(event),
        str(event.get("kind") or ""),
        str(event.get("resource") or ""),
        str(event.get("type") or ""),
        str(event.get("actor") or ""),
        state_text(event),
        str(event.get("message") or ""),
    ]


def event_line(event: Json) -> str:
    """One line for `--follow`: the row's cells, separated by two spaces."""
    return "  ".join(cell for cell in event_row(event) if cell)


def print_events(title: str, events: Sequence[Json], output: OutputFormat) -> None:
    if output is OutputFormat.JSON:
        print_json(list(events))
        return
    print_table(title, COLUMNS, [event_row(event) for event in events])


def follow_start(listed: Sequence[Json], moment: datetime) -> str:
    """Where `--follow`'s watch starts replaying: a little before the last event listed
    (a request's event may be written after a later one) or, with none, before `moment`;
    what was printed already is skipped by id."""
    at = _parse_time(listed[-1].get("at")) if listed else None
    start = (at or moment) - FOLLOW_OVERLAP
    return f"{int(start.timestamp() * 1_000_000)}_-"


def _parse_time(text: object) -> datetime | None:
    try:
        moment = datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _resolve(client: Client, resource: str | None, kind: str | None) -> str | None:
    if resource is None or kind is None or kind not in NAMED:
        return resource
    return client.resolve(NAMED[kind], resource)


def _emit(events: Iterable[Json], output: OutputFormat, seen: set[str]) -> None:
    for event in events:
        ident = str(event.get("id"))
        if ident in seen:
            continue
        seen.add(ident)
        if output is OutputFormat.JSON:
            typer.echo(json.dumps(event, separators=(",", ":")))
        else:
            typer.echo(event_line(event))


@app.command("list")
def list_events(
    resource: Annotated[
        str | None,
        typer.Option(
            "--resource", "-r", help="Only this resource's events (an id; a name with --kind)."
        ),
    ] = None,
    kind: Annotated[
        str | None, typer.Option("--kind", "-k", help="Only this kind: vms, volumes, hosts...")
    ] = None,
    project: Annotated[
        str | None, typer.Option("--project", help="Admins: only this project's events.")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, max=1000, help="The newest N events.")
    ] = 100,
    follow: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Then print new events as they come, until Ctrl-C."),
    ] = False,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Show the newest events, oldest first; with --follow, go on printing new ones
    (with -o json: one JSON object per line)."""
    with api(output) as client:
        resource = _resolve(client, resource, kind)
        if not follow:
            events = list(client.list_events(resource, kind, project=project, last=limit))
            print_events("events", events, output)
            return
        seen: set[str] = set()
        try:
            listed = list(client.list_events(resource, kind, project=project, last=limit))
            _emit(listed, output, seen)
            after = follow_start(listed, datetime.now(UTC))
            _emit(client.watch_events(resource, kind, project=project, after=after), output, seen)
        except KeyboardInterrupt:
            pass
