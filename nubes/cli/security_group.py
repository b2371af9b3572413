"""`nubes security-group ...`: groups of allow rules for ports, and `rule add|delete|list`."""

from __future__ import annotations

from typing import Annotated

import typer

from nubes.cli.common import OUTPUT, Ref, add_read_verbs, api, columns, label, say, show_many
from nubes.cli.output import OutputFormat
from nubes.client.base import SECURITY_GROUP
from nubes.errors import InvalidInput

app = typer.Typer(name="security-group", help="Security groups.", no_args_is_help=True)
rule_app = typer.Typer(name="rule", help="The rules of a security group.", no_args_is_help=True)
app.add_typer(rule_app)

GROUP_COLUMNS = columns(
    "id", "spec.name", "spec.description", ("rules", lambda r: len(r["spec"].get("rules") or []))
)
RULE_COLUMNS = columns(
    "id",
    "direction",
    "ethertype",
    "protocol",
    "port_min",
    "port_max",
    "remote_cidr",
    "remote_group",
)
add_read_verbs(app, SECURITY_GROUP, GROUP_COLUMNS)


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="The group's name.")],
    description: Annotated[str, typer.Option("--description")] = "",
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Make a security group (it allows nothing in until rules are added)."""
    with api(output) as client:
        made = client.create_security_group(name, description)
        say(output, made, f"made security group {label(made)}")


def _ports(text: str | None) -> tuple[int | None, int | None]:
    """`22` or `8000-8080` as (port_min, port_max)."""
    if text is None:
        return None, None
    low, sep, high = text.partition("-")
    try:
        return int(low), int(high) if sep else int(low)
    except ValueError:
        raise InvalidInput(
            f"--port {text!r} is not a port or a range", hint="e.g. --port 22 or --port 8000-8080"
        ) from None


@rule_app.command("add")
def rule_add(
    group: Ref,
    protocol: Annotated[
        str, typer.Option("--protocol", "-p", help="tcp, udp, icmp, icmpv6 or any.")
    ] = "any",
    port: Annotated[
        str | None, typer.Option("--port", help="A port or range (tcp/udp); ICMP type (icmp).")
    ] = None,
    egress: Annotated[bool, typer.Option("--egress", help="Outgoing, not incoming.")] = False,
    remote_cidr: Annotated[
        str | None, typer.Option("--remote-cidr", help="From (to) this CIDR only.")
    ] = None,
    remote_group: Annotated[
        str | None, typer.Option("--remote-group", help="From (to) this group's ports only.")
    ] = None,
    ipv6: Annotated[bool, typer.Option("--ipv6", help="An IPv6 rule.")] = False,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Allow traffic: e.g. `rule add web --protocol tcp --port 22`, `--protocol icmp`."""
    port_min, port_max = _ports(port)
    with api(output) as client:
        rule = client.add_rule(
            group,
            direction="egress" if egress else "ingress",
            ethertype="ipv6" if ipv6 else None,
            protocol=protocol,
            port_min=port_min,
            port_max=port_max,
            remote_cidr=remote_cidr,
            remote_group=remote_group,
        )
        say(output, rule, f"added rule {rule['id']} to {group}")


@rule_app.command("delete")
def rule_delete(
    group: Ref,
    rule_id: Annotated[str, typer.Argument(metavar="RULE", help="The rule's id.")],
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Remove a rule from a security group."""
    with api(output) as client:
        client.delete_rule(group, rule_id)
        say(output, {"id": rule_id, "deleted": True}, f"deleted rule {rule_id} of {group}")


@rule_app.command("list")
def rule_list(group: Ref, output: OUTPUT = OutputFormat.TEXT) -> None:
    """List a security group's rules."""
    with api(output) as client:
        rules = client.get(SECURITY_GROUP, group)["spec"].get("rules") or []
        show_many(f"rules of {group}", rules, output, RULE_COLUMNS)
