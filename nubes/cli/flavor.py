"""`nubes flavor ...` (the sizes VMs are made with) and `nubes keypair ...` (SSH keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nubes.cli.common import OUTPUT, add_read_verbs, api, columns, say
from nubes.cli.output import OutputFormat
from nubes.client.base import FLAVOR, KEYPAIR
from nubes.errors import InvalidInput

flavor_app = typer.Typer(name="flavor", help="VM sizes.", no_args_is_help=True)
keypair_app = typer.Typer(name="keypair", help="SSH public keys for VMs.", no_args_is_help=True)

add_read_verbs(flavor_app, FLAVOR, columns("name", "vcpus", "memory_mb", "disk_gb"))
add_read_verbs(keypair_app, KEYPAIR, columns("name", "fingerprint", "created_at"))


@flavor_app.command("create")
def flavor_create(
    name: Annotated[str, typer.Argument(help="The flavor's name.")],
    vcpus: Annotated[int, typer.Option("--vcpus", help="Virtual CPUs.")],
    memory_mb: Annotated[int, typer.Option("--memory-mb", help="Memory in MiB.")],
    disk_gb: Annotated[int, typer.Option("--disk-gb", help="Root disk; 0: the image's.")] = 0,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Make a flavor (admin)."""
    with api(output) as client:
        body = {"name": name, "vcpus": vcpus, "memory_mb": memory_mb, "disk_gb": disk_gb}
        made = client.create(FLAVOR, body)
        say(output, made, f"made flavor {made['name']}")


@keypair_app.command("create")
def keypair_create(
    name: Annotated[str, typer.Argument(help="The key pair's name.")],
    public_key_file: Annotated[
        Path,
        typer.Option(
            "--public-key-file", "-f", help="An OpenSSH public key (e.g. id_ed25519.pub)."
        ),
    ],
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Import an SSH public key for VMs (`vm create --key NAME`)."""
    with api(output) as client:
        try:
            public_key = public_key_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as error:
            raise InvalidInput(
                f"cannot read the public key {public_key_file}: {error}",
                hint="give the .pub file ssh-keygen made",
            ) from None
        made = client.create_keypair(name, public_key)
        say(output, made, f"imported key pair {made['name']} ({made.get('fingerprint', '')})")
