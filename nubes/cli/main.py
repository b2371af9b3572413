"""Entry point of the `nubes` command: the root Typer app and its groups."""

from __future__ import annotations

import sys

import typer

from nubes import __version__
from nubes.cli import host, image
from nubes.cli.agent import agent
from nubes.errors import NubesError

app = typer.Typer(
    name="nubes",
    help="nubes: a small, complete IaaS cloud.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(image.app)
app.add_typer(host.app)
app.command("agent")(agent)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"nubes {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False,
        "--version",
        help="Print the nubes version and exit.",
        callback=_print_version,
        is_eager=True,
    ),
) -> None:
    """nubes: a small, complete IaaS cloud."""


def main() -> None:
    """Run the CLI; a NubesError ends with its message and a non-zero exit, never a traceback."""
    try:
        app()
    except NubesError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
