"""`nubes network|subnet|port|floating-ip ...`: VPCs, external networks, subnets, the
ports VMs plug into, and the floating IPs that reach them from outside.
"""

from __future__ import annotations

from typing import Annotated

import typer

from nubes.cli.common import (
    OUTPUT,
    add_read_verbs,
    api,
    columns,
    field,
    label,
    say,
    show_many,
)
from nubes.cli.output import OutputFormat
from nubes.client import Client
from nubes.client.base import FLOATING_IP, NETWORK, PORT, SUBNET, Json
from nubes.errors import InvalidInput, NubesError

network_app = typer.Typer(
    name="network", help="Networks (VPCs and external).", no_args_is_help=True
)
subnet_app = typer.Typer(name="subnet", help="Subnets of a network.", no_args_is_help=True)
port_app = typer.Typer(name="port", help="Ports: a VM's place on a subnet.", no_args_is_help=True)
floating_ip_app = typer.Typer(
    name="floating-ip", help="Floating IPs from an external network.", no_args_is_help=True
)

NETWORK_COLUMNS = columns(
    "id",
    "spec.name",
    ("external", lambda r: (r["spec"].get("external") or {}).get("cidr", "")),
    ("gateway", field("spec.gateway.address")),
    "spec.mtu",
)
SUBNET_COLUMNS = columns("id", "spec.name", "spec.network", "spec.cidr", "spec.ipam", "spec.vni")
PORT_COLUMNS = columns(
    "id", "spec.name", "spec.network", "spec.fixed_ips", "spec.vm", ("state", field("status.state"))
)
FLOATING_IP_COLUMNS = columns(
    "id", "spec.address", "spec.network", "spec.port", ("state", field("status.state"))
)

add_read_verbs(network_app, NETWORK, NETWORK_COLUMNS, with_list=False)
add_read_verbs(subnet_app, SUBNET, SUBNET_COLUMNS, with_list=False)
add_read_verbs(port_app, PORT, PORT_COLUMNS, with_list=False)
add_read_verbs(floating_ip_app, FLOATING_IP, FLOATING_IP_COLUMNS, with_list=False)


@network_app.command("create")
def network_create(
    name: Annotated[str, typer.Argument(help="The network's name.")],
    external_gateway: Annotated[
        str | None,
        typer.Option("--external-gateway", help="An external network: the VPC's way out (SNAT)."),
    ] = None,
    mtu: Annotated[int | None, typer.Option("--mtu", help="1280 to 9000.")] = None,
    external_cidr: Annotated[
        str | None,
        typer.Option("--external-cidr", help="Admin: make an external network with this CIDR."),
    ] = None,
    external_router: Annotated[
        str | None, typer.Option("--external-router", help="The outside router's address.")
    ] = None,
    physical_network: Annotated[
        str, typer.Option("--physical-network", help="The host bridge mapping's name.")
    ] = "external",
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Make a VPC, or (admin, with --external-cidr) an external network."""
    external = None
    if external_cidr is not None:
        external = {
            "physical_network": physical_network,
            "cidr": external_cidr,
            "gateway": external_router,
        }
    with api(output) as client:
        made = client.create_network(
            name, mtu=mtu, external_gateway=external_gateway, external=external
        )
        say(output, made, f"made network {label(made)}")


@network_app.command("list")
def network_list(
    name: Annotated[str | None, typer.Option("--name", help="Only this name.")] = None,
    external: Annotated[
        bool | None, typer.Option("--external/--vpc", help="Only external networks, or VPCs.")
    ] = None,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """List the project's VPCs and the external networks."""
    with api(output) as client:
        found = client.records(NETWORK, name=name, external=external)
        show_many("networks", found, output, NETWORK_COLUMNS)


@subnet_app.command("create")
def subnet_create(
    name: Annotated[str, typer.Argument(help="The subnet's name.")],
    network: Annotated[str, typer.Option("--network", help="Its network (name or id).")],
    cidr: Annotated[str, typer.Option("--cidr", help="IPv4, /16 to /29.")],
    gateway: Annotated[
        str | None, typer.Option("--gateway", help="Default: first address.")
    ] = None,
    ipv6_cidr: Annotated[str | None, typer.Option("--ipv6-cidr", help="A /64 for SLAAC.")] = None,
    ipam: Annotated[
        str | None, typer.Option("--ipam", help="automatic (DHCP), manual or none.")
    ] = None,
    dhcp: Annotated[bool | None, typer.Option("--dhcp/--no-dhcp", help="Serve DHCP.")] = None,
    dns: Annotated[
        list[str] | None, typer.Option("--dns", help="A nameserver for DHCP (repeatable).")
    ] = None,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Make a subnet in a network."""
    with api(output) as client:
        made = client.create_subnet(
            name,
            network,
            cidr,
            gateway=gateway,
            ipv6_cidr=ipv6_cidr,
            ipam=ipam,
            dhcp=dhcp,
            dns_nameservers=dns,
        )
        say(output, made, f"made subnet {label(made)} {made['spec']['cidr']}")


@subnet_app.command("list")
def subnet_list(
    network: Annotated[str | None, typer.Option("--network", help="Only this network's.")] = None,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """List the project's subnets."""
    with api(output) as client:
        show_many("subnets", client.records(SUBNET, network=network), output, SUBNET_COLUMNS)


@port_app.command("create")
def port_create(
    network: Annotated[str, typer.Option("--network", help="Its network (name or id).")],
    name: Annotated[str | None, typer.Option("--name", help="A name for it.")] = None,
    subnet: Annotated[str | None, typer.Option("--subnet", help="Default: the oldest.")] = None,
    fixed_ip: Annotated[str | None, typer.Option("--fixed-ip", help="Default: a free one.")] = None,
    security_groups: Annotated[
        list[str] | None,
        typer.Option("--security-group", "-s", help="Default: the project's `default`."),
    ] = None,
    no_port_security: Annotated[
        bool, typer.Option("--no-port-security", help="No anti-spoofing, no groups.")
    ] = False,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Make a port, to give to a VM with `vm create --port`."""
    with api(output) as client:
        made = client.create_port(
            network,
            name=name,
            subnet=subnet,
            fixed_ip=fixed_ip,
            security_groups=security_groups,
            port_security=False if no_port_security else None,
        )
        say(output, made, f"made port {label(made)} {', '.join(made['spec']['fixed_ips'])}")


@port_app.command("list")
def port_list(
    network: Annotated[str | None, typer.Option("--network", help="Only this network's.")] = None,
    vm: Annotated[str | None, typer.Option("--vm", help="Only this VM's (id).")] = None,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """List the project's ports."""
    with api(output) as client:
        found = client.records(PORT, network=network, vm=vm)
        show_many("ports", found, output, PORT_COLUMNS)


# -- floating IPs -----------------------------------------------------------------------


def vm_port(client: Client, vm: str) -> str:
    """The first port of a VM, where a floating IP goes by default.

    Raises:
        NubesError: the VM has no port.
    """
    view = client.get_vm(vm)
    ports = (view.get("spec") or {}).get("ports") or []
    if not ports:
        raise NubesError(
            f"VM {label(view)} has no port for a floating IP",
            hint="give it a network (`nubes vm create --network`), or name a --port",
        )
    return str(ports[0])


def _target(client: Client, port: str | None, vm: str | None) -> str | None:
    if port is not None and vm is not None:
        raise InvalidInput("give --port or --vm, not both", hint="--vm takes the VM's first port")
    return vm_port(client, vm) if vm is not None else port


FipRef = Annotated[str, typer.Argument(metavar="ID|ADDRESS", help="The floating IP.")]
PortOption = Annotated[str | None, typer.Option("--port", help="The port (name or id).")]
VmOption = Annotated[str | None, typer.Option("--vm", help="The VM (its first port).")]


@floating_ip_app.command("create")
def floating_ip_create(
    network: Annotated[str, typer.Option("--network", help="The external network.")],
    port: PortOption = None,
    vm: VmOption = None,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Allocate a floating IP, and associate it with a port or VM if named."""
    with api(output) as client:
        made = client.create_floating_ip(network, _target(client, port, vm))
        say(output, made, f"made floating IP {floating_ip_of(made)} ({made['id']})")


@floating_ip_app.command("list")
def floating_ip_list(output: OUTPUT = OutputFormat.TEXT) -> None:
    """List the project's floating IPs."""
    with api(output) as client:
        show_many("floating IPs", client.records(FLOATING_IP), output, FLOATING_IP_COLUMNS)


@floating_ip_app.command("associate")
def floating_ip_associate(
    ref: FipRef,
    port: PortOption = None,
    vm: VmOption = None,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Point a floating IP at a port (or a VM's first port)."""
    with api(output) as client:
        target = _target(client, port, vm)
        if target is None:
            raise InvalidInput("name a --port or a --vm", hint="e.g. --vm web1")
        done = client.associate_floating_ip(ref, target)
        say(output, done, f"floating IP {floating_ip_of(done)} now reaches port {target}")


@floating_ip_app.command("disassociate")
def floating_ip_disassociate(ref: FipRef, output: OUTPUT = OutputFormat.TEXT) -> None:
    """Detach a floating IP from its port (it stays allocated)."""
    with api(output) as client:
        done = client.disassociate_floating_ip(ref)
        say(output, done, f"floating IP {floating_ip_of(done)} is free")


def floating_ip_of(record: Json) -> str:
    """The address of a floating IP's view."""
    return str((record.get("spec") or {}).get("address") or record.get("address") or "")
