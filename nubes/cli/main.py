"""Entry point of the `nubes` command: the root Typer app and its groups."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from nubes import __version__
from nubes.cli import (
    auth,
    doctor,
    event,
    flavor,
    host,
    image,
    network,
    node,
    security_group,
    store,
    usage,
    vm,
    volume,
)
from nubes.cli.common import STATE
from nubes.client.session import URL_VARIABLE
from nubes.errors import NubesError

app = typer.Typer(
    name="nubes",
    help="nubes: a small, complete IaaS cloud.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# The cloud, as a person uses it through the API.
app.command("login")(auth.login)
app.command("logout")(auth.logout)
app.command("whoami")(auth.whoami)
app.command("usage")(usage.usage)
for group in (
    vm.app,
    image.app,
    flavor.flavor_app,
    flavor.keypair_app,
    network.network_app,
    network.subnet_app,
    network.port_app,
    security_group.app,
    network.floating_ip_app,
    volume.app,
    auth.project_app,
    auth.user_app,
    auth.token_app,
    auth.totp_app,
    host.app,
    event.app,
    store.app,
):
    app.add_typer(group)
# The daemons and the all-in-one node.
app.command("up")(node.up)
app.command("down")(node.down)
app.command("node")(node.node)
app.command("api")(node.api)
app.command("scheduler")(node.scheduler)
app.command("agent")(node.agent)
# This host's readiness.
app.command("doctor")(doctor.doctor)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"nubes {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            envvar=URL_VARIABLE,
            help="The API, e.g. http://127.0.0.1:8686 (default: the saved login's, or local).",
        ),
    ] = None,
    version: bool = typer.Option(
        False,
        "--version",
        help="Print the nubes version and exit.",
        callback=_print_version,
        is_eager=True,
    ),
) -> None:
    """nubes: a small, complete IaaS cloud."""
    STATE.url = url


def main() -> None:
    """Run the CLI; a NubesError ends with its message and a non-zero exit, never a traceback."""
    try:
        app()
    except NubesError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
