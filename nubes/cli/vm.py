"""`nubes vm ...`: make, list, show, start, stop, reboot, resize and delete VMs; attach
volumes; wait for a state; read, attach to or SSH through the VM's console and network.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from nubes.cli.common import (
    OUTPUT,
    Ref,
    api,
    columns,
    field,
    label,
    reporting,
    say,
    show_many,
    show_one,
)
from nubes.cli.event import print_events
from nubes.cli.output import OutputFormat
from nubes.client import Client
from nubes.client.base import Json
from nubes.client.errors import ApiError
from nubes.errors import InvalidInput, NubesError

app = typer.Typer(name="vm", help="Virtual machines.", no_args_is_help=True)

VM_COLUMNS = columns(
    "id",
    "spec.name",
    "state",
    ("flavor", field("spec.flavor.name")),
    ("addresses", lambda r: ", ".join(a["ip"] for a in r.get("addresses") or [])),
    ("host", field("spec.host")),
)
SSH_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
Timeout = Annotated[float, typer.Option("--timeout", help="Seconds to wait at most.")]


def _files(paths: list[Path] | None) -> str | None:
    if not paths:
        return None
    return "".join(path.read_text() for path in paths)


def _labels(items: list[str] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--label {item!r} is not KEY=VALUE", hint="e.g. --label zone=a")
        labels[key] = value
    return labels


def _nic(text: str) -> Json:
    """`NET`, `NET:SUBNET` or `NET=IP` / `NET:SUBNET=IP` as a NIC request."""
    where, _, fixed_ip = text.partition("=")
    network, _, subnet = where.partition(":")
    if not network:
        raise InvalidInput(f"--network {text!r} names no network", hint="e.g. --network default")
    return {"network": network, "subnet": subnet or None, "fixed_ip": fixed_ip or None}


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="The VM's name (unique in the project).")],
    image: Annotated[str, typer.Option("--image", help="Image name or id.")],
    flavor: Annotated[str, typer.Option("--flavor", help="Flavor name.")],
    networks: Annotated[
        list[str] | None,
        typer.Option(
            "--network", "-n", help="NET, NET:SUBNET or NET=IP: a new port there (repeatable)."
        ),
    ] = None,
    ports: Annotated[
        list[str] | None, typer.Option("--port", help="An existing free port (repeatable).")
    ] = None,
    keys: Annotated[
        list[str] | None, typer.Option("--key", "-k", help="A key pair's name (repeatable).")
    ] = None,
    user_data: Annotated[
        list[Path] | None,
        typer.Option("--user-data", help="A file given to the guest as user-data."),
    ] = None,
    security_groups: Annotated[
        list[str] | None,
        typer.Option("--security-group", "-s", help="For its new ports (repeatable)."),
    ] = None,
    floating_ip: Annotated[
        str | None,
        typer.Option(
            "--floating-ip",
            help="Allocate a floating IP on this external network and associate it.",
        ),
    ] = None,
    host_labels: Annotated[
        list[str] | None, typer.Option("--label", help="KEY=VALUE the host must have.")
    ] = None,
    anti_affinity_group: Annotated[
        str | None, typer.Option("--anti-affinity-group", help="Never on a host with another.")
    ] = None,
    storage_pool: Annotated[
        str | None, typer.Option("--storage-pool", help="Pool of the root disk (default: local).")
    ] = None,
    ha: Annotated[
        bool, typer.Option("--ha", help="Restart on another host if its host dies (shared pools).")
    ] = False,
    stopped: Annotated[
        bool, typer.Option("--stopped", help="Make it without starting it.")
    ] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until it runs.")] = False,
    timeout: Timeout = 300.0,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Make a VM; the scheduler places it and its host's agent starts it."""
    with api(output) as client:
        body: Json = {
            "flavor": flavor,
            "image": image,
            "networks": [_nic(n) for n in networks or []],
            "ports": ports or [],
            "key_names": keys or [],
            "user_data": _files(user_data),
            "security_groups": security_groups,
            "host_labels": _labels(host_labels),
            "anti_affinity_group": anti_affinity_group,
            "power_state": "stopped" if stopped else None,
            "storage_pool": storage_pool,
            "ha": ha or None,
        }
        vm = client.create_vm(name, **body)
        if floating_ip is not None:
            vm["floating_ip"] = _attach_floating_ip(client, vm, floating_ip)
        if wait:
            vm = {**(client.wait_vm(vm["id"], "running", timeout) or vm), **_extra(vm)}
        address = (vm.get("floating_ip") or {}).get("spec", {}).get("address")
        say(
            output,
            vm,
            f"made VM {label(vm)}: {vm.get('state')}"
            + (f", floating IP {address}" if address else ""),
        )


def _extra(vm: Json) -> Json:
    return {"floating_ip": vm["floating_ip"]} if "floating_ip" in vm else {}


def _attach_floating_ip(client: Client, vm: Json, network: str) -> Json:
    """A new floating IP on `network` associated with the VM's first port."""
    ports = vm.get("spec", {}).get("ports") or []
    if not ports:
        raise InvalidInput(
            f"VM {vm['id']} has no port to give a floating IP to",
            hint="give it a --network, then `nubes floating-ip create` and `associate`",
        )
    return client.create_floating_ip(network, port=ports[0])


@app.command("list")
def list_command(
    state: Annotated[str | None, typer.Option("--state", help="Only VMs in this state.")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Only VMs on this host.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Only the VM of this name.")] = None,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """List the project's VMs."""
    with api(output) as client:
        show_many("VMs", client.list_vms(state=state, host=host, name=name), output, VM_COLUMNS)


HISTORY_EVENTS = 20


@app.command("show")
def show(ref: Ref, output: OUTPUT = OutputFormat.TEXT) -> None:
    """Show a VM: spec, status, addresses, and its last events (`history` in JSON)."""
    with api(output) as client:
        vm = client.get_vm(ref)
        history = _history(client, str(vm["id"]))
        if output is OutputFormat.JSON:
            show_one("VM", {**vm, "history": history}, output)
            return
        show_one("VM", vm, output)
        if history:
            print_events("history", history, output)


def _history(client: Client, vm_id: str) -> list[Json]:
    try:
        return list(client.list_events(vm_id, "vms", last=HISTORY_EVENTS))
    except ApiError as error:
        if error.status != 404:
            raise
        return []  # an API older than the event log


def _acted(output: OutputFormat, vm: Json, what: str) -> None:
    say(output, vm, f"{what} VM {label(vm)} (now {vm.get('state')})")


@app.command("start")
def start(
    ref: Ref,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until it is running.")] = False,
    timeout: Timeout = 300.0,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Start a stopped VM."""
    with api(output) as client:
        vm = client.start_vm(ref)
        if wait:
            vm = client.wait_vm(vm["id"], "running", timeout) or vm
        _acted(output, vm, "started" if wait else "starting")


@app.command("stop")
def stop(
    ref: Ref,
    force: Annotated[bool, typer.Option("--force", help="Pull the plug, not the button.")] = False,
    soft_timeout: Annotated[
        float | None, typer.Option("--soft-timeout", help="Seconds before the stop turns hard.")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until it is stopped.")] = False,
    timeout: Timeout = 300.0,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Stop a VM (ACPI power button; --force stops it at once)."""
    with api(output) as client:
        vm = client.stop_vm(ref, force=force, timeout=soft_timeout)
        if wait:
            vm = client.wait_vm(vm["id"], "stopped", timeout) or vm
        _acted(output, vm, "stopped" if wait else "stopping")


@app.command("reboot")
def reboot(ref: Ref, output: OUTPUT = OutputFormat.TEXT) -> None:
    """Reboot a running VM."""
    with api(output) as client:
        _acted(output, client.reboot_vm(ref), "rebooting")


@app.command("resize")
def resize(
    ref: Ref,
    flavor: Annotated[str, typer.Option("--flavor", help="The new flavor's name.")],
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Give a VM another flavor (a running VM takes it at its next start)."""
    with api(output) as client:
        _acted(output, client.resize_vm(ref, flavor), f"resized to {flavor}:")


@app.command("attach-volume")
def attach_volume(
    ref: Ref,
    volume: Annotated[str, typer.Argument(metavar="VOLUME", help="The volume's name or id.")],
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Attach a volume to a VM."""
    with api(output) as client:
        _acted(output, client.attach_volume(ref, volume), f"attaching {volume} to")


@app.command("detach-volume")
def detach_volume(
    ref: Ref,
    volume: Annotated[str, typer.Argument(metavar="VOLUME", help="The volume's name or id.")],
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Detach a volume from a VM."""
    with api(output) as client:
        _acted(output, client.detach_volume(ref, volume), f"detaching {volume} from")


@app.command("console-log")
def console_log(
    ref: Ref,
    lines: Annotated[int, typer.Option("--lines", help="How many of the last lines.")] = 100,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Print the end of the VM's serial console log."""
    with api(output) as client:
        log = client.console_log(ref, lines)
        if output is OutputFormat.JSON:
            say(output, log, "")
            return
        for line in log.get("lines", []):
            typer.echo(line)


@app.command("wait")
def wait(
    ref: Ref,
    state: Annotated[str, typer.Option("--state", help="The state to wait for.")] = "running",
    timeout: Timeout = 300.0,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Wait until a VM reaches a state; fails at once, with the reason, if it goes to error."""
    with api(output) as client:
        vm = client.wait_vm(ref, state, timeout) or {}
        say(output, vm, f"VM {label(vm)} is {state}")


@app.command("delete")
def delete(
    ref: Ref,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until it is gone.")] = False,
    timeout: Timeout = 300.0,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Delete a VM (its agent stops it and removes its disk and ports)."""
    with api(output) as client:
        vm = client.delete_vm(ref) or {"id": ref}
        if wait:
            client.wait_vm(vm["id"], timeout=timeout, gone=True)
            say(output, {"id": vm["id"], "deleted": True}, f"deleted VM {label(vm)}")
            return
        say(output, vm, f"deleting VM {label(vm)}")


@app.command("console")
def console(ref: Ref) -> None:
    """Attach to the serial console of a VM on this host (Ctrl-] leaves)."""
    from nubes.cli.console import attach_serial, serial_socket_of

    with api(OutputFormat.TEXT) as client:
        vm = client.get_vm(ref)
        path = serial_socket_of(vm)
        typer.echo(f"connected to {label(vm)}'s serial console; Ctrl-] leaves", err=True)
        attach_serial(path)


@app.command("ssh", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ssh(
    ctx: typer.Context,
    ref: Ref,
    user: Annotated[str, typer.Option("--user", "-l", help="The guest's user.")] = "root",
    identity: Annotated[
        Path | None, typer.Option("--identity", "-i", help="The private key to use.")
    ] = None,
    ssh_options: Annotated[
        list[str] | None,
        typer.Option("--ssh-option", help="An ssh -o option, e.g. StrictHostKeyChecking=no."),
    ] = None,
) -> None:
    """SSH into a VM from this host through its network's namespace (root needed);
    what follows `--` is the command to run there."""
    with reporting(OutputFormat.TEXT):
        if not SSH_USER.fullmatch(user):
            raise InvalidInput(f"{user!r} is not a user name", hint="e.g. --user root")
        with api(OutputFormat.TEXT) as client:
            vm = client.get_vm(ref)
        options = [part for option in ssh_options or [] for part in ("-o", option)]
        if identity is not None:
            options[:0] = ["-i", str(identity)]
        argv = ssh_argv(vm, user, options, list(ctx.args))
        os.execvp(argv[0], argv)  # noqa: S606 - an argv, no shell


def ssh_argv(vm: Json, user: str, options: list[str], command: list[str]) -> list[str]:
    """`ip netns exec <the VM's VPC namespace> ssh OPTIONS user@ip COMMAND` for a VM's view.

    Raises:
        NubesError: the VM has no address yet; InvalidId: a malformed network id.
    """
    from nubes.agent.network.names import netns_name
    from nubes.config import load_config

    addresses: list[Any] = vm.get("addresses") or []
    ipv4 = [a for a in addresses if ":" not in str(a.get("ip", ""))]
    if not ipv4:
        raise NubesError(
            f"VM {label(vm)} has no IPv4 address to SSH to",
            hint="give it a --network when you make it; `nubes vm show` lists its addresses",
        )
    namespace = netns_name(load_config().agent.prefix, str(ipv4[0]["network"]))
    ip_tool = shutil.which("ip") or "ip"
    destination = f"{user}@{ipv4[0]['ip']}"
    return [ip_tool, "netns", "exec", namespace, "ssh", *options, destination, *command]


@app.command("migrate")
def migrate(
    ref: Ref,
    to: Annotated[
        str | None, typer.Option("--to", help="The target host (default: the scheduler's choice).")
    ] = None,
    cold: Annotated[bool, typer.Option("--cold", help="Move a stopped VM (copies its disks).")] = (
        False
    ),
    wait: Annotated[bool, typer.Option("--wait", help="Wait until it has moved.")] = False,
    timeout: Timeout = 600.0,
    output: OUTPUT = OutputFormat.TEXT,
) -> None:
    """Move a VM to another host (admin): running, or stopped with --cold."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    with api(output) as client:
        vm = client.migrate_vm(ref, to, live=not cold)
        if not wait:
            moving = client.get_migration(vm["id"])
            _acted(output, vm, f"moving to {moving.get('target')}:")
            return
        if output is not OutputFormat.TEXT:
            say(output, client.wait_migration(vm["id"], timeout), "")
            return
        bar_columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
        with Progress(*bar_columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("preparing", total=None)

            def report(moving: Json) -> None:
                total = moving.get("total_bytes") or None
                done = (total or 0) - (moving.get("remaining_bytes") or 0)
                bar.update(task, description=str(moving.get("state")), completed=done, total=total)

            moved = client.wait_migration(vm["id"], timeout, progress=report)
        say(
            output,
            moved,
            f"moved VM {label(vm)} from {moved.get('source')} to {moved.get('target')} "
            f"(downtime {moved.get('downtime_ms')} ms)",
        )
