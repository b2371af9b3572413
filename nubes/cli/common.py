"""What every API verb shares: finding the API and token, turning errors into a message
and an exit code (JSON on stderr with `-o json`), and printing records as tables or JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from nubes.cli.output import OutputFormat, OutputOption, print_json, print_table
from nubes.client import Client
from nubes.client.base import Resource, name_of
from nubes.client.session import resolve_session
from nubes.errors import NubesError

CA_VARIABLE = "NUBES_CA_CERT"
Json = dict[str, Any]
Getter = Callable[[Json], object]


@dataclass
class CliState:
    """Set by the root command's options for the verb that runs after it."""

    url: str | None = None


STATE = CliState()

OUTPUT = OutputOption
Ref = Annotated[str, typer.Argument(metavar="NAME|ID", help="The name or id.")]


@contextmanager
def reporting(output: OutputFormat) -> Iterator[None]:
    """Ends a NubesError raised inside with its message (or JSON) on stderr and its exit code."""
    try:
        yield
    except NubesError as error:
        if output is OutputFormat.JSON:
            typer.echo(json.dumps(error.to_dict()), err=True)
        else:
            typer.echo(f"error: {error}", err=True)
        raise typer.Exit(error.exit_code) from None


@contextmanager
def api(output: OutputFormat) -> Iterator[Client]:
    """A client of the API the command line, environment or saved session names.

    Errors inside the block end the command as `reporting` does.
    """
    with reporting(output):
        session = resolve_session(STATE.url)
        verify: bool | str = os.environ.get(CA_VARIABLE) or True
        with Client(session.url, session.token, verify=verify) as client:
            yield client


def field(path: str) -> Getter:
    """A getter of a dotted path in a record (`spec.name`, `status.state`), '' when absent."""
    parts = path.split(".")

    def get(record: Json) -> object:
        value: Any = record
        for part in parts:
            if not isinstance(value, dict):
                return ""
            value = value.get(part)
        if value is None:
            return ""
        if isinstance(value, list):
            return ", ".join(str(item) for item in value)
        return value

    return get


Columns = Sequence[tuple[str, Getter]]


def columns(*specs: str | tuple[str, Getter]) -> list[tuple[str, Getter]]:
    """Column specs: `"spec.cidr"` is shown as `cidr`; `(title, getter)` as given."""
    made: list[tuple[str, Getter]] = []
    for spec in specs:
        if isinstance(spec, str):
            made.append((spec.rsplit(".", 1)[-1], field(spec)))
        else:
            made.append(spec)
    return made


def show_many(title: str, records: Iterable[Json], output: OutputFormat, spec: Columns) -> None:
    """A JSON array, or a table of one row per record."""
    items = list(records)
    if output is OutputFormat.JSON:
        print_json(items)
        return
    print_table(title, [name for name, _ in spec], [[get(r) for _, get in spec] for r in items])


def show_one(title: str, record: Json, output: OutputFormat) -> None:
    """The JSON answer, or a two-column table of its fields (nested ones flattened)."""
    if output is OutputFormat.JSON:
        print_json(record)
        return
    print_table(title, ["field", "value"], list(_flatten(record)))


def _flatten(record: Json, prefix: str = "") -> Iterator[tuple[str, object]]:
    for key, value in record.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            shown = [json.dumps(v) if isinstance(v, dict) else str(v) for v in value]
            yield f"{prefix}{key}", ", ".join(shown)
        else:
            yield f"{prefix}{key}", "" if value is None else value


def say(output: OutputFormat, record: Json | None, line: str) -> None:
    """The JSON answer for scripts, a short line for people."""
    if output is OutputFormat.JSON:
        print_json(record if record is not None else {})
    else:
        typer.echo(line)


def label(record: Json) -> str:
    """`name (id)` or whichever of the two a record has."""
    name, ident = name_of(record), record.get("id")
    if name and ident and name != ident:
        return f"{name} ({ident})"
    return str(name or ident or "?")


def add_read_verbs(
    app: typer.Typer,
    resource: Resource,
    spec: Columns,
    *,
    with_list: bool = True,
) -> None:
    """`list` (unless the kind has filters of its own), `show` and `delete` of a resource."""
    title = resource.noun + "s"

    if with_list:

        @app.command("list")
        def list_command(output: OUTPUT = OutputFormat.TEXT) -> None:
            """List them (every page)."""
            with api(output) as client:
                show_many(title, client.records(resource), output, spec)

    @app.command("show")
    def show_command(ref: Ref, output: OUTPUT = OutputFormat.TEXT) -> None:
        """Show one."""
        with api(output) as client:
            show_one(resource.noun, client.get(resource, ref), output)

    add_delete_verb(app, resource)


def add_delete_verb(app: typer.Typer, resource: Resource) -> None:
    @app.command("delete")
    def delete_command(ref: Ref, output: OUTPUT = OutputFormat.TEXT) -> None:
        """Delete one."""
        with api(output) as client:
            answer = client.delete(resource, ref)
            if answer is None:
                say(output, {"id": ref, "deleted": True}, f"deleted {resource.noun} {ref}")
            else:
                say(output, answer, f"deleting {resource.noun} {label(answer)}")
